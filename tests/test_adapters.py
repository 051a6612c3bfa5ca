"""Bottleneck adapters, AdapterFusion and AdapterDrop: parity with AdapterHub's ``adapters`` on fixtures it
wrote (tests/adapterhub), and the errors of bad input.

``adapters`` 1.3.0 needs transformers 4.57, so it runs in a side environment (tests/adapterhub/build.sh,
which .ci/run calls before pytest) and leaves safetensors files in pefttutor/adapterhub_fixtures (shipped,
so the adapters chapter shows the same check): a tiny seeded base model per architecture,
and per configuration the adapter tensors under ``adapters``' names, the input and ``adapters``' output.
Here those tensors go into pefttutor's layers by name and the outputs must agree (fp32, max abs difference
<= 1e-5). Both sides run eager attention in fp32 on the same CPU; the difference is float rounding only.
"""
import json
import pathlib
import re

import pytest
import torch

import pefttutor
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from pefttutor import (AdapterFusion, HoulsbyAdapter, ParallelAdapter, PfeifferAdapter, RobustAdapterDrop,
                       drop_adapters, fuse, inject, load_adapter, prune_fusion, save_adapter, trainable_parameters)
from pefttutor.adapters import from_adapterhub, layer_norm_names, site_of
from pefttutor.train import regularization, train

FIXTURES = pathlib.Path(pefttutor.__file__).parent / "adapterhub_fixtures"
MODELS = {"bert": (BertModel, BertConfig), "llama": (LlamaModel, LlamaConfig), "gpt2": (GPT2Model, GPT2Config)}
CLASSES = {"houlsby": HoulsbyAdapter, "pfeiffer": PfeifferAdapter, "parallel": ParallelAdapter}


def read(name):
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def base(arch):
    tensors, meta = read(f"{arch}_base")
    model_cls, config_cls = MODELS[arch]
    config = config_cls.from_dict(json.loads(meta["config"]))
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if k != "output"})
    return model, tensors["output"]


def from_fixture(name):
    """The fixture's model rebuilt in pefttutor: (model, inputs, adapters' output, base output)."""
    tensors, meta = read(name)
    arch, placement = name.split("_")
    model, base_out = base(arch)
    config = json.loads(meta["config"])
    kw = dict(bottleneck=model.config.hidden_size // config["reduction_factor"],
              activation=config["non_linearity"], scaling=config["scaling"])
    if placement == "fusion":
        names = json.loads(meta["names"])
        inject(model, AdapterFusion, "auto", names=names, **kw)
    else:
        inject(model, CLASSES.get(placement, HoulsbyAdapter), "auto", **kw)
    if placement == "drop":
        drop_adapters(model, len(json.loads(meta["skip"])))
    state = from_adapterhub(model, tensors)
    missing = set(state) - set(model.state_dict())
    assert not missing, f"no such tensors in pefttutor's model: {sorted(missing)[:4]}"
    model.load_state_dict(state, strict=False)
    inputs = {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]}
    return model, inputs, tensors["output"], base_out


CASES = ["bert_pfeiffer", "bert_houlsby", "bert_parallel", "bert_fusion", "bert_drop",
         "llama_pfeiffer", "llama_houlsby", "gpt2_pfeiffer", "gpt2_houlsby"]


@pytest.mark.parametrize("name", CASES)
def test_parity_with_adapterhub(name):
    model, inputs, expected, base_out = from_fixture(name)
    assert (expected - base_out).abs().max() > 0.5          # the adapters change the output a lot...
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()                  # padded positions are not compared
    assert (out - expected)[real].abs().max().item() <= 1e-5   # ...and we compute what adapters computes


def test_fixtures_come_from_adapters():
    _, meta = read("bert_pfeiffer")
    assert meta["adapters"] == "1.3.0" and meta["transformers"].startswith("4.57")


def test_every_parameter_of_the_fixture_is_used():
    """No adapter tensor of the fixture is left out, and ours has none that the fixture lacks."""
    for name in CASES:
        model, *_ = from_fixture(name)
        tensors, _ = read(name)
        arch, placement = name.split("_")
        mapped = set(from_adapterhub(model, tensors))
        assert len(mapped) == sum("adapter" in k for k in tensors), name
        own = {k for k, _ in model.named_parameters() if ".base." not in f".{k}" and k not in base(arch)[0].state_dict()}
        assert own == mapped, name


# ---------------------------------------------------------------------------------------------
# The package's own conventions


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32)).eval()


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def run(model):
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same(a, b):
    assert a[0] == b[0] and a[2] == b[2] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("cls", [HoulsbyAdapter, PfeifferAdapter, ParallelAdapter])
def test_identity_at_initialisation_and_the_parameter_count(cls):
    model = tiny_bert()
    before = run(model)
    inject(model, cls, "auto", bottleneck=4)
    assert torch.equal(run(model), before)
    sites = 6 if cls is HoulsbyAdapter else 3                         # 3 layers; Houlsby twice per layer
    assert trainable_parameters(model).trainable == sites * (2 * 4 * 32 + 4 + 32)   # 2md + m + d per adapter


def test_default_sizes_follow_the_papers():
    model = tiny_bert()
    inject(model, PfeifferAdapter, "auto")
    assert model.encoder.layer[0].output.bottleneck == 32 // 16
    model = tiny_bert()
    inject(model, ParallelAdapter, "auto")
    layer = model.encoder.layer[0].output
    assert layer.bottleneck == 16 and layer.adapter.scaling == 4.0


def test_houlsby_trains_the_layer_norms_when_asked():
    model = tiny_bert()
    inject(model, HoulsbyAdapter, "auto", modules_to_save=layer_norm_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.layer.0.output.base.LayerNorm.weight" in trainable
    assert "embeddings.LayerNorm.weight" in trainable and "encoder.layer.0.output.base.dense.weight" not in trainable


@pytest.mark.parametrize("kw, message", [
    (dict(bottleneck=33), "bottleneck=33 does not fit: the adapter projects d_model=32"),
    (dict(bottleneck=0), "bottleneck=0 must be an integer >= 1"),
    (dict(activation="sigmoid"), "activation='sigmoid': choose one of"),
    (dict(scaling=-1.0), "scaling=-1.0 must be a positive number"),
    (dict(init="zeros"), "init='zeros': choose one of"),
])
def test_bad_hyperparameters_say_what_works_and_change_nothing(kw, message):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        inject(model, PfeifferAdapter, "auto", **kw)
    assert_same(before, snapshot(model))


def test_a_placement_the_architecture_does_not_have():
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no place for PfeifferAdapter matches targets=\['attention.output'\]"
                                         r".*sits at post-ffn / layer modules"):
        inject(model, PfeifferAdapter, ["attention.output"])
    with pytest.raises(TypeError, match="sits at post-ffn / layer modules .* got BertSelfOutput"):
        PfeifferAdapter(model.encoder.layer[0].attention.output)
    assert_same(before, snapshot(model))


def test_cannot_merge_and_says_why():
    from pefttutor import merge
    model = inject(tiny_bert(), HoulsbyAdapter, "auto")
    with pytest.raises(ValueError, match="is not a weight update"):
        merge(model)


def test_post_ln_sites_take_keyword_arguments():
    """BERT calls its SelfOutput / Output positionally; a caller may name the arguments instead."""
    model = inject(tiny_bert(), HoulsbyAdapter, "auto", bottleneck=4)
    site = model.encoder.layer[0].output
    with torch.no_grad():
        for p in site.adapter.parameters():
            p.normal_(std=0.3)
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(site(h, x), site(h, input_tensor=x))
        assert torch.equal(site(h, x), site(hidden_states=h, input_tensor=x))


def test_site_kinds():
    model = tiny_bert()
    assert site_of(model.encoder.layer[0].attention.output) == "post-attention"
    assert site_of(model.encoder.layer[0].output) == "post-ffn"
    assert site_of(model.encoder.layer[0]) is None


# ---------------------------------------------------------------------------------------------
# AdapterFusion


def trained_pfeiffer(tmp_path, name, seed, bottleneck=4, model_fn=tiny_bert):
    model = inject(model_fn(), PfeifferAdapter, "auto", bottleneck=bottleneck)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    path = tmp_path / f"{name}.safetensors"
    save_adapter(model, path)
    return model, path


def test_fusion_starts_at_the_mean_of_its_adapters_values_and_can_pick_one(tmp_path):
    a, pa = trained_pfeiffer(tmp_path, "a", 1)
    b, pb = trained_pfeiffer(tmp_path, "b", 2)
    model = fuse(tiny_bert(), {"a": pa, "b": pb})
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"encoder.layer.{i}.output.{w}" for i in range(3)
        for w in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight"))
    for layer in model.encoder.layer:                       # scores at infinity on "a": the fusion is adapter a
        with torch.no_grad():
            layer.output.key.weight.zero_(), layer.output.query.weight.zero_()
            layer.output.key.bias.zero_(), layer.output.query.bias.zero_()
            layer.output.value.weight.copy_(torch.eye(32))
    with torch.no_grad():                                   # equal scores: the mean of the two adapters
        mean = run(model)
    att = model.encoder.layer[0].output.last_attention
    assert att.shape == (2, 7, 2) and torch.allclose(att, torch.full_like(att, 0.5))
    assert not torch.allclose(mean, run(a)) and not torch.allclose(mean, run(b))


def test_fusion_trains_only_the_fusion_with_its_regularizer(tmp_path):
    _, pa = trained_pfeiffer(tmp_path, "a", 1)
    _, pb = trained_pfeiffer(tmp_path, "b", 2)
    model = fuse(tiny_bert(), {"a": pa, "b": pb})
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}
    assert regularization(model).item() == pytest.approx(3 * 0.01 * (32 * 32 - 32) * 1e-12, rel=1e-3)
    model.train()
    loss = model(input_ids=IDS).last_hidden_state.pow(2).mean() + regularization(model)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." in n)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_fusion_save_load_and_prune(tmp_path):
    _, pa = trained_pfeiffer(tmp_path, "a", 1)
    _, pb = trained_pfeiffer(tmp_path, "b", 2)
    _, pc = trained_pfeiffer(tmp_path, "c", 3)
    model = fuse(tiny_bert(), {"a": pa, "b": pb, "c": pc})
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path / "fusion.safetensors")
    fresh = load_adapter(tiny_bert(), tmp_path / "fusion.safetensors")
    assert torch.equal(run(fresh), run(model))
    prune_fusion(model, ["a", "c"])
    assert list(model.encoder.layer[1].output.adapters) == ["a", "c"]
    save_adapter(model, tmp_path / "pruned.safetensors")
    assert torch.equal(run(load_adapter(tiny_bert(), tmp_path / "pruned.safetensors")), run(model))
    with pytest.raises(ValueError, match=r"keep=\['z'\] must name at least one of the fused adapters \['a', 'c'\]"):
        prune_fusion(model, ["z"])


def test_fusion_errors_leave_the_model_as_it_was(tmp_path):
    _, pa = trained_pfeiffer(tmp_path, "a", 1)
    _, small = trained_pfeiffer(tmp_path, "small", 2, bottleneck=2)
    lora = inject(tiny_bert(), HoulsbyAdapter, "auto")
    save_adapter(lora, tmp_path / "houlsby.safetensors")

    def wide():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=32)).eval()
    _, other = trained_pfeiffer(tmp_path, "wide", 3, model_fn=wide)
    model = tiny_bert()
    before = snapshot(model)
    for sources, message in [
        ({"a": pa, "small": small}, "adapters 'a' and 'small' differ"),
        ({"a": pa, "h": tmp_path / "houlsby.safetensors"}, "holds \\['HoulsbyAdapter'\\]; AdapterFusion combines"),
        ({"a": pa}, "fuse needs at least two adapters"),
    ]:
        with pytest.raises(ValueError, match=message):
            fuse(model, sources)
        assert_same(before, snapshot(model))
    _, other2 = trained_pfeiffer(tmp_path, "wide2", 4, model_fn=wide)
    with pytest.raises(ValueError, match="trained for another model .* adapter reads 48, model has d_model 32"):
        fuse(model, {"w": other, "w2": other2})
    assert_same(before, snapshot(model))
    inject(model, PfeifferAdapter, "auto")
    with pytest.raises(ValueError, match="already carries adapters; fuse into the plain base model"):
        fuse(model, {"a": pa, "b": pa})


def test_loading_a_fusion_without_its_adapters_says_so(tmp_path):
    from safetensors.torch import save_file
    _, pa = trained_pfeiffer(tmp_path, "a", 1)
    _, pb = trained_pfeiffer(tmp_path, "b", 2)
    model = fuse(tiny_bert(), {"a": pa, "b": pb})
    save_adapter(model, tmp_path / "fusion.safetensors")
    with safe_open(str(tmp_path / "fusion.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(tmp_path / "fusion.safetensors")).items() if ".adapters." not in k}
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata=meta)
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="lacks the weights of the adapters it fuses"):
        load_adapter(fresh, tmp_path / "bare.safetensors")
    assert_same(before, snapshot(fresh))


# ---------------------------------------------------------------------------------------------
# AdapterDrop


def test_dropping_the_lower_layers_gives_the_base_below_and_stops_the_backward():
    model = inject(tiny_bert(), HoulsbyAdapter, "auto", bottleneck=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    full = run(model)
    assert drop_adapters(model, 2) == [f"encoder.layer.{i}.{s}" for i in (0, 1) for s in ("attention.output", "output")]
    plain = tiny_bert()
    with torch.no_grad():
        below_ours = model(input_ids=IDS, output_hidden_states=True).hidden_states[2]
        below_base = plain(input_ids=IDS, output_hidden_states=True).hidden_states[2]
    assert torch.equal(below_ours, below_base)              # layers 0 and 1 compute what the base computes
    model.train()
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and all(n.startswith("encoder.layer.2.") for n in got)
    assert drop_adapters(model, 0) == [] and torch.equal(run(model.eval()), full)
    with pytest.raises(ValueError, match="n_layers=4 must be an integer in \\[0, 3\\]"):
        drop_adapters(model, 4)
    with pytest.raises(ValueError, match="no adapters to drop"):
        drop_adapters(tiny_bert(), 1)


def test_robust_adapter_drop_samples_while_training_only():
    model = inject(tiny_bert(), PfeifferAdapter, "auto", bottleneck=4)
    drop = RobustAdapterDrop(model, max_layers=2, seed=0, n_eval=1)
    model.train()
    for _ in range(20):
        model(input_ids=IDS)
    assert set(drop.drawn) == {0, 1, 2}
    assert [m.active for m in (layer.output for layer in model.encoder.layer)] == [False, True, True]
    model.eval()
    model(input_ids=IDS)
    assert len(drop.drawn) == 20
    drop.remove()
    assert all(layer.output.active for layer in model.encoder.layer)


def test_train_adds_the_fusion_regularizer(tmp_path):
    from transformers import BertForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    _, pa = trained_pfeiffer(tmp_path, "a", 1, model_fn=classifier)
    _, pb = trained_pfeiffer(tmp_path, "b", 2, model_fn=classifier)
    clf = fuse(classifier(), {"a": pa, "b": pb}, modules_to_save=["classifier"])
    data = [{"input_ids": IDS[0].tolist(), "labels": 1}, {"input_ids": IDS[1].tolist(), "labels": 0}]
    with torch.no_grad():
        for layer in clf.bert.encoder.layer:
            layer.output.value.weight.add_(0.1)
    reg = regularization(clf).item()
    with torch.no_grad():
        plain = clf.train()(input_ids=IDS, labels=torch.tensor([1, 0])).loss.item()
    history = train(clf, data, pad_id=0, steps=1, batch_size=2, lr=1e-9, progress=False)
    assert reg > 0.1 and history["loss"][0] == pytest.approx(plain + reg, rel=1e-4)


@pytest.mark.parametrize("cls", [HoulsbyAdapter, PfeifferAdapter, ParallelAdapter])
def test_roberta_and_the_zoo_encoder(cls, tmp_path):
    """The same placements on RoBERTa (its own SelfOutput / Output classes) and on the zoo encoder
    classifier: identity at initialisation, the expected number of sites, and a save / load round trip
    into a fresh model carrying the same base weights."""
    from transformers import RobertaConfig, RobertaModel

    from pefttutor import zoo
    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40)).eval()
    encoder, _ = zoo.load_classifier("zoo-encoder", num_labels=2)
    for model, layers in ((roberta, 2), (encoder.eval(), encoder.config.num_hidden_layers)):
        ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = model(input_ids=ids)[0]
        inject(model, cls, "auto", bottleneck=4)
        sites = [n for n, m in model.named_modules() if isinstance(m, cls)]
        assert len(sites) == layers * (2 if cls is HoulsbyAdapter else 1)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids)[0], before)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(std=0.2)
            changed = model(input_ids=ids)[0]
        save_adapter(model, tmp_path / "a.safetensors")
        base = RobertaModel(roberta.config).eval() if model is roberta else zoo.load_classifier(
            "zoo-encoder", num_labels=2)[0].eval()
        base.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                              if not re.search(r"\.adapter\.", k)}, strict=False)
        with torch.no_grad():
            assert torch.equal(load_adapter(base, tmp_path / "a.safetensors")(input_ids=ids)[0], changed)
