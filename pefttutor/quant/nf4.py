"""NF4: 4-bit NormalFloat, blockwise absmax quantization, nibble packing and double quantization,
bit for bit as bitsandbytes.

Defined in the chapter "QLoRA" (book/qlora.ipynb). Dettmers et al., 2023, arXiv 2305.14314. The code
book is derived from normal quantiles (equal probability mass per level, the information-theoretic
optimum for normally distributed weights); blocks run over the flattened tensor, each with its own fp32
absmax; double quantization stores those absmax values in 8 bits (Dettmers et al., 2022, 2110.02861).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from .. import checks

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


def dynamic_code_book() -> torch.Tensor:
    """The 256 levels of bitsandbytes' signed 8-bit dynamic type, sorted, from about -0.993 to 1.

    A sign bit, then a run of zeros that acts as the exponent (each zero divides by 10), an indicator
    bit, and the remaining bits as a linear fraction: level i of exponent e is 10^-e times the
    midpoints of a linear grid from 0.1 to 1 with 2^(6-e) + 1 points. Adding 0 and 1 gives 256 values.
    """
    levels = [torch.zeros(1), torch.ones(1)]
    for i in range(7):                                         # exponent 10^(i-6): 2^i levels each
        grid = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (grid[:-1] + grid[1:]) / 2 * 10 ** (i - 6)     # float32, as bitsandbytes computes it
        levels += [means, -means]
    return torch.cat(levels).sort().values


def _scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 -> (x / absmax of its block clamped to [-1, 1], absmax per block)."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)                            # (full blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:                                                        # a last, shorter block
        last = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, (x[full:] / last).clamp(-1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted code book; a value on a midpoint goes to the lower."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


def _lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit path: the code of each of 65,536 evenly spaced points in [-1, 1]."""
    grid = torch.arange(size, dtype=torch.float32) / (size - 1) * 2 - 1
    return _nearest(grid, code)


def _scale_by_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) times the absmax of each one's block."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].reshape(-1, blocksize) * absmax[:full // blocksize, None]).reshape(-1)
    return torch.cat([head, values[full:] * absmax[-1]]) if full < n else head


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256, lookup_table: bool = False):
    """8-bit blockwise quantization with the dynamic code: (uint8 codes, fp32 absmax per block).

    ``lookup_table=False`` picks the exact nearest level, as bitsandbytes does on CUDA and in its
    pure-torch path; ``True`` reproduces its CPU kernel, which rounds x / absmax to a grid of 65,536
    points first and so, now and then, lands a few levels away from the nearest.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError(f"quantize_blockwise_8bit takes a non-empty floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    checks.integer("blocksize", blocksize, low=1, who="quantize_blockwise_8bit ")
    checks.boolean("lookup_table", lookup_table, who="quantize_blockwise_8bit ")
    scaled, absmax = _scale_blocks(x.reshape(-1).float(), blocksize)
    code = dynamic_code_book()
    if lookup_table:
        index = torch.floor((scaled + 1) / 2 * 65535 + 0.5).long()   # halves round up, as in C++
        q = _lookup_table(code)[index]
        zero = absmax <= 1e-38                # the CPU kernel divides 0 by 0: absmax 0, code 0
        absmax = absmax.masked_fill(zero, 0.0)
        q = q.masked_fill(zero.repeat_interleave(blocksize)[:q.numel()], 0)
    else:
        q = _nearest(scaled, code)
    return q.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256):
    return _scale_by_blocks(dynamic_code_book()[q.long()], absmax, blocksize)


@dataclass
class NF4State:
    """What dequantization needs besides the packed codes.

    Without double quantization ``absmax`` is the fp32 max |x| of each block. With it, ``absmax``
    holds uint8 codes of ``absmax - offset`` in the dynamic 8-bit type, blocks of 256, and
    ``absmax_scale`` the fp32 absmax of each of those blocks.
    """
    absmax: torch.Tensor          # (blocks,) fp32, or (blocks,) uint8 when double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    offset: torch.Tensor | None = None          # fp32 mean of the absmax values (double quant)
    absmax_scale: torch.Tensor | None = None    # (ceil(blocks / 256),) fp32 (double quant)

    DQ_BLOCKSIZE = 256

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def constants(self) -> torch.Tensor:
        """The fp32 absmax of every block (dequantized first when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax_scale, self.DQ_BLOCKSIZE) + self.offset


def check_blocksize(blocksize):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in [2 ** i for i in range(5, 13)]:
        raise ValueError(f"blocksize={blocksize!r} must be a power of two from 32 to 4096 "
                         f"(QLoRA uses 64)")


def _check(w: torch.Tensor, blocksize: int):
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor (fp32, bf16 or fp16), got "
                        f"{getattr(w, 'dtype', type(w).__name__)}; convert it with .float() first")
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_nf4 got a tensor with inf or NaN values: a block's absmax would be "
                         "inf or NaN and every value in that block would be lost")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 lookup_table: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Packed codes ((n + 1) // 2, 1) uint8, two per byte, element 2i in the high nibble, and the state.

    Each block of ``blocksize`` consecutive elements of the flattened tensor is divided by its absmax,
    and every value gets the index of the nearest level (a tie goes to the lower one).
    ``double_quant=True`` stores the absmax values in 8 bits (offset = their mean, blocks of 256);
    ``lookup_table`` selects bitsandbytes' CPU rounding for that step (see ``quantize_blockwise_8bit``).
    """
    _check(w, blocksize)
    checks.boolean("double_quant", double_quant, who="quantize_nf4 ")
    checks.boolean("lookup_table", lookup_table, who="quantize_nf4 ")
    scaled, absmax = _scale_blocks(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])               # pad: code of 0.0
    q = _nearest(scaled, nf4_code_book()).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2])[:, None]
    state = NF4State(absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        offset = absmax.mean()
        codes, scale = quantize_blockwise_8bit(absmax - offset, NF4State.DQ_BLOCKSIZE, lookup_table)
        state = NF4State(codes, w.shape, w.dtype, blocksize, offset, scale)
    return packed, state


def _byte_table(device) -> torch.Tensor:
    """(256, 2): the two levels each byte stands for, high nibble first."""
    code = nf4_code_book().to(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code_book[nibble] * absmax of its block, computed in fp32 and rounded once to ``dtype``
    (default: the original dtype), as bitsandbytes' dequantize_4bit.

    One lookup per byte in a 256-entry table of level pairs, rather than unpacking the nibbles."""
    checks.float_dtype("dtype", dtype, who="dequantize_nf4 ")
    n = prod(state.shape)
    values = torch.index_select(_byte_table(packed.device), 0, packed.reshape(-1).int()).reshape(-1)[:n]
    out = _scale_by_blocks(values, state.constants(), state.blocksize).reshape(state.shape)
    return out.to(dtype or state.dtype)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, dq_blocksize: int = 256) -> float:
    """4 bits per code plus the block constants: 32 / blocksize bits without double quantization,
    8 / blocksize + 32 / (blocksize * dq_blocksize) with it (the offset, one number, is ignored)."""
    check_blocksize(blocksize)
    checks.boolean("double_quant", double_quant, who="bits_per_parameter ")
    checks.integer("dq_blocksize", dq_blocksize, low=1, who="bits_per_parameter ")
    constants = 8 / blocksize + 32 / (blocksize * dq_blocksize) if double_quant else 32 / blocksize
    return 4 + constants


# ---------------------------------------------------------------------------------------------
# Other 4-bit code books, for comparison


def fp4_code_book() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) levels by code index: bit 3 is the sign, the rest exponent and
    mantissa; scaled so the largest is 1. Not sorted (index order matters for the packed bytes)."""
    magnitudes = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    return torch.cat([magnitudes, -magnitudes])


def int4_code_book() -> torch.Tensor:
    """Symmetric 4-bit integers with absmax scaling: k / 7 for k = -7..7 (15 levels, one code unused)."""
    return torch.arange(-7, 8) / 7


def fake_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Quantize to the nearest level of any code book with blockwise absmax and return the
    dequantized tensor (what the network computes with), in the input's dtype."""
    _check(w, blocksize)
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point() or code.numel() < 2:
        raise TypeError(f"fake_quantize: code must be a 1-D floating-point tensor of levels in [-1, 1] "
                        f"(e.g. nf4_code_book()), got {code!r}")
    levels = code.float().unique()                                      # sorted, duplicates (±0) merged
    scaled, absmax = _scale_blocks(w.reshape(-1).float(), blocksize)
    return _scale_by_blocks(levels[_nearest(scaled, levels)], absmax, blocksize).reshape(w.shape).to(w.dtype)
