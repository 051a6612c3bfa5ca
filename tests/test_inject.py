"""The injector: targets, patterns, Conv1D, errors, kept modules, counting, merge, save and load."""
import copy

import pytest
import torch
from torch import nn

from pefttutor import (LoRALinear, adapter_layers, inject, load_adapter, merge, save_adapter,
                       trainable_parameters, unload, unmerge)


def test_suffix_targets(tiny_llama):
    inject(tiny_llama, LoRALinear, ["q_proj", "v_proj"], r=2)
    names = sorted(adapter_layers(tiny_llama))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_regex_targets(tiny_llama):
    inject(tiny_llama, LoRALinear, r"model\.layers\.1\.mlp\.(up|down)_proj", r=2)
    assert sorted(adapter_layers(tiny_llama)) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_all_linear_skips_heads(tiny_llama):
    inject(tiny_llama, LoRALinear, "all-linear", r=2)
    assert len(adapter_layers(tiny_llama)) == 2 * 7
    assert "lm_head" not in adapter_layers(tiny_llama)


def test_gpt2_conv1d(tiny_gpt2, ids):
    before = tiny_gpt2(ids).logits
    inject(tiny_gpt2, LoRALinear, ["c_attn"], r=4)
    layer = tiny_gpt2.transformer.h[0].attn.c_attn
    assert (layer.out_features, layer.in_features) == (96, 32)
    torch.testing.assert_close(tiny_gpt2(ids).logits, before)
    with torch.no_grad():
        for l in adapter_layers(tiny_gpt2).values():
            l.B.normal_(std=0.1)
    after = tiny_gpt2(ids).logits
    merge(tiny_gpt2)
    torch.testing.assert_close(tiny_gpt2(ids).logits, after, atol=1e-5, rtol=1e-5)


def test_no_match_lists_linear_modules(tiny_llama):
    with pytest.raises(ValueError) as err:
        inject(tiny_llama, LoRALinear, ["query"], r=2)
    msg = str(err.value)
    assert "no linear module of LlamaForCausalLM matches targets=['query']" in msg
    assert "'q_proj'" in msg and "'down_proj'" in msg and "model.layers.0.self_attn.q_proj" in msg


def test_bad_targets_type(tiny_llama):
    with pytest.raises(TypeError, match="targets must be a list of module-name suffixes"):
        inject(tiny_llama, LoRALinear, [1, 2])


def test_freezes_everything_but_adapters(tiny_llama, ids):
    inject(tiny_llama, LoRALinear, ["q_proj"], r=2)
    with torch.no_grad():
        for l in adapter_layers(tiny_llama).values():
            l.B.normal_()
    tiny_llama(ids, labels=ids).loss.backward()
    got = {n for n, p in tiny_llama.named_parameters() if p.grad is not None}
    assert got == {f"model.layers.{i}.self_attn.q_proj.{w}" for i in range(2) for w in "AB"}
    count = trainable_parameters(tiny_llama)
    assert count.trainable == 2 * 2 * (32 * 2)
    assert str(count).startswith(f"trainable params: {count.trainable:,} || all params: {count.total:,}")


def test_modules_to_save(tiny_bert, ids):
    inject(tiny_bert, LoRALinear, ["query", "value"], r=2, modules_to_save=["classifier", "pooler"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= trainable
    assert not any("word_embeddings" in n for n in trainable)
    with pytest.raises(ValueError, match="modules_to_save: no module named 'head'"):
        inject(tiny_bert, LoRALinear, ["key"], r=2, modules_to_save=["head"])


def test_merge_unmerge_unload_model(tiny_llama, ids):
    inject(tiny_llama, LoRALinear, ["q_proj", "v_proj", "up_proj"], r=2)
    with torch.no_grad():
        for l in adapter_layers(tiny_llama).values():
            l.B.normal_(std=0.1)
    out = tiny_llama(ids).logits
    merge(tiny_llama)
    assert all(l.merged for l in adapter_layers(tiny_llama).values())
    torch.testing.assert_close(tiny_llama(ids).logits, out, atol=1e-5, rtol=1e-5)
    unmerge(tiny_llama)
    torch.testing.assert_close(tiny_llama(ids).logits, out, atol=1e-5, rtol=1e-5)
    unload(tiny_llama)
    assert not adapter_layers(tiny_llama)
    torch.testing.assert_close(tiny_llama(ids).logits, out, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tiny_bert, ids, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    inject(tiny_bert, LoRALinear, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    with torch.no_grad():
        for l in adapter_layers(tiny_bert).values():
            l.B.normal_()
        tiny_bert.classifier.weight.normal_()
    path = tmp_path / "adapter.safetensors"
    save_adapter(tiny_bert, path)
    from safetensors.torch import load_file
    keys = set(load_file(path))
    assert keys == {f"bert.encoder.layer.{i}.attention.self.{p}.{w}" for i in range(2) for p in ("query", "value")
                    for w in "AB"} | {"classifier.weight", "classifier.bias"}
    # into the same model, injected the same way
    other = inject(copy.deepcopy(fresh), LoRALinear, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    load_adapter(other, path)
    torch.testing.assert_close(other(ids).logits, tiny_bert(ids).logits)
    # into a plain model: load_adapter injects from the saved configuration first
    plain = load_adapter(copy.deepcopy(fresh), path)
    torch.testing.assert_close(plain(ids).logits, tiny_bert(ids).logits)
    assert adapter_layers(plain)["bert.encoder.layer.0.attention.self.query"].scale == 2.0


def test_load_errors(tiny_bert, tiny_llama, tmp_path):
    path = tmp_path / "a.safetensors"
    fresh = copy.deepcopy(tiny_bert)
    save_adapter(inject(tiny_bert, LoRALinear, ["query"], r=4), path)
    wrong_rank = inject(copy.deepcopy(fresh), LoRALinear, ["query"], r=2)
    with pytest.raises(ValueError, match=r"shape mismatches: \['bert.encoder.layer.0.attention.self.query.A: "
                                         r"file \(4, 32\) vs model \(2, 32\)'"):
        load_adapter(wrong_rank, path)
    other_targets = inject(copy.deepcopy(fresh), LoRALinear, ["key"], r=4)
    with pytest.raises(ValueError, match="missing keys: .*key.A.*unexpected keys: .*query.A"):
        load_adapter(other_targets, path)
    llama = inject(tiny_llama, LoRALinear, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="does not fit this LlamaForCausalLM .saved from a BertForSequenceClassification"):
        load_adapter(llama, path)
    merged = merge(inject(copy.deepcopy(fresh), LoRALinear, ["query"], r=4))
    with pytest.raises(ValueError, match="call unmerge"):
        load_adapter(merged, path)
    with pytest.raises(ValueError, match="the model has no adapter"):
        save_adapter(nn.Sequential(nn.Linear(2, 2)), path)
