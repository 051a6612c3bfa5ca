"""NF4: 4-bit NormalFloat, blockwise absmax quantization and nibble packing, bit for bit as bitsandbytes.

Dettmers et al., 2023, arXiv 2305.14314. The code book is derived from normal quantiles (equal
probability mass per level, the information-theoretic optimum for normally distributed weights);
blocks run over the flattened tensor, each with its own fp32 absmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

OFFSET = 0.9677083          # outermost quantile; bitsandbytes' create_normal_map default


def nf4_code_book(offset: float = OFFSET) -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], sorted: 7 negative, an exact zero, 8 positive.

    Positive half: the standard normal quantiles at 8 equally spaced probabilities from ``offset`` to
    one half (exclusive); negative half: minus the quantiles at 7 such probabilities. Add 0, sort, and
    divide by the largest, so the levels run from -1 to 1.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())     # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())    # 7 values < 0
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return levels / levels.max()                 # normalised in fp32, as bitsandbytes does


@dataclass
class NF4State:
    """What dequantization needs besides the packed codes."""
    absmax: torch.Tensor          # (number of blocks,) fp32: max |x| of each block
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int


def _check(w: torch.Tensor, blocksize: int):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor (fp32, bf16 or fp16), got "
                        f"{getattr(w, 'dtype', type(w).__name__)}; convert it with .float() first")
    if not isinstance(blocksize, int) or blocksize not in [2 ** i for i in range(5, 13)]:
        raise ValueError(f"blocksize={blocksize!r} must be a power of two from 32 to 4096 "
                         f"(QLoRA uses 64)")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, NF4State]:
    """Packed codes ((n + 1) // 2, 1) uint8, two per byte, element 2i in the high nibble, and the state.

    Each block of ``blocksize`` consecutive elements of the flattened tensor is divided by its absmax,
    and every value gets the index of the nearest level (a tie goes to the lower one).
    """
    _check(w, blocksize)
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)                            # (full blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:                                                        # a last, shorter block
        last = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, (x[full:] / last).clamp(-1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])               # pad: code of 0.0
    code = nf4_code_book()
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)              # on a midpoint: the lower level
    packed = ((q[0::2] << 4) | q[1::2])[:, None]
    return packed, NF4State(absmax, w.shape, w.dtype, blocksize)


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """code_book[nibble] * absmax of its block, computed in fp32, returned in the original dtype."""
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()  # high nibble first
    n = prod(state.shape)
    values = nf4_code_book()[q][:n]
    scale = state.absmax.repeat_interleave(state.blocksize)[:n]
    return (values * scale).reshape(state.shape).to(state.dtype)
