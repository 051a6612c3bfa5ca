"""A linear layer stored in NF4, for QLoRA: 4-bit weights, dequantized to the compute dtype on the fly.

Defined in the chapter "QLoRA" (book/qlora.ipynb). Put a LoRA on top with the usual injector:
``inject(quantize_model(model), LoRALinear, "all-linear", r=16)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..inject import Conv1D, adapter_layers, find_targets, is_quantized
from .nf4 import NF4State, dequantize_nf4, quantize_nf4


class _DequantizeMatmul(torch.autograd.Function):
    """y = x Wᵀ with W rebuilt from 4 bits in forward and again in backward, so autograd keeps no
    full-precision copy of W between the two (as bitsandbytes' MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantized_weight(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None            # W is frozen: no gradient for it


class NF4Linear(nn.Module):
    """``y = x W̃ᵀ + b`` where W̃ is W quantized to NF4 in blocks (optionally double-quantized).

    The packed codes and block constants are buffers (they move with ``.to`` and are saved in the
    state dict); W itself is not kept. The product runs in ``compute_dtype`` (default: W's dtype) and
    the output comes back in the input's dtype, as bitsandbytes' ``Linear4bit`` does.
    """

    is_quantized_linear = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 lookup_table: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear takes a 2-D weight (out_features, in_features), got shape "
                             f"{tuple(weight.shape)}")
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
        return dequantize_nf4(self.packed, self.state).to(dtype or self.compute_dtype)

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


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def quantize_model(model: nn.Module, targets="all-linear", *, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, lookup_table: bool = False) -> nn.Module:
    """Replace the linear layers ``targets`` selects (default: all but the heads, as QLoRA) by
    ``NF4Linear``; the model is changed in place and frozen. Then inject LoRA as usual."""
    if adapter_layers(model):
        raise ValueError("quantize the model before injecting adapters: quantize_model(model), then "
                         "inject(model, LoRALinear, ...)")
    for name in find_targets(model, targets):
        module = model.get_submodule(name)
        if not is_quantized(module):
            _replace(model, name, NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant,
                                                        compute_dtype=compute_dtype, lookup_table=lookup_table))
    return model.requires_grad_(False)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put an ``nn.Linear`` holding the dequantized weight in place of every ``NF4Linear`` (adapter
    bases included), so that adapters can be merged: the usual last step after QLoRA training."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for name in names:
        q = model.get_submodule(name)
        W = q.dequantized_weight(dtype or q.weight_dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            linear.weight.copy_(W)
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        _replace(model, name, linear.requires_grad_(False))
    return model
