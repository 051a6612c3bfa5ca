"""What bitsandbytes computes on this CPU, against its own reference semantics.

Defined in the chapter "QLoRA" (book/qlora.ipynb), section "When the reference disagrees".

bitsandbytes dispatches ``dequantize_4bit`` to different kernels by CPU: a pure-torch path (odd row
lengths, and block sizes of 2048 or more on AVX-512 CPUs), a scalar C++ loop, and an AVX-512 C++
kernel. The scalar loop and the torch path run blocks over the *flattened* tensor, as quantization
does. The AVX-512 kernel (bitsandbytes 0.50) works row by row and reads the scale of element (i, j)
at ``absmax[i * (n // blocksize) + j // blocksize]``, which is the flat block only when a row holds a
whole number of blocks (n % blocksize == 0) or there is one row; otherwise most rows read the scales
of other blocks. ``row_block_index`` is that index, ``flat_block_index`` the right one.
"""
from __future__ import annotations

import contextlib
from math import prod

import torch


def flat_block_index(shape, blocksize: int) -> torch.Tensor:
    """The block of every element of a tensor of ``shape``: blocks of ``blocksize`` consecutive
    elements of the flattened tensor (how quantize_4bit, and pefttutor, assign scales)."""
    return (torch.arange(prod(shape)) // blocksize).reshape(shape)


def row_block_index(shape, blocksize: int) -> torch.Tensor:
    """The block whose scale bitsandbytes 0.50's AVX-512 dequantize kernel reads for each element:
    row i, column j -> i * (n // blocksize) + j // blocksize, for rows of length n."""
    m, n = prod(shape[:-1]), shape[-1]
    i, j = torch.arange(m)[:, None], torch.arange(n)[None, :]
    return (i * (n // blocksize) + j // blocksize).reshape(shape)


def _absmax(quant_state) -> torch.Tensor:
    """The fp32 absmax of every block, restored from 8 bits as ``bitsandbytes.functional.dequantize_4bit``
    does when the state is double-quantized."""
    if not quant_state.nested:
        return quant_state.absmax
    import bitsandbytes.functional as BF
    return (BF.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()


def reference_dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' own portable semantics of ``dequantize_4bit``: its pure-torch kernel (registered
    as the op's "default"), reached by redispatching past whatever CPU kernel this machine would run.

    bitsandbytes wraps that function in ``torch.compile``; it is run eagerly here (the same elementwise
    arithmetic, without a compiler and a recompilation for every shape)."""
    absmax = _absmax(quant_state)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    eager = (torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance")
             else contextlib.nullcontext())
    with eager:
        return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
            keys, packed, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape,
            dtype or quant_state.dtype)


def row_indexed_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """What a kernel that reads scales by ``row_block_index`` returns (fp32 levels times scales,
    rounded once to the state's dtype): a model of the AVX-512 kernel, to compare it with."""
    from .nf4 import fp4_code_book, nf4_code_book
    code = {"nf4": nf4_code_book(), "fp4": fp4_code_book()}[quant_state.quant_type].to(packed.device)
    absmax = _absmax(quant_state)
    shape = tuple(quant_state.shape)
    p = packed.reshape(-1)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:prod(shape)].long()
    index = row_block_index(shape, quant_state.blocksize).reshape(-1).to(packed.device)
    return (code[nibbles] * absmax[index]).reshape(shape).to(quant_state.dtype)


def compare_dequantize(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> dict:
    """Quantize ``w`` with bitsandbytes, dequantize it with the kernel this CPU dispatches to, and
    compare with bitsandbytes' reference semantics (and, where they differ, with the row-indexing
    model). Errors are mean squared errors against ``w``."""
    import bitsandbytes.functional as BF
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    dispatched, reference = BF.dequantize_4bit(packed, state), reference_dequantize(packed, state)
    agrees = torch.equal(dispatched, reference)

    def mse(t):
        return (t.float() - w.float()).pow(2).mean().item()
    return {"shape": tuple(w.shape), "blocksize": blocksize, "agrees": agrees,
            "max_abs_diff": (dispatched.float() - reference.float()).abs().max().item(),
            "mse_dispatched": mse(dispatched), "mse_reference": mse(reference),
            "row_indexed": None if agrees else torch.equal(dispatched, row_indexed_dequantize(packed, state))}


def cpu_description() -> str:
    """This CPU as bitsandbytes and torch see it: torch's vector capability (AVX2, AVX512, ...) and
    whether bitsandbytes found AVX512-BF16 (which routes Linear4bit inference through a bf16 kernel)."""
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"AVX512-BF16 {'yes' if has_avx512bf16() else 'no'}, bitsandbytes {bitsandbytes.__version__}")
