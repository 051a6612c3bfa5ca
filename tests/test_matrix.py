"""One matrix of cases through shared checks, in the spirit of peft's testing_common.py.

Architectures: the families transformers ships, tiny and seeded: decoders with and without tied
embeddings and grouped-query attention (Llama, Qwen2 with q/k/v biases, GPT-2 with Conv1D), an encoder
(BERT), and encoder-decoders (T5 without biases, BART with them; both tie their embeddings). Layer
types: every adapter pefttutor exports (weight-space layers and the bottleneck adapters), and LoRA on an
NF4 base (QLoRA). Checks: identity at
initialisation, only adapter parameters (and the kept head) train, merge / unmerge / unload (or a clear
refusal that changes nothing), save / load round trip (and a refusal of other hyperparameters that
changes nothing), and a dtype change after injection. A combination that cannot apply (KronA^B on a
model without a feed-forward module) is a test of its error message, never a silent skip.
"""
import copy

import pytest
import torch
from torch import nn
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          T5Config, T5ForConditionalGeneration)

from pefttutor import (AdapterModule, FedParaLinear, HoulsbyAdapter, KronABlock, KronALinear, LoRALinear,
                       ParallelAdapter, PfeifferAdapter, adapter_layers, inject, load_adapter, merge, save_adapter,
                       trainable_parameters, unload, unmerge)
from pefttutor.quant import NF4Linear, dequantize_model, quantize_model

V = 64


def _llama(tied, kv):
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied))


ARCHS = {   # name: (constructor, kind, head kept trainable)
    "llama-gqa": (lambda: _llama(False, 2), "decoder", "lm_head"),
    "llama-tied": (lambda: _llama(True, 4), "decoder", "lm_head"),
    "qwen2-gqa-bias": (lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)), "decoder", "lm_head"),
    "gpt2-tied": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
                  "decoder", "lm_head"),
    "bert": (lambda: BertForSequenceClassification(BertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32)), "encoder", "classifier"),
    "t5-tied": (lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0)), "encoder-decoder", "lm_head"),
    "bart-tied": (lambda: BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)),
        "encoder-decoder", "lm_head"),
}

CASES = {   # name: (layer class, targets, hyperparameters, quantized base, hyperparameters that differ)
    "lora": (LoRALinear, "all-linear", dict(r=2, alpha=4), False, dict(alpha=8)),
    "lora-rslora-dropout": (LoRALinear, "all-linear", dict(r=4, alpha=8, rslora=True, dropout=0.1), False,
                            dict(rslora=False)),
    "krona": (KronALinear, "all-linear", dict(scale=2.0), False, dict(scale=1.0)),
    "fedpara": (FedParaLinear, "all-linear", dict(r=2, alpha=4), False, dict(alpha=2)),
    "kronab-res": (KronABlock, "ffn", dict(residual=True, scale=0.5), False, dict(scale=1.0)),
    "qlora": (LoRALinear, "all-linear", dict(r=2, alpha=4), True, dict(alpha=2)),
    "houlsby": (HoulsbyAdapter, "auto", dict(bottleneck=4), False, dict(activation="relu")),
    "pfeiffer": (PfeifferAdapter, "auto", dict(bottleneck=4), False, dict(scaling=2.0)),
    "parallel": (ParallelAdapter, "auto", dict(bottleneck=4), False, dict(scaling=1.0)),
}

NOT_APPLICABLE = {("bart-tied", "kronab-res"): "no feed-forward block of BartForConditionalGeneration",
                  **{(arch, case): f"no place for {CASES[case][0].__name__} matches targets='auto'"
                     for arch in ("t5-tied", "bart-tied") for case in ("houlsby", "pfeiffer", "parallel")}}
MATRIX = [(a, c) for a in ARCHS for c in CASES if (a, c) not in NOT_APPLICABLE]


def base_model(arch, quantized=False):
    torch.manual_seed(0)
    model = ARCHS[arch][0]().eval()
    return quantize_model(model) if quantized else model


def inputs(arch):
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, V, (2, 8), generator=g)}
    if ARCHS[arch][1] == "encoder-decoder":
        batch["decoder_input_ids"] = torch.randint(1, V, (2, 5), generator=g)
    return batch


def logits(model, arch):
    return model(**inputs(arch)).logits


def injected(arch, case, **overrides):
    layer_cls, targets, hparams, quantized, _ = CASES[case]
    model = base_model(arch, quantized)
    with pytest.warns(UserWarning, match="tied") if "tied" in arch else _nothing():
        return inject(model, layer_cls, targets, modules_to_save=[ARCHS[arch][2]], **{**hparams, **overrides})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def randomize(model):
    """Move the adapters away from their identity start, so that every factor gets a gradient."""
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.normal_(std=0.1)
    return model


def snapshot(model):
    """Everything an operation could change: module types, tensors, requires_grad, pefttutor attributes."""
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {a: copy.deepcopy(getattr(model, a, None)) for a in ("pefttutor_config", "pefttutor_modules_to_save")})


def assert_same(before, after):
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def close_in_bf16(a, b):
    """The same model in bf16: relative error of the whole logits tensor (8 bits of mantissa) under 5%."""
    assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.05


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, case", MATRIX)
def test_identity_at_init(arch, case):
    model = injected(arch, case)
    with torch.no_grad():             # both without autograd: T5's matmuls fold differently when inputs need grad
        assert torch.equal(logits(model, arch), logits(base_model(arch, CASES[case][3]), arch))


@pytest.mark.parametrize("arch, case", MATRIX)
def test_only_adapter_parameters_and_the_kept_head_train(arch, case):
    model = randomize(injected(arch, case))
    head = ARCHS[arch][2]
    adapter = {f"{ln}.{pn}" for ln, layer in adapter_layers(model).items()
               for pn, _ in layer.named_parameters() if not pn.startswith("base.")}
    kept = {n for n, _ in model.named_parameters() if n.startswith(head + ".") or f".{head}." in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and kept and trainable == adapter | kept
    assert trainable_parameters(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    logits(model, arch).float().pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)   # tied embeddings too
    buffers = [b for m in model.modules() if isinstance(m, NF4Linear) for b in (m.packed, m.absmax)]
    assert all(not b.requires_grad for b in buffers)


@pytest.mark.parametrize("arch, case", MATRIX)
def test_merge_unmerge_unload(arch, case):
    model = randomize(injected(arch, case))
    with torch.no_grad():
        out = logits(model, arch)
        if not all(layer.mergeable for layer in adapter_layers(model).values()):
            before = snapshot(model)
            for op in (merge, unload):
                with pytest.raises(ValueError, match="is not a weight update"):
                    op(model)
                assert_same(before, snapshot(model))
            return
        if CASES[case][3]:                                               # a 4-bit base: refused, nothing merged
            before = snapshot(model)
            with pytest.raises(ValueError, match="dequantize_model"):
                merge(model)
            assert_same(before, snapshot(model))
            dequantize_model(model)
            close(logits(model, arch), out)
        weights = {n: l.base.weight.clone() for n, l in adapter_layers(model).items()}
        merge(model)
        assert all(layer.merged for layer in adapter_layers(model).values())
        close(logits(model, arch), out)
        unmerge(model)
        assert all(torch.allclose(l.base.weight, weights[n], atol=1e-6) for n, l in adapter_layers(model).items())
        close(logits(model, arch), out)
        plain = unload(model)
        assert not any(isinstance(m, AdapterModule) for m in plain.modules())
        close(logits(plain, arch), out)


@pytest.mark.parametrize("arch, case", MATRIX)
def test_save_load_round_trip(arch, case, tmp_path):
    model = randomize(injected(arch, case))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with torch.no_grad():
        expected = logits(model, arch)
        fresh = base_model(arch, CASES[case][3])
        with pytest.warns(UserWarning, match="tied") if "tied" in arch else _nothing():
            load_adapter(fresh, path)                                   # injects as recorded, then loads
        assert torch.equal(logits(fresh, arch), expected)
        other = injected(arch, case, **CASES[case][4])                  # same shapes, other hyperparameters
        before = snapshot(other)
        with pytest.raises(ValueError, match="other hyperparameters"):
            load_adapter(other, path)
        assert_same(before, snapshot(other))


@pytest.mark.parametrize("arch, case", MATRIX)
def test_dtype_change_after_injection(arch, case):
    model = randomize(injected(arch, case))
    with torch.no_grad():
        out32 = logits(model, arch)
        quantized = {n: (m.packed.clone(), m.absmax.clone(), m.offset.clone(), m.absmax_scale.clone())
                     for n, m in model.named_modules() if isinstance(m, NF4Linear)}
        model.to(torch.bfloat16)
        for n, (packed, *constants) in quantized.items():               # 4-bit codes and fp32 constants intact
            m = model.get_submodule(n)
            assert torch.equal(m.packed, packed) and m.compute_dtype == torch.bfloat16
            assert all(c.dtype == t.dtype and torch.equal(c, t)
                       for c, t in zip((m.absmax, m.offset, m.absmax_scale), constants))
        out16 = logits(model, arch)
        assert out16.dtype == torch.bfloat16
        close_in_bf16(out16, out32)
        if all(layer.mergeable for layer in adapter_layers(model).values()):
            dequantize_model(model)
            merge(model)
            close_in_bf16(logits(model, arch), out16)
        model.float()
        assert logits(model, arch).dtype == torch.float32


@pytest.mark.parametrize("arch, case", sorted(NOT_APPLICABLE))
def test_combinations_that_cannot_apply_say_so(arch, case):
    model = base_model(arch)
    before = snapshot(model)
    with pytest.raises(ValueError, match=NOT_APPLICABLE[(arch, case)]):
        inject(model, CASES[case][0], CASES[case][1], **CASES[case][2])
    assert_same(before, snapshot(model))


# ---------------------------------------------------------------------------------------------
# Atomicity: a failed operation leaves the model exactly as it was


class FailsOnThird(LoRALinear):
    made = 0

    def __init__(self, base, **kw):
        type(self).made += 1
        if type(self).made == 3:
            raise RuntimeError("third layer fails")
        super().__init__(base, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_failed_inject_leaves_the_model_as_it_was(arch, tmp_path):
    model = base_model(arch)
    before = snapshot(model)
    FailsOnThird.made = 0
    with pytest.raises(RuntimeError, match="third layer fails"):
        inject(model, FailsOnThird, "all-linear", r=2, modules_to_save=[ARCHS[arch][2]])
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="LoRA rank r=48 does not fit"):   # too big for the smaller layers only
        inject(model, LoRALinear, "all-linear", r=48)
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="modules_to_save: no module named 'head'"):
        inject(model, LoRALinear, "all-linear", r=2, modules_to_save=["head"])
    assert_same(before, snapshot(model))
    # a retry after the failures is a clean adapter, loadable into a fresh model
    randomize(inject(model, LoRALinear, "all-linear", r=2))
    save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        fresh = load_adapter(base_model(arch), tmp_path / "a.safetensors")
        assert torch.equal(logits(fresh, arch), logits(model, arch))


def test_failed_load_into_a_plain_model_injects_nothing(tmp_path):
    llama = randomize(inject(base_model("llama-gqa"), LoRALinear, ["q_proj"], r=2))
    save_adapter(llama, tmp_path / "llama.safetensors")
    bert = base_model("bert")
    before = snapshot(bert)
    with pytest.raises(ValueError, match="was made for a model with modules"):
        load_adapter(bert, tmp_path / "llama.safetensors")
    assert_same(before, snapshot(bert))
    other = base_model("llama-tied")               # the same module names, but k_proj is (32, 32), not (16, 32)
    before = snapshot(other)
    save_adapter(inject(base_model("llama-gqa"), LoRALinear, ["k_proj"], r=2), tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_adapter(other, tmp_path / "k.safetensors")          # injected first, then refused: undone
    assert_same(before, snapshot(other))
