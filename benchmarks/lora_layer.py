"""LoRALinear against peft's LoRA layer, and a merged LoRALinear against nn.Linear.

    python benchmarks/lora_layer.py [--sizes 4096] [--rank 16] [--batch 8] [--seq 128] [--repeats 20]

Prints median times and the two ratios the design budgets (forward + backward <= 1.15x peft's;
merged forward <= 1.02x nn.Linear). Times are medians over interleaved repeats, so slow drifts of
the machine hit both sides alike. Run it on an idle machine; the numbers are for that machine.
"""
from __future__ import annotations

import copy

import peft
import torch
from common import arguments, device_line, train_and_merged
from torch import nn

from pefttutor import LoRALinear


def one_size(size: int, args, device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(size, size).to(device)
    ours = LoRALinear(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank)
    ref = peft.tuners.lora.layer.Linear(copy.deepcopy(base), "default", config=config, r=args.rank,
                                        lora_alpha=2 * args.rank).to(device)
    ref.base_layer.requires_grad_(False)   # get_peft_model freezes the base; a standalone layer does not
    x = torch.randn(args.batch, args.seq, size, device=device, requires_grad=True)
    return train_and_merged({"pefttutor": ours, "peft": ref}, ours, base, x, args.repeats, device)


def main():
    args, device = arguments(__doc__, sizes=[4096], repeats=20, rank=16)
    print(f"{device_line(device)}, peft {peft.__version__}")
    print(f"r={args.rank}, x {args.batch}x{args.seq}xsize, median of {args.repeats}, ms")
    print(f"{'size':>5s} {'LoRALinear':>11s} {'peft':>9s} {'ours/peft':>10s} {'merged':>9s} {'Linear':>9s} "
          f"{'merged/Linear':>14s}   (budgets: train <= 1.15, merged <= 1.02)")
    for size in args.sizes:
        t = one_size(size, args, device)
        print(f"{size:5d} {1e3 * t['pefttutor']:11.2f} {1e3 * t['peft']:9.2f} {t['pefttutor'] / t['peft']:10.3f} "
              f"{1e3 * t['merged']:9.2f} {1e3 * t['linear']:9.2f} {t['merged'] / t['linear']:14.3f}")


if __name__ == "__main__":
    main()
