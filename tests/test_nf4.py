"""NF4 from scratch against bitsandbytes on CPU, bit for bit: code book, packed bytes, absmax, dequantized
values, over dtypes, shapes and block sizes; ties, zero blocks, odd sizes, errors."""
import bitsandbytes.functional as BF
import pytest
import torch

from pefttutor.quant import dequantize_nf4, nf4_code_book, quantize_nf4


def test_code_book_is_bitsandbytes_table():
    ours = nf4_code_book()
    theirs = BF.get_4bit_type("nf4", device="cpu")
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours, theirs)
    assert ours[7] == 0 and ours[0] == -1 and ours[-1] == 1 and (ours.diff() > 0).all()


@pytest.mark.parametrize("shape", [(3, 37), (128, 4096), (7,), (65,), (2, 64), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_bit_exact_with_bitsandbytes(shape, dtype, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref_packed, ref_state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    packed, state = quantize_nf4(w, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    out, ref_out = dequantize_nf4(packed, state), BF.dequantize_4bit(ref_packed, ref_state)
    assert out.dtype == dtype == ref_out.dtype and out.shape == w.shape
    assert torch.equal(out, ref_out)


def test_ties_go_to_the_lower_code_and_high_nibble_first():
    code = nf4_code_book()
    mid = (code[9] + code[10]) / 2                       # exactly between levels 9 and 10
    packed, state = quantize_nf4(torch.tensor([mid.item(), 1.0]), blocksize=32)
    assert packed.tolist() == [[(9 << 4) | 15]]
    assert torch.equal(packed, BF.quantize_4bit(torch.tensor([mid.item(), 1.0]), blocksize=32, quant_type="nf4")[0])


def test_zero_blocks_and_round_trip_error():
    w = torch.randn(200)
    w[64:128] = 0                                         # a whole block of zeros
    packed, state = quantize_nf4(w, 64)
    assert state.absmax[1] == 0
    out = dequantize_nf4(packed, state)
    assert torch.equal(out[64:128], torch.zeros(64))
    half_gap = (nf4_code_book().diff().max() / 2).item()
    blocks = state.absmax.repeat_interleave(64)[:200]
    assert ((out - w).abs() <= blocks * half_gap + 1e-7).all()


@pytest.mark.parametrize("w, kwargs, error, message", [
    (torch.arange(8), {}, TypeError, "takes a floating-point tensor (fp32, bf16 or fp16), got torch.int64"),
    (torch.randn(8), {"blocksize": 48}, ValueError, "blocksize=48 must be a power of two from 32 to 4096"),
    (torch.randn(8), {"blocksize": 8192}, ValueError, "blocksize=8192"),
    (torch.randn(0), {}, ValueError, "empty tensor"),
])
def test_errors(w, kwargs, error, message):
    with pytest.raises(error) as err:
        quantize_nf4(w, **kwargs)
    assert message in str(err.value)
