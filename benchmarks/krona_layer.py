"""KronALinear (vec trick) against peft's LoKr layer (which builds kron(w1, w2)) and LoRA at the
same trainable-parameter count; and a merged KronALinear against nn.Linear.

    python benchmarks/krona_layer.py [--sizes 512 1024 2048 4096] [--batch 8] [--seq 128] [--repeats 10]

Forward + backward of one layer with a frozen base, median over interleaved repeats. The design
budgets: forward + backward <= 1.15x the reference library's; merged forward <= 1.02x nn.Linear.
Run it on an idle machine; the numbers are for that machine.
"""
from __future__ import annotations

import copy

import peft
import torch
from common import arguments, device_line, train_and_merged
from torch import nn

from pefttutor import KronALinear, LoRALinear


def lokr_layer(base: nn.Linear):
    """peft's LoKr with both factors full: r at least half the larger factor side (w1 is always full)."""
    r = base.out_features       # large enough that use_w2 holds for any factorisation
    config = peft.LoKrConfig(r=r, alpha=r, init_weights=False)
    layer = peft.tuners.lokr.layer.Linear(base, "default", config=config, r=r, alpha=r)
    layer.base_layer.requires_grad_(False)
    return layer


def one_size(size: int, args, device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(size, size).to(device)
    ours = KronALinear(copy.deepcopy(base)).to(device)
    ref = lokr_layer(copy.deepcopy(base)).to(device)
    n_kron = ours.A.numel() + ours.B.numel()
    lora = LoRALinear(copy.deepcopy(base), r=max(1, round(n_kron / (2 * size)))).to(device)
    with torch.no_grad():
        ours.A.normal_(std=0.02)   # the size of a trained factor, not of a random N(0, 1)
        ref.lokr_w1["default"].copy_(ours.A)
        ref.lokr_w2["default"].copy_(ours.B)
    x = torch.randn(args.batch, args.seq, size, device=device, requires_grad=True)
    t = train_and_merged({"krona": ours, "lokr": ref, "lora": lora}, ours, base, x, args.repeats, device)
    err = (ours(x) - ref(x)).abs().max().item()
    return {"size": size, "params": n_kron, "lora_r": lora.r, "err": err, **t}


def main():
    args, device = arguments(__doc__)
    print(f"{device_line(device)}, peft {peft.__version__}")
    print(f"x {args.batch}x{args.seq}xsize, forward+backward in ms (median of {args.repeats})")
    print(f"{'size':>5s} {'params':>7s} {'KronA':>9s} {'LoKr':>9s} {'LoRA(r)':>12s} {'KronA/LoKr':>11s} "
          f"{'merged/Linear':>14s} {'max|diff|':>10s}")
    for size in args.sizes:
        m = one_size(size, args, device)
        print(f"{size:5d} {m['params']:7d} {1e3 * m['krona']:9.2f} {1e3 * m['lokr']:9.2f} "
              f"{1e3 * m['lora']:8.2f}({m['lora_r']:2d}) {m['krona'] / m['lokr']:11.3f} "
              f"{m['merged'] / m['linear']:14.3f} {m['err']:10.1e}")


if __name__ == "__main__":
    main()
