"""A linear layer stored in NF4, for QLoRA: 4-bit weights, dequantized to the compute dtype on the fly.

Defined in the chapter "QLoRA" (book/qlora.ipynb). Put a LoRA on top with the usual injector:
``inject(quantize_model(model), LoRALinear, "all-linear", r=16)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks
from ..inject import Conv1D, _matches, adapter_layers, atomic, find_targets, is_quantized
from .nf4 import NF4State, check_blocksize, dequantize_nf4, quantize_nf4


class _DequantizeMatmul(torch.autograd.Function):
    """y = x Wᵀ with W rebuilt from 4 bits in forward and again in backward, so autograd keeps no
    full-precision copy of W between the two (as bitsandbytes' MatMul4Bit).

    Rounding follows bitsandbytes: forward dequantizes straight into the compute dtype; backward
    dequantizes into the stored weight's dtype and then casts to the gradient's (they differ only when
    the weight was 16-bit and the compute dtype is fp32)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:                 # W in its stored dtype first, then the gradient's
            grad_x = grad @ dequantize_nf4(ctx.layer.packed, ctx.layer.state).to(grad.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None            # W is frozen: no gradient for it


class NF4Linear(nn.Module):
    """``y = x W̃ᵀ + b`` where W̃ is W quantized to NF4 in blocks (optionally double-quantized).

    The packed codes and block constants are buffers (they move with ``.to`` and are saved in the
    state dict); W itself is not kept. The product runs in ``compute_dtype`` (default: W's dtype) and
    the output comes back in the input's dtype, as bitsandbytes' ``Linear4bit`` does.

    ``.to(dtype)`` (and ``model.to(torch.bfloat16)``, ``.half()``, ...) changes the dtype the layer
    dequantizes to and computes in; the 4-bit codes and their fp32 block constants are never cast, so
    no cast can round them.
    """

    is_quantized_linear = True
    CONSTANTS = ("absmax", "offset", "absmax_scale")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 lookup_table: bool = False):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"NF4Linear takes a 2-D weight (out_features, in_features), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != weight.shape[:1]):
            raise ValueError(f"NF4Linear bias must be None or a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        compute_dtype = checks.float_dtype("compute_dtype", compute_dtype, who="NF4Linear ")
        self.out_features, self.in_features = weight.shape
        packed, state = quantize_nf4(weight.detach(), blocksize, double_quant, lookup_table)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("offset", state.offset)
        self.register_buffer("absmax_scale", state.absmax_scale)
        self.blocksize, self.weight_dtype = blocksize, weight.dtype
        self.compute_dtype = compute_dtype or weight.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Module, **kwargs) -> "NF4Linear":
        """Quantize an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored transposed)."""
        W = module.weight.T if isinstance(module, Conv1D) else module.weight
        return cls(W, module.bias, **kwargs)

    @property
    def state(self) -> NF4State:
        return NF4State(self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                        self.blocksize, self.offset, self.absmax_scale)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W̃ in ``dtype`` (default: the compute dtype), rounded once from fp32."""
        return dequantize_nf4(self.packed, self.state, dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        """Device moves apply to every buffer; a dtype cast becomes the new compute and weight dtype
        instead of rounding the fp32 block constants."""
        probe = fn(torch.zeros((), device=self.packed.device))         # what fn does to an fp32 tensor
        constants = {n: getattr(self, n) for n in self.CONSTANTS}
        super()._apply(fn, recurse)
        for name, t in constants.items():
            if t is not None:
                setattr(self, name, t.to(probe.device))
        if probe.dtype != torch.float32 and probe.is_floating_point():
            self.compute_dtype = self.weight_dtype = probe.dtype
        return self

    def nbytes(self) -> int:
        """Bytes the weight takes: packed codes plus block constants (the bias not counted)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.packed, self.absmax, self.offset, self.absmax_scale) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantizeMatmul.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def quantize_model(model: nn.Module, targets="all-linear", *, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, lookup_table: bool = False) -> nn.Module:
    """Replace the linear layers ``targets`` selects (default: all but the heads, as QLoRA) by
    ``NF4Linear``; the model is changed in place and frozen. Then inject LoRA as usual.

    Modules a transformers model keeps in full precision (``_keep_in_fp32_modules``, such as T5's
    ``wo``) stay as they are, as with ``BitsAndBytesConfig``. On any error the model is unchanged."""
    if adapter_layers(model):
        raise ValueError("quantize the model before injecting adapters: quantize_model(model), then "
                         "inject(model, LoRALinear, ...)")
    check_blocksize(blocksize)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    names = [n for n in find_targets(model, targets)
             if not is_quantized(model.get_submodule(n)) and not (keep and _matches(n, keep))]
    kw = dict(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
              lookup_table=lookup_table)
    with atomic(model) as changes:
        layers = {n: NF4Linear.from_linear(model.get_submodule(n), **kw) for n in names}   # may raise
        for name, layer in layers.items():
            changes.replace(name, layer.train(model.get_submodule(name).training))
        model.requires_grad_(False)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put an ``nn.Linear`` holding the dequantized weight in place of every ``NF4Linear`` (adapter
    bases included), so that adapters can be merged: the usual last step after QLoRA training."""
    checks.float_dtype("dtype", dtype, who="dequantize_model ")
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    with atomic(model) as changes:
        for name in names:
            q = model.get_submodule(name)
            changes.replace(name, _to_linear(q, dtype).train(q.training))
    return model


def _to_linear(q: NF4Linear, dtype) -> nn.Linear:
    W = q.dequantized_weight(dtype or q.weight_dtype)
    linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        linear.weight.copy_(W)
        if q.bias is not None:
            linear.bias.copy_(q.bias)
    return linear.requires_grad_(False)
