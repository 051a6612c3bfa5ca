"""Inference latency of adapters against a merged LoRA (the LoRA paper's Table 1, on this machine).

    python benchmarks/adapter_latency.py [--batches 1 4 16 32] [--seqs 32 128 512] [--repeats 15]

A GPT-2-medium-shaped decoder (d = 1024, 24 layers, random weights: latency does not depend on them;
``--layers`` and ``--size`` shrink it) runs forward passes without gradients. A merged LoRA costs exactly what
the base model costs, so the base stands for it. Against it: Houlsby adapters (two per layer), a Pfeiffer
adapter (one per layer) and a parallel adapter, each with bottleneck ``--bottleneck``. Prints the median
latency in ms and each adapter's overhead in percent for every batch size and sequence length.
"""
from __future__ import annotations

import argparse
import copy

import torch
from common import compare, device_line
from transformers import GPT2Config, GPT2Model

from pefttutor import HoulsbyAdapter, ParallelAdapter, PfeifferAdapter, inject


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seqs", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=args.size, n_layer=args.layers, n_head=args.size // 64, n_positions=max(args.seqs))
    base = GPT2Model(config).to(device).eval()
    models = {"merged LoRA": base}
    for cls in (HoulsbyAdapter, PfeifferAdapter, ParallelAdapter):
        models[cls.__name__] = inject(copy.deepcopy(base), cls, "auto", bottleneck=args.bottleneck).eval()
    print(device_line(device))
    print(f"GPT-2 shape d={args.size}, {args.layers} layers, bottleneck {args.bottleneck}; median of "
          f"{args.repeats}, ms (overhead against the merged LoRA in %)")
    print(f"{'batch':>5s} {'seq':>5s} " + " ".join(f"{k:>22s}" for k in models))
    for batch in args.batches:
        for seq in args.seqs:
            ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
            with torch.no_grad():
                t = compare({k: (lambda m=m: m(input_ids=ids)) for k, m in models.items()}, args.repeats, device)
            base_t = t["merged LoRA"]
            cells = [f"{1e3 * base_t:22.2f}"] + [f"{1e3 * v:13.2f} ({100 * (v / base_t - 1):+5.1f}%)"
                                                 for k, v in t.items() if k != "merged LoRA"]
            print(f"{batch:5d} {seq:5d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
