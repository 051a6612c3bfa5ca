"""LoRALinear against peft's LoRA layer, and a merged LoRALinear against nn.Linear.

    python benchmarks/lora_layer.py [--size 4096] [--rank 16] [--batch 8] [--seq 128] [--repeats 20]

Prints median times and the two ratios the design budgets (forward + backward <= 1.15x peft's;
merged forward <= 1.02x nn.Linear). Times are medians over interleaved repeats, so slow drifts of
the machine hit both sides alike. Run it on an idle machine; the numbers are for that machine.
"""
from __future__ import annotations

import argparse
import copy

import peft
import torch
from common import compare, device_line
from torch import nn

from pefttutor import LoRALinear


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = nn.Linear(args.size, args.size).to(device)
    ours = LoRALinear(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank)
    ref = peft.tuners.lora.layer.Linear(copy.deepcopy(base), "default", config=config, r=args.rank,
                                        lora_alpha=2 * args.rank).to(device)
    ref.base_layer.requires_grad_(False)   # get_peft_model freezes the base; a standalone layer does not
    x = torch.randn(args.batch, args.seq, args.size, device=device, requires_grad=True)

    def step(layer):
        return lambda: layer(x).sum().backward()

    train = compare({"pefttutor": step(ours), "peft": step(ref)}, args.repeats, device)
    merged = copy.deepcopy(ours).merge()
    with torch.no_grad():
        infer = compare({"merged": lambda: merged(x), "nn.Linear": lambda: base(x)}, args.repeats, device)
    print(f"{device_line(device)}, peft {peft.__version__}")
    print(f"shape {args.size}x{args.size}, r={args.rank}, x {args.batch}x{args.seq}x{args.size}, "
          f"median of {args.repeats}")
    print(f"{'what':38s} {'ms':>9s}")
    for label, t in [("forward+backward LoRALinear", train["pefttutor"]),
                     ("forward+backward peft lora.Linear", train["peft"]),
                     ("forward merged LoRALinear", infer["merged"]),
                     ("forward nn.Linear", infer["nn.Linear"])]:
        print(f"{label:38s} {1e3 * t:9.2f}")
    print(f"ratio train  pefttutor / peft     = {train['pefttutor'] / train['peft']:.3f}  (budget <= 1.15)")
    print(f"ratio merged LoRALinear / Linear  = {infer['merged'] / infer['nn.Linear']:.3f}  (budget <= 1.02)")


if __name__ == "__main__":
    main()
