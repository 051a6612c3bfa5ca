"""KronA: a weight update with Kronecker structure, ΔW = s (A ⊗ B), applied without building it.

Defined in the chapter "KronA" (book/krona.ipynb). Edalati et al., 2022, arXiv 2212.10650.
KronALinear sits beside one linear layer and merges into it; KronABlock (the paper's KronA^B, and
KronA^B_res with ``residual=True``) sits beside a whole feed-forward block and does not merge.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import checks
from .inject import (AdapterLayer, AdapterModule, _matches, check_targets, is_linear, linear_shape,
                     refuse_adapted)


def divisor_pair(n: int) -> tuple[int, int]:
    """The factor pair (p, n // p) with p <= n // p closest to sqrt(n): 768 -> (24, 32), 13 -> (1, 13).

    The same choice as peft's LoKr ``factorization(n)``.
    """
    p = max(p for p in range(1, math.isqrt(n) + 1) if n % p == 0)
    return p, n // p


def kron_shapes(out_features: int, in_features: int, a_shape=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of A (a1, a2) and B (b1, b2) with a1 b1 = out_features and a2 b2 = in_features.

    ``a_shape=None`` takes the divisor pair closest to the square root of each dimension, smaller
    factor in A (as LoKr). A given ``a_shape`` must divide the layer; otherwise the error lists the
    choices that do.
    """
    if a_shape is None:
        (a1, b1), (a2, b2) = divisor_pair(out_features), divisor_pair(in_features)
        return (a1, a2), (b1, b2)
    ok = (isinstance(a_shape, (tuple, list)) and len(a_shape) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in a_shape))
    if ok and out_features % a_shape[0] == 0 and in_features % a_shape[1] == 0:
        a1, a2 = int(a_shape[0]), int(a_shape[1])
        return (a1, a2), (out_features // a1, in_features // a2)
    divisors = [[p for p in range(1, n + 1) if n % p == 0] for n in (out_features, in_features)]
    raise ValueError(
        f"Kronecker factor shape a_shape={a_shape!r} does not divide a layer with out_features="
        f"{out_features} and in_features={in_features}: A is (a1, a2) and B is (out_features / a1, "
        f"in_features / a2), so a1 must divide {out_features} (one of {divisors[0]}) and a2 must divide "
        f"{in_features} (one of {divisors[1]}). a_shape=None picks {kron_shapes(out_features, in_features)[0]}.")


def kron_apply(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ kron(A, B).T`` without building kron(A, B): (A ⊗ B) vec(X) = vec(A X Bᵀ) row-major.

    A (a1, a2), B (b1, b2), x (..., a2 b2) -> (..., a1 b1).
    """
    (a1, a2), (b1, b2) = A.shape, B.shape
    lead = x.shape[:-1]
    X = x.reshape(-1, a2, b2)                             # (N, a2, b2): row-major vec of each input
    T = torch.matmul(X, B.T)                              # (N, a2, b1) = X Bᵀ
    Y = torch.matmul(A, T)                                # (N, a1, b1) = A X Bᵀ
    return Y.reshape(*lead, a1 * b1)


class KroneckerFactors:
    """The factors A (a1, a2), B (b1, b2) and scale s that KronALinear and KronABlock share.

    A starts at zero (the adapted model is the base model at initialisation), B Kaiming-uniform, as
    in peft's LoKr.
    """

    @classmethod
    def check_factors(cls, d: int, k: int, a_shape, scale) -> tuple:
        """The factor shapes and the scale, checked (before the module changes anything)."""
        scale = checks.real("scale", scale, nonzero=True, who=f"{cls.__name__} ",
                            desc="a nonzero number (finite, not 0)")
        return kron_shapes(d, k, a_shape), scale

    def _init_factors(self, shapes, scale: float):
        (a1, a2), (b1, b2) = shapes
        self.scale = scale
        kw = dict(dtype=self.adapter_dtype(), device=self.base_device())
        self.A = nn.Parameter(torch.zeros(a1, a2, **kw))   # (a1, a2): zero, so ΔW = 0 at init
        self.B = nn.Parameter(torch.empty(b1, b2, **kw))   # (b1, b2)
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.A, self.B) * self.scale     # (out, in): for merging and inspection only

    def kron_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(self.A, self.B, x.to(self.A.dtype)) * self.scale


class KronALinear(KroneckerFactors, AdapterLayer):
    """``y = base(x) + scale * x @ kron(A, B).T`` with A (a1, a2), B (b1, b2), a1 b1 = out, a2 b2 = in.

    rank(A ⊗ B) = rank(A) rank(B), so a1 a2 + b1 b2 parameters can reach full rank. A starts at
    zero (the layer is the base layer at initialisation), B Kaiming-uniform, as in peft's LoKr.
    The forward pass uses the vec trick and never builds the (out, in) update.
    """

    def __init__(self, base: nn.Module, a_shape=None, scale: float = 1.0):
        shapes, scale = self.check_factors(*self.shape_of(base), a_shape, scale)
        super().__init__(base)
        self._init_factors(shapes, scale)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kron_forward(x)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, "
                f"scale={self.scale:g}")


def _ffn_style(module: nn.Module) -> str | None:
    """"single" for a block called as ffn(x) (Llama/GPT-2 ``mlp``); "bert" for BERT's
    ``BertOutput(h, x)``, which adds the residual x and applies LayerNorm itself; None otherwise."""
    name = type(module).__name__
    if name.endswith("Output") and "Self" not in name and hasattr(module, "dense") and hasattr(module, "LayerNorm"):
        return "bert"
    if name.endswith(("MLP", "FeedForward", "DenseActDense", "DenseGatedActDense")):   # T5: DenseReluDense
        return "single"
    return None


class KronABlock(KroneckerFactors, AdapterModule):
    """KronA^B: a Kronecker adapter in parallel with a whole feed-forward block.

    ``out = ffn(x) + scale * x @ kron(A, B).T`` (plus ``res_scale * x`` with ``residual=True``, the
    paper's KronA^B_res; ``res_scale`` is learnable and starts at 0 so the block starts as the base).
    The FFN is nonlinear, so this cannot merge into any weight. Wraps Llama/GPT-2-style ``mlp``
    modules and BERT/RoBERTa's ``output`` (whose residual and LayerNorm then see the adapter's term).
    """

    mergeable = False

    def __init__(self, base: nn.Module, a_shape=None, scale: float = 1.0, residual: bool = False):
        style = _ffn_style(base)
        if style is None:
            raise TypeError(f"KronABlock wraps a feed-forward block (a Llama/GPT-2 'mlp', BERT's "
                            f"'output' or T5's 'DenseReluDense'), got {type(base).__name__}")
        residual = checks.boolean("residual", residual, who="KronABlock ")
        if style == "bert":
            d = base.dense.out_features
        else:                                   # the FFN's first linear layer reads d_model inputs
            d = next(linear_shape(m) for m in base.modules() if is_linear(m))[1]
        shapes, scale = self.check_factors(d, d, a_shape, scale)
        super().__init__(base)
        self.style, self.d_model, self.residual = style, d, residual
        self._init_factors(shapes, scale)
        if self.residual:
            self.res_scale = nn.Parameter(torch.zeros((), dtype=self.A.dtype, device=self.A.device))

    @classmethod
    def find_targets(cls, model: nn.Module, targets="ffn") -> list[str]:
        """``"ffn"`` finds every feed-forward block; a list of name suffixes or a regex also works."""
        check_targets(targets)

        def select(names):
            return names if targets == "ffn" else [n for n in names if _matches(n, targets)]
        adapted = [n for n, m in model.named_modules() if isinstance(m, AdapterModule) and _ffn_style(m.base)]
        refuse_adapted(model, select(adapted), targets)
        blocks = [n for n, m in model.named_modules() if n and _ffn_style(m) and not n.endswith(".base")]
        found = select(blocks)
        if not found:
            raise ValueError(f"no feed-forward block of {type(model).__name__} matches targets={targets!r}; "
                             f"its blocks are {blocks[:4]}{' ...' if len(blocks) > 4 else ''}. "
                             f"Use targets='ffn' for all of them.")
        return found

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kron_forward(x)
        return out + self.res_scale * x.to(out.dtype) if self.residual else out

    def forward(self, *args, **kwargs):
        if self.style == "bert":                # BertOutput(h, x) = LayerNorm(dense(h) + x)
            h, x = args[0], args[1]
            return self.base(h, x + self.adapter_forward(x).to(x.dtype), *args[2:], **kwargs)
        x = args[0]
        y = self.base(*args, **kwargs)
        return y + self.adapter_forward(x).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, "
                f"scale={self.scale:g}, residual={self.residual}")
