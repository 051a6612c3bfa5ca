"""LoRA: a frozen weight plus a trainable low-rank update, ΔW = (alpha / r) B A.

Defined in the chapter "LoRA" (book/lora.ipynb). Hu et al., 2021, arXiv 2106.09685;
rank-stabilised scaling alpha / sqrt(r) from Kalajdzievski, 2023, arXiv 2312.03732.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import checks
from .checks import check_rank
from .inject import AdapterLayer


class LoRALinear(AdapterLayer):
    """``y = base(x) + scale * B A dropout(x)`` with A (r, in), B (out, r), scale = alpha / r.

    B starts at zero, so the layer is the base layer at initialisation; A is Kaiming-uniform
    (a = sqrt 5) as in the paper's code and peft. ``rslora=True`` scales by alpha / sqrt(r).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 rslora: bool = False):
        d, k = self.shape_of(base)
        r = check_rank(r, d, k, "LoRA", "(a rank at or above that trains more parameters than the full matrix)")
        alpha = checks.positive("alpha", alpha, who="LoRA ", hint=" (the scale is alpha / r)")
        dropout = checks.real("dropout", dropout, low=0, high=1, high_open=True, who="LoRA ")
        rslora = checks.boolean("rslora", rslora, who="LoRA ")
        super().__init__(base)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        kw = dict(dtype=self.adapter_dtype(), device=self.base_device())
        self.A = nn.Parameter(torch.empty(r, k, **kw))   # (r, in)
        self.B = nn.Parameter(torch.zeros(d, r, **kw))   # (out, r): zero, so ΔW = 0 at init
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale             # (out, in)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        return F.linear(F.linear(x, self.A), self.B) * self.scale   # never builds the (out, in) ΔW

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, rslora={self.rslora}"
