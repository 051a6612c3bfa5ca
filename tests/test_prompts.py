"""Soft prompts against peft on copied weights, the hooks' bookkeeping, and the errors."""
import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

import pefttutor
from pefttutor import (MultitaskPromptTuning, PrefixTuning, PromptTuning, PTuning, inject, load_adapter,
                       save_adapter, trainable_parameters)
from pefttutor.prompts import bake, disabled, init_ids

peft = pytest.importorskip("peft")
from peft import (MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig,  # noqa: E402
                  PromptTuningConfig, TaskType, get_peft_model)

P = 5


def llama(cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, **kw)
    return cls(config).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)).eval()


def roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, num_labels=3, pad_token_id=1)).eval()


BASES = {"llama": llama, "gpt2": gpt2, "bert": bert, "roberta": roberta,
         "llama-cls": lambda: llama(LlamaForSequenceClassification, num_labels=3)}

# (our class and hyperparameters, peft's config)
METHODS = {
    "prompt": (PromptTuning, {}, PromptTuningConfig),
    "ptuning-mlp": (PTuning, {"encoder": "mlp", "hidden": 24},
                    lambda **kw: PromptEncoderConfig(encoder_reparameterization_type="MLP",
                                                     encoder_hidden_size=24, **kw)),
    "ptuning-lstm": (PTuning, {"encoder": "lstm", "hidden": 24},
                     lambda **kw: PromptEncoderConfig(encoder_reparameterization_type="LSTM",
                                                      encoder_hidden_size=24, **kw)),
    "prefix": (PrefixTuning, {}, PrefixTuningConfig),
    "prefix-projection": (PrefixTuning, {"projection": True, "hidden": 40},
                          lambda **kw: PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=40, **kw)),
    "multitask": (MultitaskPromptTuning, {"num_tasks": 3, "rank": 2},
                  lambda **kw: MultitaskPromptTuningConfig(num_tasks=3, num_ranks=2, **kw)),
}


def task_type(base):
    return TaskType.SEQ_CLS if "SequenceClassification" in type(base).__name__ else TaskType.CAUSAL_LM


def name_past_key_values(model):
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (the old name is still
    accepted by keyword). peft 0.21.2's prefix tuning of a classifier looks for a parameter named
    ``past_key_values`` in the forward's signature and refuses the model without it; give it a
    forward that names the parameter and passes it on unchanged. A no-op before 5.24."""
    import inspect
    backbone = getattr(model, model.base_model_prefix)
    if "cache" in inspect.signature(backbone.forward).parameters:
        forward = model.forward

        def renamed(*args, past_key_values=None, **kw):
            return forward(*args, cache=past_key_values, **kw)
        model.forward = renamed
    return model


def pair(base_name, method):
    """(peft model, our model) on the same base, our prompt weights copied from peft's (perturbed so
    that no factor is at a special value)."""
    base = BASES[base_name]()
    cls, hparams, config = METHODS[method]
    torch.manual_seed(1)
    ref_base = copy.deepcopy(base)
    if method.startswith("prefix") and task_type(base) == TaskType.SEQ_CLS:
        name_past_key_values(ref_base)
    ref = get_peft_model(ref_base, config(task_type=task_type(base), num_virtual_tokens=P)).eval()
    ours = inject(copy.deepcopy(base), cls, "auto", num_virtual_tokens=P, **hparams).eval()
    state = {k.split("prompt_encoder.default.")[1]: v for k, v in ref.state_dict().items()
             if "prompt_encoder.default." in k}
    prompt = ours.get_input_embeddings()
    mine = {k: v for k, v in prompt.state_dict().items() if not k.startswith("base.")}
    assert sorted(state) == sorted(mine)
    with torch.no_grad():
        for k, v in state.items():
            v.add_(torch.randn_like(v) * 0.3)         # same perturbation in both models (shared tensor)
            mine[k].copy_(v)
    return ref, ours


def inputs(base_name, batch=2, length=7, pad=False):
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (batch, length))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, length - 2:] = 0
        ids[1, length - 2:] = 0
    return ids, mask


CASES = [(b, m) for b in BASES for m in METHODS
         if not (m == "multitask" and b in ("bert", "roberta"))]          # peft's multitask: causal LM here


@pytest.mark.parametrize("base_name,method", CASES)
def test_logits_match_peft(base_name, method):
    ref, ours = pair(base_name, method)
    # peft's classifiers read the last position given embeddings: compare unpadded batches there
    pad = base_name in ("llama", "gpt2", "bert", "roberta")
    ids, mask = inputs(base_name, pad=pad)
    extra = {"task_ids": torch.tensor([2, 0])} if method == "multitask" else {}
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, **extra).logits
        b = ours(input_ids=ids, attention_mask=mask, **extra).logits
    if a.shape != b.shape:                       # peft returns logits for the virtual tokens too
        a = a[:, -b.shape[1]:]
    keep = mask.bool() if a.dim() == 3 and a.shape[1] == ids.shape[1] else slice(None)
    assert (a[keep] - b[keep]).abs().max().item() <= 1e-5
    with torch.no_grad(), disabled(ours):                 # and the prompt does change the output
        plain = ours(input_ids=ids, attention_mask=mask).logits
    base = plain if plain.dim() == 2 else plain[mask.bool()]
    assert (b[keep] - base).abs().max().item() > 1e-3       # 100 x the tolerance


def greedy(model, ids, steps=10, **extra):
    """Greedy decoding by whole forward passes, no cache: the reference semantics of generate()."""
    x = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), **extra).logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("base_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "multitask"])
def test_greedy_generation_matches_peft(base_name, method):
    # Our cached generate() against greedy decoding by peft's forward. (Not against peft's own
    # generate(): with transformers 5.24, peft 0.21.2's generate() with a soft prompt no longer
    # agrees with its own forward, as the cache keyword was renamed.)
    ref, ours = pair(base_name, method)
    ids, mask = inputs(base_name, batch=1)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        b = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert b.tolist() == greedy(ref, ids).tolist()


def test_multitask_generation_matches_peft():
    ref, ours = pair("llama", "multitask")
    ids, mask = inputs("llama", batch=1)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours.get_input_embeddings().task = 1
        b = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert b.tolist() == greedy(ref, ids, task_ids=torch.tensor([1])).tolist()


def test_generation_changes_with_the_prompt():
    for method in ("prompt", "prefix"):
        _, ours = pair("llama", method)
        ids, mask = inputs("llama", batch=1)
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            with disabled(ours):
                plain = ours.generate(input_ids=ids, attention_mask=mask, **kw)
            assert ours.generate(input_ids=ids, attention_mask=mask, **kw).tolist() != plain.tolist()


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix", "prefix-projection"])
def test_trainable_parameters_match_peft(method):
    for base_name in ("llama", "gpt2"):
        ref, ours = pair(base_name, method)
        trainable, _ = ref.get_nb_trainable_parameters()
        assert trainable_parameters(ours).trainable == trainable


def test_parameter_counts():
    _, ours = pair("llama", "prompt")
    assert trainable_parameters(ours).trainable == P * 32
    _, ours = pair("llama", "prefix")          # 2 layers x (keys + values) x 2 kv heads x 8 wide
    assert trainable_parameters(ours).trainable == P * 2 * 2 * 2 * 8


@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm", "prefix", "multitask"])
def test_padding_does_not_change_a_row(method):
    """A row's outputs do not depend on the padding its batch adds (right padding in training; the
    decoder classifier reads the last real token, where peft reads the last position)."""
    for base_name in ("llama", "llama-cls", "gpt2"):
        if method == "multitask" and base_name == "gpt2":
            continue
        _, ours = pair(base_name, method)
        ids, mask = inputs(base_name, pad=True)
        with torch.no_grad():
            both = ours(input_ids=ids, attention_mask=mask).logits
            alone = ours(input_ids=ids[1:, :5], attention_mask=mask[1:, :5]).logits
        if both.dim() == 2:
            assert (both[1] - alone[0]).abs().max().item() <= 1e-5
        else:
            text = both[1, -7:][:5]            # input-level prompts add p positions in front
            assert (text - alone[0, -5:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_generation_equals_each_row_alone(method):
    _, ours = pair("llama", method)
    ids, _ = inputs("llama", batch=2)
    short = ids[1:, 2:]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [2]])).long()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = ours.generate(input_ids=batch, attention_mask=mask, **kw)[:, 7:]
        first = ours.generate(input_ids=ids[:1], attention_mask=torch.ones(1, 7, dtype=torch.long), **kw)
        second = ours.generate(input_ids=short, attention_mask=torch.ones(1, 5, dtype=torch.long), **kw)
    assert together[0].tolist() == first[0, 7:].tolist()
    assert together[1].tolist() == second[0, 5:].tolist()


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix-projection", "multitask"])
def test_save_load_round_trip(tmp_path, method):
    _, ours = pair("llama", method)
    ids, mask = inputs("llama")
    path = tmp_path / "prompt.safetensors"
    save_adapter(ours, path)
    fresh = load_adapter(llama(), path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits,
                           ours(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("method", ["ptuning-mlp", "ptuning-lstm", "prefix-projection"])
def test_bake_keeps_the_output_and_drops_the_encoder(tmp_path, method):
    _, ours = pair("llama", method)
    ids, mask = inputs("llama")
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        n_before = trainable_parameters(ours).trainable
        bake(ours)
        after = ours(input_ids=ids, attention_mask=mask).logits
    assert (before - after).abs().max().item() <= 1e-6
    assert trainable_parameters(ours).trainable < n_before
    save_adapter(ours, tmp_path / "baked.safetensors")
    fresh = load_adapter(llama(), tmp_path / "baked.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, after)


def test_prefix_with_gradient_checkpointing():
    """peft refuses prefix tuning with gradient checkpointing (transformers drops the cache in a
    checkpointed layer, so the prefix would vanish). The training cache here never grows, so the
    checkpointed layers may keep it: same loss, same gradients."""
    _, ours = pair("llama", "prefix")
    ids, mask = inputs("llama")
    losses, grads = [], []
    for checkpointing in (False, True):
        model = copy.deepcopy(ours).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.get_input_embeddings().embedding.weight.grad.clone())
    assert abs(losses[0] - losses[1]) <= 1e-6
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6 and grads[0].abs().sum() > 0
    base = llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))


def test_only_the_prompt_trains():
    _, ours = pair("bert", "prefix")
    ids, mask = inputs("bert")
    ours.train()
    ours(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss.backward()
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert all("embedding.weight" in n for n in trained)


def test_the_prompt_learns():
    """Thirty steps of the package's training loop teach the zoo decoder a sentence through a
    prompt or a prefix alone."""
    from pefttutor import zoo
    from pefttutor.train import train
    for cls in (PromptTuning, PrefixTuning):
        model, tok = zoo.load_decoder("zoo-decoder")
        ids = tok("review : the pasta was awful . verdict : negative", add_special_tokens=False)["input_ids"]
        model = inject(model, cls, "auto", num_virtual_tokens=4)
        data = [{"input_ids": ids, "labels": ids}] * 16
        history = train(model, data, pad_id=tok.pad_token_id, steps=30, batch_size=8, lr=3e-2,
                        progress=False)
        assert history["loss"][-1] < 0.8 * history["loss"][0]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, the model left as it was

def test_prompt_longer_than_the_positions():
    with pytest.raises(ValueError, match="does not fit: GPT2LMHeadModel has 64 positions"):
        inject(gpt2(), PromptTuning, "auto", num_virtual_tokens=64)
    model = inject(gpt2(), PromptTuning, "auto", num_virtual_tokens=40)
    with pytest.raises(ValueError, match="exceed the model's 64 positions: shorten the input to at most 24"):
        model(input_ids=torch.randint(0, 96, (1, 30)))


def test_init_text_of_the_wrong_length():
    from pefttutor import zoo
    tok = zoo.load_tokenizer("zoo-decoder")
    n = len(tok("great terrible", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"tokenizes to {n} tokens, not num_virtual_tokens=20"):
        init_ids(tok, "great terrible", 20)
    ids = init_ids(tok, "great terrible", 20, repeat=True)
    assert len(ids) == 20
    with pytest.raises(ValueError, match="init_ids must be 5 token ids"):
        inject(llama(), PromptTuning, "auto", num_virtual_tokens=5, init_ids=[1, 2, 3])
    base = llama()
    model = inject(base, PromptTuning, "auto", num_virtual_tokens=5, init_ids=[4, 5, 6, 7, 8])
    assert torch.equal(model.get_input_embeddings().embedding.weight, base.model.embed_tokens.base.weight[4:9])


def test_prefix_for_another_model(tmp_path):
    model = inject(llama(), PrefixTuning, "auto", num_virtual_tokens=P)
    save_adapter(model, tmp_path / "prefix.safetensors")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4))
    before = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError, match="this prefix is for a model with 2 layers, 2 key-value heads of width 8; "
                                         "LlamaForCausalLM has 3 layers, 4 key-value heads"):
        load_adapter(other, tmp_path / "prefix.safetensors")
    assert [n for n, _ in other.named_modules()] == before and not other._forward_pre_hooks
    with pytest.raises(ValueError, match="this prefix is for a model with 3 layers"):
        inject(llama(), PrefixTuning, "auto", layers=3)


def test_call_without_the_prompt_attached():
    model = inject(llama(), PromptTuning, "auto", num_virtual_tokens=P)
    ids, mask = inputs("llama")
    with pytest.raises(RuntimeError, match="did not come through the model it was injected into"):
        model.model(input_ids=ids, attention_mask=mask)           # the inner model has no hook
    with pytest.raises(RuntimeError, match="did not come through"):
        model.get_input_embeddings()(ids)
    model(input_ids=ids, attention_mask=mask)                     # still works afterwards


def test_other_errors():
    model = inject(llama(), PromptTuning, "auto", num_virtual_tokens=P)
    with pytest.raises(ValueError, match="already has a soft prompt"):
        inject(model, PrefixTuning, "auto")
    with pytest.raises(ValueError, match="cannot be merged: a soft prompt is extra input"):
        pefttutor.merge(model)
    with pytest.raises(ValueError, match="task_ids are for MultitaskPromptTuning"):
        model(input_ids=inputs("llama")[0], task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sits at the model's input embedding"):
        inject(llama(), PromptTuning, ["q_proj"])
    with pytest.raises(ValueError, match="encoder='gru'"):
        inject(llama(), PTuning, "auto", encoder="gru")
    with pytest.raises(ValueError, match=r"task_ids must hold one task in \[0, 3\)"):
        pair("llama", "multitask")[1](input_ids=inputs("llama")[0], task_ids=torch.tensor([0, 3]))


@pytest.mark.parametrize("name", ["zoo-decoder", "zoo-encoder"])
def test_zoo_models(name):
    from pefttutor import zoo
    model, tok = (zoo.load_decoder(name) if name == "zoo-decoder"
                  else zoo.load_classifier(name, num_labels=2))
    enc = tok(["the food was great .", "bad"], return_tensors="pt", padding=True)
    for cls in (PromptTuning, PrefixTuning):
        m = inject(copy.deepcopy(model), cls, "auto", num_virtual_tokens=4).eval()
        with torch.no_grad():
            out = m(**enc).logits
        assert torch.isfinite(out).all()
