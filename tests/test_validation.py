"""Every hyperparameter is checked at the boundary (type, range, finiteness), and the error names it.

One table: what is called, with which bad value, the exception, and a fragment of the message (which
must name the argument and the value). Nothing is changed by a call that is refused.
"""
import math

import pytest
import torch
from torch import nn

from pefttutor import FedParaLinear, HadamardLinear, KronABlock, KronALinear, LoRALinear, inject, trainable_parameters
from pefttutor.quant import (NF4Linear, OffloadedAdamW, bits_per_parameter, dequantize_model, dequantize_nf4,
                             fake_quantize, quantize_blockwise_8bit, quantize_model, quantize_nf4)

NAN, INF = math.nan, math.inf


def linear():
    torch.manual_seed(0)
    return nn.Linear(16, 8)


def mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4))


LAYERS = [   # (constructor, keyword, bad value, exception, message fragment)
    (LoRALinear, "r", 0, ValueError, "LoRA rank r=0 does not fit"),
    (LoRALinear, "r", "8", ValueError, "LoRA rank r='8'"),
    (LoRALinear, "r", None, ValueError, "LoRA rank r=None"),
    (LoRALinear, "alpha", NAN, ValueError, "LoRA alpha=nan must be a positive number"),
    (LoRALinear, "alpha", INF, ValueError, "LoRA alpha=inf must be a positive number"),
    (LoRALinear, "alpha", -2, ValueError, "LoRA alpha=-2 must be a positive number"),
    (LoRALinear, "alpha", "16", TypeError, "LoRA alpha='16' must be a number"),
    (LoRALinear, "alpha", True, TypeError, "LoRA alpha=True must be a number"),
    (LoRALinear, "dropout", NAN, ValueError, "LoRA dropout=nan must be in [0, 1)"),
    (LoRALinear, "dropout", -0.1, ValueError, "LoRA dropout=-0.1 must be in [0, 1)"),
    (LoRALinear, "dropout", None, TypeError, "LoRA dropout=None must be a number"),
    (LoRALinear, "rslora", 1, TypeError, "LoRA rslora=1 must be True or False"),
    (LoRALinear, "rslora", "yes", TypeError, "LoRA rslora='yes' must be True or False"),
    (KronALinear, "scale", NAN, ValueError, "KronALinear scale=nan must be a nonzero number"),
    (KronALinear, "scale", INF, ValueError, "KronALinear scale=inf must be a nonzero number"),
    (KronALinear, "scale", "2", TypeError, "KronALinear scale='2' must be a number"),
    (KronALinear, "a_shape", (3, 4), ValueError, "a_shape=(3, 4) does not divide"),
    (KronALinear, "a_shape", (2, 2, 2), ValueError, "a_shape=(2, 2, 2)"),
    (KronALinear, "a_shape", (2.0, 4), ValueError, "a_shape=(2.0, 4)"),
    (FedParaLinear, "r", 2.5, ValueError, "FedPara rank r=2.5"),
    (FedParaLinear, "alpha", NAN, ValueError, "FedPara alpha=nan must be a positive number"),
    (FedParaLinear, "alpha", 0, ValueError, "FedPara alpha=0 must be a positive number"),
]


@pytest.mark.parametrize("cls, key, value, error, message", LAYERS)
def test_layer_hyperparameters(cls, key, value, error, message):
    base = linear()
    with pytest.raises(error) as err:
        cls(base, **{key: value})
    assert message in str(err.value)
    assert base.weight.requires_grad                    # the refused layer did not freeze its base


@pytest.mark.parametrize("key, value, error, message", [
    ("scale", NAN, ValueError, "KronABlock scale=nan must be a nonzero number"),
    ("residual", "no", TypeError, "KronABlock residual='no' must be True or False"),
    ("a_shape", (3, 3), ValueError, "a_shape=(3, 3) does not divide"),
])
def test_block_hyperparameters(key, value, error, message):
    block = mlp()
    with pytest.raises(error) as err:
        KronABlock(block, **{key: value})
    assert message in str(err.value)
    assert all(p.requires_grad for p in block.parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(in_features=0, out_features=4, r=1), ValueError, "HadamardLinear in_features=0 must be an integer >= 1"),
    (dict(in_features=8, out_features=4.0, r=1), TypeError, "HadamardLinear out_features=4.0 must be an integer"),
    (dict(in_features=8, out_features=4, r=5), ValueError, "HadamardLinear rank r=5 does not fit"),
    (dict(in_features=8, out_features=4, r=2, personal=1), TypeError, "personal=1 must be True or False"),
    (dict(in_features=8, out_features=4, r=2, bias=None), TypeError, "bias=None must be True or False"),
])
def test_hadamard_linear_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        HadamardLinear(**kwargs)


def test_inject_arguments_are_checked_before_anything_changes(tiny_llama):
    before = trainable_parameters(tiny_llama)
    cases = [
        (dict(layer_cls=LoRALinear, targets=["q_proj"], rank=4), TypeError,
         "LoRALinear has no hyperparameter 'rank'; its hyperparameters are ['r', 'alpha', 'dropout', 'rslora']"),
        (dict(layer_cls=LoRALinear, targets=["q_proj"], modules_to_save="lm_head"), TypeError,
         "modules_to_save='lm_head' must be a list of module names"),
        (dict(layer_cls=LoRALinear, targets="q_proj(", r=2), ValueError, "is not a valid regular expression"),
        (dict(layer_cls=nn.Linear, targets=["q_proj"]), TypeError, "layer_cls must be an adapter class"),
        (dict(layer_cls=LoRALinear, targets=["q_proj"], alpha=torch.tensor(2.0)), TypeError,
         "must be plain values"),
        (dict(layer_cls=LoRALinear, targets=["q_proj"], alpha=NAN), ValueError, "LoRA alpha=nan"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error) as err:
            inject(tiny_llama, kwargs.pop("layer_cls"), kwargs.pop("targets"), **kwargs)
        assert message in str(err.value)
        assert trainable_parameters(tiny_llama) == before and not hasattr(tiny_llama, "pefttutor_config")


def test_a_layer_takes_one_adapter(tiny_llama):
    inject(tiny_llama, LoRALinear, ["q_proj"], r=2)
    for targets in (["q_proj"], "all-linear", r".*self_attn\.q_proj"):
        with pytest.raises(ValueError, match="already carry an adapter .LoRALinear."):
            inject(tiny_llama, KronALinear, targets)
    inject(tiny_llama, KronALinear, ["k_proj"])                  # other layers are fine


def test_tied_head_in_modules_to_save_gets_its_own_trainable_copy():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="lm_head.weight is tied to model.embed_tokens.weight"):
        inject(model, LoRALinear, ["q_proj"], r=2, modules_to_save=["lm_head"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert trainable_parameters(model).trainable == 64 * 32 + (2 * 32 + 32 * 2)    # the head's copy, one LoRA


@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize_nf4(torch.tensor([1.0, INF])), ValueError, "inf or NaN"),
    (lambda: quantize_nf4(torch.randn(8), blocksize=True), ValueError, "blocksize=True"),
    (lambda: quantize_nf4(torch.randn(8), double_quant="yes"), TypeError, "double_quant='yes' must be True or False"),
    (lambda: quantize_nf4(torch.randn(8), lookup_table=1), TypeError, "lookup_table=1 must be True or False"),
    (lambda: dequantize_nf4(*quantize_nf4(torch.randn(8)), dtype=torch.int8), TypeError, "dtype=torch.int8"),
    (lambda: quantize_blockwise_8bit(torch.randn(8), blocksize=0), ValueError, "blocksize=0 must be an integer >= 1"),
    (lambda: quantize_blockwise_8bit(torch.arange(8)), TypeError, "floating-point tensor"),
    (lambda: fake_quantize(torch.randn(8), [0.0, 1.0]), TypeError, "code must be a 1-D floating-point tensor"),
    (lambda: bits_per_parameter(48), ValueError, "blocksize=48"),
    (lambda: bits_per_parameter(64, double_quant=2), TypeError, "double_quant=2"),
    (lambda: NF4Linear(torch.randn(8, 16), compute_dtype=torch.int32), TypeError, "compute_dtype=torch.int32"),
    (lambda: NF4Linear(torch.randn(8, 16), bias=torch.zeros(4)), ValueError, "bias must be None or a tensor of shape (8,)"),
    (lambda: dequantize_model(nn.Linear(2, 2), dtype="bf16"), TypeError, "dtype='bf16'"),
])
def test_quantization_arguments(call, error, message):
    with pytest.raises(error) as err:
        call()
    assert message in str(err.value)


def test_quantize_model_refuses_before_changing_anything(tiny_llama):
    with pytest.raises(TypeError, match="compute_dtype='fp16'"):
        quantize_model(tiny_llama, compute_dtype="fp16")
    assert not any(isinstance(m, NF4Linear) for m in tiny_llama.modules())
    assert all(p.requires_grad for p in tiny_llama.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=NAN), "lr=nan"), (dict(lr=INF), "lr=inf"), (dict(lr=0), "lr > 0"),
    (dict(eps=0), "eps=0"), (dict(weight_decay=NAN), "weight_decay=nan"), (dict(weight_decay=-1), "weight_decay=-1"),
    (dict(betas=(0.9, 1.0)), "betas[1]=1.0 must be in [0, 1)"), (dict(betas=(NAN, 0.9)), "betas[0]=nan"),
])
def test_offloaded_adamw_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        OffloadedAdamW([nn.Parameter(torch.zeros(2))], **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(steps=0), ValueError, "train steps=0 must be an integer >= 1"),
    (dict(steps=10.5), TypeError, "train steps=10.5 must be an integer"),
    (dict(lr=NAN), ValueError, "train lr=nan must be a positive number"),
    (dict(lr=-1e-3), ValueError, "train lr=-0.001"),
    (dict(batch_size=0), ValueError, "train batch_size=0"),
    (dict(warmup=1.5), ValueError, "train warmup=1.5 must be in [0, 1]"),
    (dict(weight_decay=INF), ValueError, "train weight_decay=inf"),
    (dict(clip=0), ValueError, "train clip=0 must be a positive number"),
    (dict(eval_every=0), ValueError, "train eval_every=0"),
    (dict(precision="fp8"), ValueError, "train precision='fp8'"),
])
def test_train_arguments(kwargs, error, message, tiny_bert):
    from pefttutor.train import train
    data = [{"input_ids": [1, 2, 3], "label": 0}]
    before = [p.detach().clone() for p in tiny_bert.parameters()]
    with pytest.raises(error) as err:
        train(tiny_bert, data, pad_id=0, **kwargs)
    assert message in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_bert.parameters()))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, "predict batch_size=0"),
    (dict(seq_len=NAN), TypeError, "predict seq_len=nan"),
    (dict(r=0), ValueError, "predict r=0"),
    (dict(dtype=torch.int8), ValueError, "predict dtype=torch.int8"),
    (dict(checkpointing="yes"), TypeError, "checkpointing='yes'"),
    (dict(method="qlora", blocksize=100), ValueError, "blocksize=100"),
])
def test_memory_predict_arguments(kwargs, error, message, tiny_llama):
    from pefttutor.memory import predict
    with pytest.raises(error) as err:
        predict(tiny_llama, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("sizes, error, message", [
    ({"trian": 10}, ValueError, "no split named 'trian'"),
    ({"train": 0}, ValueError, "sizes['train']=0"),
    ({"train": "10"}, TypeError, "sizes['train']='10'"),
    ([10], TypeError, "sizes=[10] must be a dict"),
])
def test_task_sizes(sizes, error, message):
    from pefttutor.data import load_task
    with pytest.raises(error) as err:
        load_task("reviews", sizes=sizes)
    assert message in str(err.value)
