"""The idea of a paged optimizer, from scratch: AdamW whose state lives in CPU memory.

Defined in the chapter "QLoRA" (book/qlora.ipynb). bitsandbytes' paged optimizers put the state in
CUDA unified memory and let the driver move pages between GPU and CPU when memory runs short. Here
the moves are explicit: each parameter's two moments sit in (pinned, when CUDA is there) CPU memory
and visit the parameter's device one parameter at a time during ``step()``, so at most one
parameter's state is on the device at any moment. The updates are those of ``torch.optim.AdamW``.
"""
from __future__ import annotations

import math

import torch

from .. import checks


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov and Hutter, decoupled weight decay) with its state kept on ``state_device``.

    ``max_state_bytes_on_device`` records the most optimizer-state bytes that were on the
    parameters' device at once during a step (one parameter's moments).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_device="cpu"):
        who = "OffloadedAdamW "
        lr = checks.real("lr", lr, low=0, low_open=True, who=who, desc="a finite number (lr > 0)")
        eps = checks.real("eps", eps, low=0, low_open=True, who=who, desc="a finite number (eps > 0)")
        weight_decay = checks.real("weight_decay", weight_decay, low=0, who=who, desc="a finite number (weight_decay >= 0)")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{who}betas={betas!r} must be a pair (beta1, beta2), e.g. (0.9, 0.999)")
        betas = tuple(checks.real(f"betas[{i}]", b, low=0, high=1, high_open=True, who=who)
                      for i, b in enumerate(betas))
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_device = torch.device(state_device)
        self.max_state_bytes_on_device = 0

    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(p.shape, dtype=torch.float32, device=self.state_device)
        return t.pin_memory() if self.state_device.type == "cpu" and torch.cuda.is_available() else t

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=self._host_zeros(p), exp_avg_sq=self._host_zeros(p))
                state["step"] += 1
                t = state["step"]
                m = state["exp_avg"].to(p.device, non_blocking=True)       # page in
                v = state["exp_avg_sq"].to(p.device, non_blocking=True)
                self.max_state_bytes_on_device = max(self.max_state_bytes_on_device,
                                                     (m.numel() + v.numel()) * 4)
                g = p.grad.float()
                p.mul_(1 - lr * wd)                                         # decoupled weight decay
                m.lerp_(g, 1 - beta1)                                       # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)               # v = b2 v + (1 - b2) g²
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1 ** t))
                state["exp_avg"].copy_(m, non_blocking=True)               # page out
                state["exp_avg_sq"].copy_(v, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return loss
