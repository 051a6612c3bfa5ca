"""BitFit: train only the bias terms.

Defined in the chapter "BitFit" (book/bitfit.ipynb). Ben Zaken et al., 2022, arXiv 2106.10199.

Every bias of a linear layer or a LayerNorm is added last: ``y = f(x) + b``. Training b from its
pretrained value is the same as training a delta δ from zero and using ``f(x) + b + δ``: the
gradient with respect to δ is the gradient with respect to b. This module keeps the pretrained b
frozen and trains δ, so BitFit follows the package's conventions: the model is unchanged at
initialisation, an adapter file holds only the deltas, and ``merge`` folds δ into b.

The paper's subset trains the query biases and the intermediate (first) feed-forward biases only.
Architectures without biases (Llama, Mistral: linear layers and RMSNorm without b) have nothing for
BitFit to train, and say so.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .inject import HEADS, AdapterModule, Conv1D, adapter_layers, check_targets, refuse_adapted

# The paper's subset: the query biases and the intermediate feed-forward biases.
PAPER_SUBSET = {"bert": ["attention.self.query", "intermediate.dense"],
                "roberta": ["attention.self.query", "intermediate.dense"],
                "gpt2": ["attn.c_attn", "mlp.c_fc"]}     # GPT-2 fuses q, k, v: c_attn holds all three


def has_bias(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm))
            and isinstance(getattr(module, "bias", None), nn.Parameter))


def bias_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules BitFit can wrap: linear layers and LayerNorms with a bias."""
    return [n for n, m in model.named_modules() if has_bias(m) and not n.endswith(".base")]


class BitFit(AdapterModule):
    """``y = base(x) + delta``: the base module's bias moves by a trainable ``delta`` (zero at
    initialisation). Wraps ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.LayerNorm``."""

    def __init__(self, base: nn.Module):
        if not has_bias(base):
            raise TypeError(f"BitFit wraps a linear layer or a LayerNorm that has a bias, got "
                            f"{type(base).__name__} with bias={getattr(base, 'bias', None)!r}")
        super().__init__(base)
        b = base.bias
        dtype = b.dtype if b.dtype in (torch.float32, torch.float64) else torch.float32
        self.delta = nn.Parameter(torch.zeros(b.shape, dtype=dtype, device=b.device))

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @classmethod
    def find_targets(cls, model: nn.Module, targets) -> list[str]:
        """``"all"``: every bias outside the heads; ``"paper"``: the query and intermediate
        feed-forward biases; or name suffixes / one regular expression, as for ``inject``."""
        names = bias_names(model)
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if not names:
            raise ValueError(f"BitFit: {type(model).__name__} has no bias terms ({kind}'s linear layers and "
                             f"norms have none, as in Llama and Mistral), so BitFit has nothing to train. "
                             f"Use a method that adds weights instead: LoRA, (IA)3 or an adapter.")
        if targets == "paper":
            if kind not in PAPER_SUBSET:
                raise ValueError(f"BitFit targets='paper' knows {sorted(PAPER_SUBSET)}, not {kind!r}: pass "
                                 f"the module names, e.g. from pefttutor.bitfit.bias_names(model)")
            targets = PAPER_SUBSET[kind]
        if targets == "all":
            found = [n for n in names if not set(n.split(".")) & set(HEADS)]
        else:
            check_targets(targets)
            if isinstance(targets, str):
                found = [n for n in names if re.fullmatch(targets, n)]
            else:
                found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        adapted = [n for n in adapter_layers(model) if n in found or any(n.startswith(f + ".") for f in found)]
        refuse_adapted(model, adapted, targets)
        if not found:
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise ValueError(f"BitFit: no module with a bias of {type(model).__name__} matches "
                             f"targets={targets!r}. Modules with biases end in {suffixes}, for example "
                             f"{names[:3]}; or use targets='all' / 'paper'.")
        return found

    def forward(self, *args, **kwargs):
        y = self.base(*args, **kwargs)
        return y if self.merged else y + self.delta.to(y.dtype)

    def check_mergeable(self):
        pass

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.bias.add_(self.delta.to(self.base.bias.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.bias.sub_(self.delta.to(self.base.bias.dtype))
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}({self.delta.numel()} biases), merged={self.merged}"
