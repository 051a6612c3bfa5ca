"""(IA)3 against peft on copied weights: forward, merge, counts; save / load; the errors."""
import copy

import pytest
import torch
from transformers import LlamaForSequenceClassification

from pefttutor import (IA3Linear, inject_ia3, load_adapter, merge, save_adapter, trainable_parameters, unload,
                       unmerge)
from pefttutor.ia3 import default_targets

peft = pytest.importorskip("peft")
from peft import IA3Config, TaskType, get_peft_model  # noqa: E402

from test_prompts import bert, gpt2, llama, roberta  # noqa: E402

BASES = {"llama": llama, "gpt2": gpt2, "bert": bert, "roberta": roberta,
         "llama-cls": lambda: llama(LlamaForSequenceClassification, num_labels=3)}


def task_type(model):
    return TaskType.SEQ_CLS if "SequenceClassification" in type(model).__name__ else TaskType.CAUSAL_LM


def pair(name):
    """(peft model, our model) with the same scale vectors, perturbed away from ones."""
    base = BASES[name]()
    ref = get_peft_model(copy.deepcopy(base), IA3Config(task_type=task_type(base))).eval()
    ours = inject_ia3(copy.deepcopy(base)).eval()
    torch.manual_seed(3)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    with torch.no_grad():
        for key, v in ref.named_parameters():
            if ".ia3_l.default" in key:
                v.add_(torch.randn_like(v))
                owner = key.split("base_model.model.", 1)[1].rsplit(".ia3_l.default", 1)[0]
                layers.pop(owner).scale.copy_(v.flatten())
    assert not layers                          # every one of our layers has peft's counterpart
    return ref, ours


def inputs():
    torch.manual_seed(2)
    return torch.randint(3, 96, (2, 7)), torch.ones(2, 7, dtype=torch.long)


@pytest.mark.parametrize("name", list(BASES))
def test_logits_match_peft(name):
    ref, ours = pair(name)
    ids, mask = inputs()
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
        plain = BASES[name]()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        moved = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert (a - b).abs().max().item() <= 1e-5
    # the vectors do change the model (a tiny classifier's logits move little, so look at the last hidden state)
    assert (moved - plain.hidden_states[-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_merge_matches_peft(name):
    ref, ours = pair(name)
    ids, mask = inputs()
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        merged_ref = ref.merge_and_unload()
        plain = unload(copy.deepcopy(ours))
        theirs, mine = merged_ref.state_dict(), plain.state_dict()
        assert sorted(theirs) == sorted(mine)
        assert max((theirs[k] - mine[k]).abs().max().item() for k in theirs) <= 1e-6
        merge(ours)
        assert (ours(input_ids=ids, attention_mask=mask).logits - before).abs().max().item() <= 1e-5
        unmerge(ours)
        assert (ours(input_ids=ids, attention_mask=mask).logits - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(BASES))
def test_trainable_count_matches_peft(name):
    base = BASES[name]()
    ref = get_peft_model(copy.deepcopy(base), IA3Config(task_type=task_type(base)))
    heads = ["score"] if name == "llama-cls" else ["classifier"] if name in ("bert", "roberta") else []
    ours = inject_ia3(copy.deepcopy(base), modules_to_save=heads)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert trainable_parameters(ours).trainable == n_ref


def test_identity_at_init_and_feedforward_convention():
    model = llama()
    ids, mask = inputs()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        inject_ia3(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    down = model.model.layers[0].mlp.down_proj
    k = model.model.layers[0].self_attn.k_proj
    assert down.feedforward and down.scale.shape == (down.in_features,)
    assert not k.feedforward and k.scale.shape == (k.out_features,)
    assert default_targets(model) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])


def test_save_load_round_trip(tmp_path):
    _, ours = pair("gpt2")
    save_adapter(ours, tmp_path / "ia3.safetensors")
    fresh = load_adapter(gpt2(), tmp_path / "ia3.safetensors")
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits,
                           ours(input_ids=ids, attention_mask=mask).logits)
    assert sum(isinstance(m, IA3Linear) and m.feedforward for m in fresh.modules()) == 2


def test_errors():
    model = llama()
    with pytest.raises(ValueError, match="must be among its targets"):
        inject_ia3(model, targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    assert not any(isinstance(m, IA3Linear) for m in model.modules())          # nothing changed
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    other = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="no default targets"):
        inject_ia3(other)
    inject_ia3(other, targets=["query_key_value", "dense_4h_to_h"], feedforward=["dense_4h_to_h"])
    layer = inject_ia3(llama()).model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.scale[0] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="scale vector are 0"):
        layer.unmerge()
