"""FedPara: a Hadamard product of two low-rank matrices, rank up to r² from 2r(d + k) parameters.

Defined in the chapter "FedPara" (book/fedpara.ipynb). Hyeon-Woo et al., 2022, arXiv 2108.06098.
``FedParaLinear`` is the PEFT form (an update beside a frozen layer, peft's LoHa); ``HadamardLinear``
is the paper's own use, a whole weight trained from scratch, and with ``personal=True`` pFedPara's
W = W1 ⊙ (W2 + 1), where W1 is shared with the server and W2 stays on the client.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import checks
from .checks import check_rank
from .inject import AdapterLayer


def _check_rank(r, d: int, k: int, who: str) -> int:
    return check_rank(r, d, k, who, f"Each factor product has rank r and their Hadamard product rank up "
                                    f"to r^2, so r = {math.ceil(math.sqrt(min(d, k)))} already allows full rank")


def khatri_rao(X1: torch.Tensor, Y1: torch.Tensor, X2: torch.Tensor, Y2: torch.Tensor):
    """P (d, r²) and Q (r², k) with P @ Q = (X1 @ Y1) ⊙ (X2 @ Y2): row-wise Kronecker products.

    ((X1 Y1) ⊙ (X2 Y2))[i, j] = Σ_ab X1[i,a] X2[i,b] Y1[a,j] Y2[b,j], one rank-one term per (a, b).
    """
    d, r = X1.shape
    P = (X1[:, :, None] * X2[:, None, :]).reshape(d, r * r)          # (d, r²)
    Q = (Y1[:, None, :] * Y2[None, :, :]).reshape(r * r, Y1.shape[1])  # (r², k)
    return P, Q


def hadamard_apply(X1, Y1, X2, Y2, x: torch.Tensor) -> torch.Tensor:
    """``x @ ((X1 @ Y1) * (X2 @ Y2)).T``, through the r²-wide factors when that is cheaper."""
    (d, r), k = X1.shape, Y1.shape[1]
    if r * r * (d + k) < d * k:
        P, Q = khatri_rao(X1, Y1, X2, Y2)
        return F.linear(F.linear(x, Q), P)            # (..., k) -> (..., r²) -> (..., d)
    return F.linear(x, (X1 @ Y1) * (X2 @ Y2))


class FedParaLinear(AdapterLayer):
    """``y = base(x) + x @ ΔW.T`` with ΔW = (X1 Y1) ⊙ (X2 Y2) · alpha / r (peft's LoHa).

    X1, X2 are (out, r) and Y1, Y2 are (r, in) (the paper's Yᵀ). Y2 starts at zero, so the layer
    is the base layer at initialisation; the other factors are Kaiming-uniform (a = sqrt 5), as in peft.
    Trainable parameters: 2 r (out + in), the same as LoRA of rank 2r, but ΔW can reach rank r².
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8):
        d, k = self.shape_of(base)
        r = _check_rank(r, d, k, "FedPara")
        alpha = checks.positive("alpha", alpha, who="FedPara ", hint=" (the scale is alpha / r)")
        super().__init__(base)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        kw = dict(dtype=self.adapter_dtype(), device=self.base_device())
        self.X1 = nn.Parameter(torch.empty(d, r, **kw))
        self.Y1 = nn.Parameter(torch.empty(r, k, **kw))
        self.X2 = nn.Parameter(torch.empty(d, r, **kw))
        self.Y2 = nn.Parameter(torch.zeros(r, k, **kw))   # zero, so ΔW = 0 at init
        for p in (self.X1, self.Y1, self.X2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.X1 @ self.Y1) * (self.X2 @ self.Y2) * self.scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_apply(self.X1, self.Y1, self.X2, self.Y2, x.to(self.X1.dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


class HadamardLinear(nn.Module):
    """A linear layer whose whole weight is FedPara-parameterised, for training from scratch.

    ``W = (X1 Y1) ⊙ (X2 Y2)``; with ``personal=True`` it is pFedPara's ``W = W1 ⊙ (W2 + 1)``, W1 = X1 Y1
    global (sent to the server), W2 = X2 Y2 local. Factors are drawn from a normal distribution scaled
    so that W has He's variance 2 / in_features, the aim of the paper's He initialisation.
    """

    def __init__(self, in_features: int, out_features: int, r: int, bias: bool = True,
                 personal: bool = False):
        super().__init__()
        in_features = checks.integer("in_features", in_features, low=1, who="HadamardLinear ")
        out_features = checks.integer("out_features", out_features, low=1, who="HadamardLinear ")
        r = _check_rank(r, out_features, in_features, "HadamardLinear")
        bias = checks.boolean("bias", bias, who="HadamardLinear ")
        personal = checks.boolean("personal", personal, who="HadamardLinear ")
        self.in_features, self.out_features, self.r, self.personal = in_features, out_features, r, personal
        target = 2.0 / in_features                        # He: Var(W) = 2 / fan_in
        # FedPara: Var(W1 ⊙ W2) = (r s⁴)², pFedPara: Var(W1) = r s⁴ (W2 starts near 0)
        std = (target / r ** 2) ** 0.125 if not personal else (target / r) ** 0.25
        self.X1 = nn.Parameter(torch.randn(out_features, r) * std)
        self.Y1 = nn.Parameter(torch.randn(r, in_features) * std)
        self.X2 = nn.Parameter(torch.randn(out_features, r) * std)
        self.Y2 = nn.Parameter(torch.randn(r, in_features) * std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        W1, W2 = self.X1 @ self.Y1, self.X2 @ self.Y2
        return W1 * (W2 + 1) if self.personal else W1 * W2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = hadamard_apply(self.X1, self.Y1, self.X2, self.Y2, x)
        if self.personal:
            y = y + F.linear(F.linear(x, self.Y1), self.X1)   # W1 ⊙ (W2 + 1) = W1 ⊙ W2 + W1
        return y if self.bias is None else y + self.bias

    def global_names(self) -> list[str]:
        """Parameters a client sends each round: all of them, or W1's factors (and bias) for pFedPara."""
        names = ["X1", "Y1"] if self.personal else ["X1", "Y1", "X2", "Y2"]
        return names + (["bias"] if self.bias is not None else [])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"personal={self.personal}")
