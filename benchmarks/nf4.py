"""NF4 quantize and dequantize throughput: pefttutor.quant against bitsandbytes, as ratios.

    python benchmarks/nf4.py [--sizes 1024 4096] [--repeats 10] [--device cpu|cuda]

A (size, size) fp32 weight in blocks of 64, with and without double quantization. On the CPU
bitsandbytes quantizes 4-bit in pure torch and dequantizes in C++; on CUDA both are kernels. Our
functions are plain torch either way. The packed bytes are checked equal before timing.
"""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import torch
from common import arguments, compare, device_line

from pefttutor.quant import dequantize_nf4, quantize_nf4


def one_size(size: int, double_quant: bool, args, device) -> dict:
    w = torch.randn(size, size, device=device)
    lookup = device.type == "cpu"          # bitsandbytes' CPU 8-bit kernel rounds through a table
    packed, state = quantize_nf4(w, 64, double_quant, lookup_table=lookup)
    ref_packed, ref_state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_nf4(packed, state), BF.dequantize_4bit(ref_packed, ref_state))
    t = compare({
        "ours_q": lambda: quantize_nf4(w, 64, double_quant, lookup_table=lookup),
        "bnb_q": lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant),
        "ours_dq": lambda: dequantize_nf4(packed, state),
        "bnb_dq": lambda: BF.dequantize_4bit(ref_packed, ref_state),
    }, args.repeats, device)
    return {"size": size, "dq": double_quant, **t}


def main():
    args, device = arguments(__doc__, sizes=(1024, 4096))
    print(f"{device_line(device)}, bitsandbytes {bnb.__version__}")
    print("(size, size) fp32, block 64; ms, median of", args.repeats, "; ratio = pefttutor / bitsandbytes")
    print(f"{'size':>5s} {'DQ':>3s} {'quantize ours':>14s} {'bnb':>8s} {'ratio':>6s} "
          f"{'dequantize ours':>16s} {'bnb':>8s} {'ratio':>6s}")
    for size in args.sizes:
        for dq in (False, True):
            m = one_size(size, dq, args, device)
            print(f"{size:5d} {'yes' if dq else 'no':>3s} {1e3 * m['ours_q']:14.2f} {1e3 * m['bnb_q']:8.2f} "
                  f"{m['ours_q'] / m['bnb_q']:6.2f} {1e3 * m['ours_dq']:16.2f} {1e3 * m['bnb_dq']:8.2f} "
                  f"{m['ours_dq'] / m['bnb_dq']:6.2f}")


if __name__ == "__main__":
    main()
