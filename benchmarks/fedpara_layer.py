"""FedParaLinear against peft's LoHa layer at the same shapes, LoRA of rank 2r (the same number of
trainable parameters) beside them, and a merged FedParaLinear against nn.Linear.

    python benchmarks/fedpara_layer.py [--sizes 512 1024 2048 4096] [--rank 8] [--batch 8] [--seq 128]

LoHa builds ΔW = (w1a w1b) ⊙ (w2a w2b) at every step; FedParaLinear multiplies x by the r²-wide
Khatri-Rao factors instead when r² (d + k) < d k. Forward + backward with a frozen base, median over
interleaved repeats. Budgets: <= 1.15x the reference; merged forward <= 1.02x nn.Linear.
"""
from __future__ import annotations

import copy

import peft
import torch
from common import arguments, device_line, train_and_merged
from torch import nn

from pefttutor import FedParaLinear, LoRALinear


def one_size(size: int, args, device) -> dict:
    torch.manual_seed(0)
    r = args.rank
    base = nn.Linear(size, size).to(device)
    ours = FedParaLinear(copy.deepcopy(base), r=r, alpha=r).to(device)
    config = peft.LoHaConfig(r=r, alpha=r, init_weights=False)
    ref = peft.tuners.loha.layer.Linear(copy.deepcopy(base), "default", config=config, r=r, alpha=r).to(device)
    ref.base_layer.requires_grad_(False)
    lora = LoRALinear(copy.deepcopy(base), r=2 * r, alpha=2 * r).to(device)
    with torch.no_grad():
        for mine, theirs in [("X1", "hada_w1_a"), ("Y1", "hada_w1_b"), ("X2", "hada_w2_a"), ("Y2", "hada_w2_b")]:
            getattr(ours, mine).normal_(std=0.05)
            getattr(ref, theirs)["default"].copy_(getattr(ours, mine))
    x = torch.randn(args.batch, args.seq, size, device=device, requires_grad=True)
    t = train_and_merged({"fedpara": ours, "loha": ref, "lora": lora}, ours, base, x, args.repeats, device)
    err = (ours(x) - ref(x)).abs().max().item()
    return {"size": size, "err": err, **t}


def main():
    args, device = arguments(__doc__, rank=8)
    print(f"{device_line(device)}, peft {peft.__version__}")
    print(f"r={args.rank} (LoRA r={2 * args.rank}), x {args.batch}x{args.seq}xsize, "
          f"forward+backward in ms (median of {args.repeats})")
    print(f"{'size':>5s} {'FedPara':>9s} {'LoHa':>9s} {'LoRA':>9s} {'FedPara/LoHa':>13s} "
          f"{'merged/Linear':>14s} {'max|diff|':>10s}")
    for size in args.sizes:
        m = one_size(size, args, device)
        print(f"{size:5d} {1e3 * m['fedpara']:9.2f} {1e3 * m['loha']:9.2f} {1e3 * m['lora']:9.2f} "
              f"{m['fedpara'] / m['loha']:13.3f} {m['merged'] / m['linear']:14.3f} {m['err']:10.1e}")


if __name__ == "__main__":
    main()
