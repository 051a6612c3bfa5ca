"""The weight-space layer protocol, checked the same way for KronALinear and FedParaLinear:
identity at init, forward = base + x ΔWᵀ, merge / unmerge, gradients, dtype, save / load."""
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pefttutor import (FedParaLinear, KronALinear, adapter_layers, inject, load_adapter, merge,
                       save_adapter, trainable_parameters, unload)

LAYERS = {"krona": (KronALinear, dict(a_shape=(2, 4), scale=2.0)), "fedpara": (FedParaLinear, dict(r=3, alpha=6))}


def make(kind, base):
    cls, kw = LAYERS[kind]
    return cls(base, **kw)


def randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("kind", LAYERS)
def test_identity_at_init(kind):
    base = nn.Linear(16, 8)
    layer = make(kind, copy.deepcopy(base))
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    zeros = [n for n, p in layer.named_parameters() if p.requires_grad and torch.count_nonzero(p) == 0]
    assert zeros == {"krona": ["A"], "fedpara": ["Y2"]}[kind]     # exactly one factor starts at zero


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_is_base_plus_delta(kind):
    layer = randomize(make(kind, nn.Linear(16, 8)))
    x = torch.randn(4, 3, 16)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)
    assert layer.delta_weight().shape == (8, 16)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge_round_trip(kind, conv1d):
    base = Conv1D(8, 16) if conv1d else nn.Linear(16, 8)
    layer = randomize(make(kind, base))
    x = torch.randn(2, 16)
    before, w0 = layer(x), base.weight.clone()
    layer.merge().merge()                          # twice: ΔW is added once
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(base(x), before)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("kind", LAYERS)
def test_only_adapter_parameters_get_gradients(kind):
    layer = randomize(make(kind, nn.Linear(16, 8)))
    layer(torch.randn(4, 16)).sum().backward()
    assert all(p.grad is not None for n, p in layer.named_parameters() if not n.startswith("base."))
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


@pytest.mark.parametrize("kind", LAYERS)
def test_half_precision_base_keeps_fp32_adapter(kind):
    layer = make(kind, nn.Linear(16, 8).to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if not n.startswith("base."))
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", LAYERS)
def test_inject_save_load_merge_unload(kind, tiny_llama, ids, tmp_path):
    cls, kw = LAYERS[kind]
    kw = {k: v for k, v in kw.items() if k != "a_shape"}      # automatic shapes on real layers
    model = inject(copy.deepcopy(tiny_llama), cls, ["q_proj", "v_proj"], **kw)
    assert len(adapter_layers(model)) == 4 and 0 < trainable_parameters(model).trainable
    for layer in adapter_layers(model).values():
        randomize(layer)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(copy.deepcopy(tiny_llama), tmp_path / "a.safetensors")
    assert all(isinstance(l, cls) for l in adapter_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected)
        merge(fresh)
        torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-5, rtol=1e-5)
        plain = unload(model)
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
