"""pefttutor's bottleneck adapters against AdapterHub's `adapters`, and against LoRA, on one BERT layer stack.

Runs in the side environment that tests/adapterhub/build.sh makes (adapters 1.3.0 needs transformers 4.57):

    ADAPTERHUB_VENV=/tmp/adapterhub bash tests/adapterhub/build.sh
    PYTHONPATH=. /tmp/adapterhub/bin/python benchmarks/adapter_layer.py [--sizes 768] [--layers 2] [--repeats 20]

For each placement it times forward + backward of the same BERT (hidden = size, 4 heads per 64 dims, FFN
4 x size) with AdapterHub's adapter and with pefttutor's, the adapters' weights copied, and prints medians
and the ratio ours / adapters; then a LoRA on W_q, W_v (r = 8) on the same model, for scale. The design's
budget for a layer is <= 1.15x the reference library. Times are medians over interleaved repeats.
"""
from __future__ import annotations

import copy

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from common import arguments, compare, device_line
from transformers import BertConfig, BertModel

from pefttutor import HoulsbyAdapter, LoRALinear, ParallelAdapter, PfeifferAdapter, inject

PLACEMENTS = {"pfeiffer": (SeqBnConfig, PfeifferAdapter), "houlsby": (DoubleSeqBnConfig, HoulsbyAdapter),
              "parallel": (ParBnConfig, ParallelAdapter)}


def copy_weights(theirs, ours):
    """adapters' ``...adapters.a.adapter_down.0`` / ``adapter_up`` -> pefttutor's ``...adapter.down`` / ``up``."""
    state = {}
    for k, v in theirs.state_dict().items():
        if ".adapters.a." in k:
            k = k.replace(".adapters.a.", ".adapter.").replace("adapter_down.0.", "down.").replace("adapter_up.", "up.")
            state[k] = v
    missing = set(state) - set(ours.state_dict())
    assert not missing, sorted(missing)[:3]
    ours.load_state_dict(state, strict=False)


def main():
    args, device = arguments(__doc__, sizes=[768], repeats=20, layers=2, reduction=16)
    print(f"{device_line(device)}, adapters {adapters.__version__}, transformers {transformers.__version__}")
    print(f"BERT with {args.layers} layers, x {args.batch}x{args.seq}, bottleneck size/{args.reduction}, "
          f"forward + backward, median of {args.repeats}, ms")
    print(f"{'size':>5s} {'placement':>9s} {'pefttutor':>10s} {'adapters':>9s} {'ours/adapters':>14s} "
          f"{'LoRA q,v r=8':>13s} {'ours/LoRA':>10s}")
    for size in args.sizes:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=size, num_hidden_layers=args.layers, num_attention_heads=max(1, size // 64),
                            intermediate_size=4 * size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config._attn_implementation = "eager"
        base = BertModel(config).to(device)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
        lora = inject(copy.deepcopy(base), LoRALinear, ["query", "value"], r=8, alpha=16)
        for name, (config_cls, ours_cls) in PLACEMENTS.items():
            theirs = copy.deepcopy(base)
            adapters.init(theirs)
            theirs.add_adapter("a", config=config_cls(reduction_factor=args.reduction, init_weights="bert"))
            theirs.train_adapter("a")
            ours = inject(copy.deepcopy(base), ours_cls, "auto", bottleneck=size // args.reduction,
                          scaling=4.0 if name == "parallel" else 1.0)
            copy_weights(theirs, ours)
            with torch.no_grad():
                gap = (ours(input_ids=ids).last_hidden_state - theirs(input_ids=ids).last_hidden_state).abs().max()
            models = {"pefttutor": ours, "adapters": theirs, "lora": lora}
            t = compare({k: (lambda m=m: m(input_ids=ids).last_hidden_state.sum().backward())
                         for k, m in models.items()}, args.repeats, device)
            print(f"{size:5d} {name:>9s} {1e3 * t['pefttutor']:10.2f} {1e3 * t['adapters']:9.2f} "
                  f"{t['pefttutor'] / t['adapters']:14.3f} {1e3 * t['lora']:13.2f} "
                  f"{t['pefttutor'] / t['lora']:10.3f}   (outputs agree to {gap:.1e})")


if __name__ == "__main__":
    main()
