"""(IA)3: learned vectors that rescale keys, values and the feed-forward activations.

Defined in the chapter "(IA)3 and T-Few" (book/ia3.ipynb). Liu et al., 2022, arXiv 2205.05638.

An (IA)3 layer multiplies, element by element, either the output of a linear layer (the keys and
values: ``y = l * (W x + b)``) or the input of the feed-forward down projection (``y = W (l * x) + b``,
which is the paper's rescaling of the feed-forward activations). The vector ``l`` starts at ones, so
the model is unchanged at initialisation, and it folds into the weight: rows of W (and b) for an
output scale, columns of W for an input scale. That is peft's convention, and the tests compare
against it.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from . import checks
from .inject import AdapterLayer, Conv1D, atomic, find_targets, inject

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and the feed-forward mapping)
IA3_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
               "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
               "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"]}
IA3_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                   "gpt2": ["mlp.c_proj"], "bert": ["output.dense"], "roberta": ["output.dense"]}


class IA3Linear(AdapterLayer):
    """``y = l * base(x)`` (``feedforward=False``: keys, values) or ``y = base(l * x)``
    (``feedforward=True``: the feed-forward down projection). ``l`` starts at ones."""

    def __init__(self, base: nn.Module, feedforward: bool = False):
        feedforward = checks.boolean("feedforward", feedforward, who="IA3Linear ")
        super().__init__(base)
        self.feedforward = feedforward
        n = self.in_features if feedforward else self.out_features
        self.scale = nn.Parameter(torch.ones(n, dtype=self.adapter_dtype(), device=self.base_device()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base((x * self.scale).to(x.dtype))
        y = self.base(x)
        return (y * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The merged weight minus the base weight, (out, in). (IA)3 rescales the bias too when it
        scales outputs, which a ΔW cannot express: ``merge`` handles the bias."""
        W = self._weight_out_in()
        return W * (self.scale[None, :] if self.feedforward else self.scale[:, None]) - W

    def _weight_out_in(self) -> torch.Tensor:
        W = self.base.weight
        return W.T if isinstance(self.base, Conv1D) else W

    @torch.no_grad()
    def _rescale(self, factor: torch.Tensor):
        W = self.base.weight
        if isinstance(self.base, Conv1D):          # stored (in, out)
            W.mul_((factor[:, None] if self.feedforward else factor[None, :]).to(W.dtype))
        else:
            W.mul_((factor[None, :] if self.feedforward else factor[:, None]).to(W.dtype))
        if not self.feedforward and self.base.bias is not None:
            self.base.bias.mul_(factor.to(self.base.bias.dtype))

    def merge(self):
        if not self.merged:
            self.check_mergeable()
            self._rescale(self.scale)
            self.merged = True
        return self

    def unmerge(self):
        if self.merged:
            if bool((self.scale == 0).any()):
                raise ValueError("cannot unmerge IA3Linear: some entries of its scale vector are 0, so the "
                                 "merge erased those rows or columns of the weight. Reload the base model's "
                                 "weights instead.")
            self._rescale(1.0 / self.scale)
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.feedforward}"


def default_targets(model) -> tuple[list[str], list[str]]:
    """(targets, feedforward modules) of peft's defaults for the model's architecture."""
    kind = model.config.model_type
    if kind not in IA3_TARGETS:
        raise ValueError(f"(IA)3 has no default targets for the {kind!r} architecture: pass targets=[...] and "
                         f"feedforward=[...] (the key and value projections and the feed-forward down "
                         f"projection; see pefttutor.linear_names(model))")
    return IA3_TARGETS[kind], IA3_FEEDFORWARD[kind]


def inject_ia3(model: nn.Module, targets="auto", feedforward="auto", *, modules_to_save=()) -> nn.Module:
    """Inject (IA)3 the way peft's ``IA3Config(target_modules, feedforward_modules)`` does:
    ``targets`` scale their outputs, those of them also in ``feedforward`` scale their inputs.

    ``"auto"`` takes peft's defaults for the architecture (Llama: k_proj, v_proj, down_proj with
    down_proj feed-forward). Feed-forward modules must be among the targets. Two ``inject`` calls
    are recorded, so ``save_adapter`` / ``load_adapter`` restore both kinds."""
    if targets == "auto" or feedforward == "auto":
        auto_targets, auto_ff = default_targets(model)
        targets = auto_targets if targets == "auto" else targets
        feedforward = auto_ff if feedforward == "auto" else feedforward
    feedforward = list(feedforward or [])
    names = find_targets(model, targets)
    ff = find_targets(model, feedforward) if feedforward else []
    outside = sorted(set(ff) - set(names))
    if outside:
        raise ValueError(f"(IA)3 feedforward modules must be among its targets: {outside[:3]} match "
                         f"feedforward={feedforward!r} but not targets={targets!r}. Add them to the "
                         f"targets, or leave them out of feedforward.")
    rest = [n for n in names if n not in ff]
    with atomic(model):
        if rest:
            inject(model, IA3Linear, "|".join(re.escape(n) for n in rest), modules_to_save=modules_to_save)
        if ff:
            inject(model, IA3Linear, "|".join(re.escape(n) for n in ff), feedforward=True,
                   modules_to_save=() if rest else modules_to_save)
    return model
