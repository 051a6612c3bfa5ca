"""AdaLoRA: a LoRA update in SVD form whose rank moves to the matrices that need it.

Derived in the chapter "AdaLoRA" (book/adalora.ipynb). Zhang et al., 2023, arXiv 2303.10512; the details
(initialisation, the 1e-5 in the scale, the orthogonality loss as a mean of Frobenius norms, the
budget schedule and the masking) follow peft's implementation, against which the tests compare.

Each wrapped layer holds ΔW = P Λ Q (here B, E, A: B (out, r), E (r, 1) the singular values, A
(r, in)), scaled by alpha / r. A :class:`RankAllocator` scores each triplet (P_i, λ_i, Q_i) by the
smoothed sensitivity |w · ∂L/∂w| of its entries times its uncertainty, lowers the total number of
triplets kept (the budget) on a cubic schedule from ``r`` per matrix to ``target_r`` per matrix,
and sets the λ of the least important triplets to zero.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from . import checks
from .checks import check_rank
from .inject import AdapterLayer, adapter_layers


class AdaLoRALinear(AdapterLayer):
    """``y = base(x) + alpha / (r + 1e-5) * B (E ⊙ A) dropout(x)``.

    E (the singular values) starts at zero, so the layer is the base layer at initialisation; A
    and B start from N(0, 0.02²), as in peft. ``r`` is the initial rank; the allocator masks
    entries of E. The scale divides by the initial rank whatever the current one (peft's
    ``ranknum`` stays at r), so masking a triplet does not rescale the others.
    """

    def __init__(self, base: nn.Module, r: int = 12, alpha: float = 8, dropout: float = 0.0):
        d, k = self.shape_of(base)
        r = check_rank(r, d, k, "AdaLoRA", "(the initial rank, lowered by the allocator)")
        alpha = checks.positive("alpha", alpha, who="AdaLoRA ", hint=" (the scale is alpha / r)")
        dropout = checks.real("dropout", dropout, low=0, high=1, high_open=True, who="AdaLoRA ")
        super().__init__(base)
        self.r, self.alpha = r, alpha
        self.scale = alpha / (r + 1e-5)
        kw = dict(dtype=self.adapter_dtype(), device=self.base_device())
        self.A = nn.Parameter(torch.randn(r, k, **kw) * 0.02)   # right singular vectors, (r, in)
        self.E = nn.Parameter(torch.zeros(r, 1, **kw))           # singular values, (r, 1)
        self.B = nn.Parameter(torch.randn(d, r, **kw) * 0.02)   # left singular vectors, (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._allocator = None
        self.unallocated = 0          # training forwards since the allocator last ran

    @property
    def rank(self) -> int:
        """Triplets in use: the number of nonzero singular values."""
        return int((self.E != 0).sum())

    def delta_weight(self) -> torch.Tensor:
        return self.B @ (self.A * self.E) * self.scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._watch()
        x = self.dropout(x.to(self.A.dtype))
        return F.linear(F.linear(x, self.A * self.E), self.B) * self.scale

    def _watch(self):
        allocator = self._allocator() if self._allocator is not None else None
        self.unallocated += 1
        if allocator is None:
            if self.unallocated == 1:
                warnings.warn("AdaLoRA layers are training without a RankAllocator, so no rank is ever "
                              "reallocated (this is LoRA in SVD form at a fixed rank). Create one with "
                              "pefttutor.adalora.RankAllocator(model, target_r=..., total_step=...) before "
                              "training; pefttutor.train calls it after every step, or call "
                              "allocator.update_and_allocate(step) yourself after optimizer.step().",
                              stacklevel=4)
        elif self.unallocated > allocator.patience and not allocator.warned:
            allocator.warned = True
            warnings.warn(f"AdaLoRA: {self.unallocated} training forward passes since the RankAllocator "
                          f"last ran. Call allocator.update_and_allocate(step) after each optimizer.step() "
                          f"(before zero_grad), or train with pefttutor.train, which does.", stacklevel=4)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


def orthogonal_loss(model: nn.Module) -> torch.Tensor:
    """The mean over every A and every B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F (not squared; peft's
    form of the paper's R(P, Q))."""
    layers = [m for m in adapter_layers(model).values() if isinstance(m, AdaLoRALinear)]
    if not layers:
        raise ValueError("orthogonal_loss: the model has no AdaLoRALinear layers")
    return _orthogonal_loss(layers)


def _orthogonal_loss(layers) -> torch.Tensor:
    terms = []
    for layer in layers:
        for gram in (layer.A @ layer.A.T, layer.B.T @ layer.B):
            eye = torch.eye(len(gram), device=gram.device, dtype=gram.dtype)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


class RankAllocator:
    """The budget schedule and the masking of AdaLoRA, attached to a model with AdaLoRA layers.

    ``update_and_allocate(step)`` (steps counted from 1) after each optimizer step and before
    ``zero_grad``: up to ``total_step - tfinal`` it updates the importance scores from the current
    gradients; during the first ``tinit`` steps the budget is every triplet; then the budget
    falls on a cubic curve to ``target_r`` per matrix, masking every ``deltaT`` steps; at step
    ``total_step - tfinal`` the final mask is fixed and kept for the remaining steps.
    ``regularization()`` is the orthogonality loss times ``orth_reg_weight``; ``pefttutor.train``
    adds it to the loss and calls the allocator.
    """

    def __init__(self, model: nn.Module, *, target_r: int = 8, total_step: int, tinit: int = 0,
                 tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.5, patience: int = 64):
        layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, AdaLoRALinear)}
        if not layers:
            raise ValueError("RankAllocator: the model has no AdaLoRA layers; inject(model, AdaLoRALinear, "
                             "targets, r=12) first")
        who = "RankAllocator "
        total_step = checks.integer("total_step", total_step, low=1, who=who)
        tinit = checks.integer("tinit", tinit, low=0, who=who)
        tfinal = checks.integer("tfinal", tfinal, low=0, who=who)
        if tinit + tfinal >= total_step:
            raise ValueError(f"RankAllocator: tinit={tinit} warm-up steps + tfinal={tfinal} final steps leave "
                             f"no budgeting phase in total_step={total_step}: the rank would never move. "
                             f"Make tinit + tfinal < total_step (the paper spends most steps budgeting), "
                             f"e.g. tinit={total_step // 10}, tfinal={total_step // 5}.")
        rs = sorted({m.r for m in layers.values()})
        target_r = checks.integer("target_r", target_r, low=0, who=who)
        if target_r > min(rs):
            raise ValueError(f"RankAllocator: target_r={target_r} per matrix is above the initial rank "
                             f"r={min(rs)} of the AdaLoRA layers: the budget only falls. Use target_r "
                             f"<= {min(rs)}, or inject with a larger r.")
        self.deltaT = checks.integer("deltaT", deltaT, low=1, who=who)
        self.beta1 = checks.real("beta1", beta1, low=0, high=1, low_open=True, high_open=True, who=who)
        self.beta2 = checks.real("beta2", beta2, low=0, high=1, low_open=True, high_open=True, who=who)
        self.orth_reg_weight = checks.real("orth_reg_weight", orth_reg_weight, low=0, who=who)
        self.patience = checks.integer("patience", patience, low=1, who=who)
        self.layers, self.target_r, self.total_step = layers, target_r, total_step
        self.tinit, self.tfinal = tinit, tfinal
        self.init_budget = sum(m.r for m in layers.values())
        self.target_budget = target_r * len(layers)
        self.avg_ipt: dict[str, torch.Tensor] = {}
        self.avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budgets: list[tuple[int, int]] = []          # (step, budget) at each masking
        self.last_step, self.warned = 0, False
        for m in layers.values():
            m._allocator, m.unallocated = weakref.ref(self), 0
        model.pefttutor_allocator = self

    # -- the schedule
    def budget(self, step: int) -> tuple[int, bool]:
        """(total budget, whether to mask) at ``step``."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        c = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((self.init_budget - self.target_budget) * c ** 3 + self.target_budget), step % self.deltaT == 0

    # -- importance
    def _named(self):
        for name, m in self.layers.items():
            for p in ("A", "E", "B"):
                yield f"{name}.{p}", getattr(m, p)

    @torch.no_grad()
    def update_importance(self):
        """Sensitivity I = |w · grad| per entry, smoothed (beta1), and its uncertainty (beta2)."""
        for key, p in self._named():
            if p.grad is None:
                raise RuntimeError(f"RankAllocator: {key} has no gradient. Call update_and_allocate(step) after "
                                   f"loss.backward() and before optimizer.zero_grad().")
            ipt = (p * p.grad).abs()
            if key not in self.avg_ipt:
                self.avg_ipt[key], self.avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            self.avg_ipt[key] = self.beta1 * self.avg_ipt[key] + (1 - self.beta1) * ipt
            self.avg_unc[key] = self.beta2 * self.avg_unc[key] + (1 - self.beta2) * (ipt - self.avg_ipt[key]).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Each layer's triplet scores, (r,): S(λ_i) + mean_j S(A_ij) + mean_j S(B_ji), with
        S = smoothed sensitivity × uncertainty."""
        s = {k: self.avg_ipt[k] * self.avg_unc[k] for k in self.avg_ipt}
        return {n: s[f"{n}.E"].view(-1) + (s[f"{n}.A"].mean(1) + s[f"{n}.B"].mean(0)).view(-1)
                for n in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        pattern = {}
        for n, m in self.layers.items():
            keep = scores[n] > threshold
            m.E.masked_fill_(~keep[:, None], 0.0)
            pattern[n] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self):
        for n, m in self.layers.items():
            keep = torch.tensor(self.rank_pattern[n], device=m.E.device)
            m.E.masked_fill_(~keep[:, None], 0.0)

    def update_and_allocate(self, step: int):
        """One step of the allocator (``step`` counts optimizer steps from 1)."""
        step = checks.integer("step", step, low=0, who="update_and_allocate ")
        self.last_step = step
        for m in self.layers.values():
            m.unallocated = 0
        final = self.total_step - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
                self.budgets.append((step, budget))
        elif step == final:
            budget, _ = self.budget(step)
            self.rank_pattern = self.mask_to_budget(budget)
            self.budgets.append((step, budget))
            self.avg_ipt, self.avg_unc = {}, {}
        elif self.rank_pattern is not None:
            self.apply_pattern()

    # -- the loss term and the result
    def regularization(self) -> torch.Tensor:
        return self.orth_reg_weight * _orthogonal_loss(self.layers.values())

    def ranks(self) -> dict[str, int]:
        """Each layer's rank now (nonzero singular values)."""
        return {n: m.rank for n, m in self.layers.items()}

