"""The weight-space layer protocol for LoRALinear, and parity with peft on copied weights."""
import copy
import math

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pefttutor import LoRALinear, inject, merge, unload


def randomize(layer):
    with torch.no_grad():
        layer.B.normal_()
    return layer


def test_identity_at_init():
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), r=4)
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) > 0
    bound = 1 / math.sqrt(16)        # kaiming_uniform(a=sqrt 5) on fan_in 16
    assert layer.A.abs().max() <= bound


def test_forward_is_base_plus_delta():
    layer = randomize(LoRALinear(nn.Linear(16, 8), r=4, alpha=16))
    x = torch.randn(4, 16)
    expected = layer.base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected)
    assert layer.scale == 4.0 and layer.delta_weight().shape == (8, 16)
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 4


def test_rslora_scale():
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8, rslora=True).scale == 8 / 2


@pytest.mark.parametrize("base", [nn.Linear(12, 6), Conv1D(6, 12)])
def test_merge_unmerge_round_trip(base):
    layer = randomize(LoRALinear(base, r=3))
    x = torch.randn(2, 12)
    before, w0 = layer(x), base.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(base(x), before)
    layer.merge()                      # merging twice does not add ΔW twice
    torch.testing.assert_close(layer(x), before)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(layer(x), before)


def test_only_adapter_parameters_get_gradients():
    layer = randomize(LoRALinear(nn.Linear(8, 8), r=2))
    layer(torch.randn(4, 8)).sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad


def test_dropout_only_in_training():
    layer = randomize(LoRALinear(nn.Linear(8, 8), r=2, dropout=0.5)).eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "LoRA rank r=0 does not fit a layer with out_features=8 and in_features=16"),
    (dict(r=9), "choose an integer 1 <= r <= 8"),
    (dict(r=2.5), "LoRA rank r=2.5"),
    (dict(alpha=0), "alpha=0 must be a positive number"),
    (dict(dropout=1.0), "dropout=1.0 must be in [0, 1)"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        LoRALinear(nn.Linear(16, 8), **kwargs)
    assert message in str(err.value)


def test_wraps_only_linear_layers():
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers' Conv1D, got Embedding"):
        LoRALinear(nn.Embedding(10, 4))


def test_half_precision_base_keeps_fp32_adapter():
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
    assert layer.A.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- parity with peft ------------------------------------------------------------------------

def peft_linear(base, r, alpha, **kw):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **kw)
    return peft.tuners.lora.layer.Linear(base, "default", config=config, r=r, lora_alpha=alpha, **kw)


@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft_layer(rslora):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    ref = peft_linear(copy.deepcopy(base), r=8, alpha=16, use_rslora=rslora)
    ours = LoRALinear(copy.deepcopy(base), r=8, alpha=16, rslora=rslora)
    with torch.no_grad():
        ours.A.copy_(ref.lora_A["default"].weight)
        ours.B.copy_(ref.lora_B["default"].weight)
    x = torch.randn(4, 7, 64)
    assert (ours(x) - ref(x)).abs().max() <= 1e-5
    torch.testing.assert_close(ours.delta_weight(), ref.get_delta_weight("default"), atol=1e-6, rtol=0)


def test_parity_with_peft_whole_model_after_merge_and_unload(tiny_llama, ids):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(tiny_llama), config)
    ours = inject(copy.deepcopy(tiny_llama), LoRALinear, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                peft_module = ref.base_model.model.get_submodule(name)
                module.A.copy_(peft_module.lora_A["default"].weight)
                module.B.copy_(peft_module.lora_B["default"].weight)
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-5
        ours_plain, ref_plain = unload(ours), ref.merge_and_unload()
        assert (ours_plain(ids).logits - ref_plain(ids).logits).abs().max() <= 1e-5
    assert type(ours_plain.model.layers[0].self_attn.q_proj) is nn.Linear
