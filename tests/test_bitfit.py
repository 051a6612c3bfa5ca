"""BitFit: the same training as peft's bias="all", the paper's subset, merge, save / load, errors."""
import copy
import re

import pytest
import torch

from pefttutor import BitFit, inject, load_adapter, merge, save_adapter, trainable_parameters, unload, unmerge
from pefttutor.bitfit import bias_names

peft = pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

from test_prompts import bert, gpt2, llama, roberta  # noqa: E402


def batch():
    torch.manual_seed(2)
    return {"input_ids": torch.randint(3, 96, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
            "labels": torch.tensor([0, 1, 2, 1])}


def steps(model, n=5, lr=1e-2):
    # no weight decay: decay pulls a bias toward zero in peft but a delta toward zero (the bias toward its
    # pretrained value) in ours, so the two forms train identically only without it
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(n):
        model(**batch()).loss.backward()
        opt.step(), opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("make", [bert, roberta])
def test_training_matches_peft_bias_all(make):
    """peft trains the biases in place (bias="all", with LoRA frozen at B = 0); we train a delta
    beside each frozen bias. Same gradients, same AdamW state, so the same model after training."""
    base = make()
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query"],
                                                         bias="all"))
    for n, p in ref.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    # every bias, the pooler's too (peft's bias="all" trains it); the classifier trains in full
    every = "|".join(re.escape(n) for n in bias_names(base) if not n.startswith("classifier"))
    ours = inject(copy.deepcopy(base), BitFit, every, modules_to_save=["classifier"])
    theirs = {n.split("base_model.model.", 1)[1].replace(".base_layer", "").replace(".modules_to_save.default", "")
              for n, p in ref.named_parameters() if p.requires_grad and n.endswith(".bias")}
    mine = {n[:-len(".delta")] + ".bias" for n, p in ours.named_parameters() if n.endswith(".delta")}
    mine |= {n for n, p in ours.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert theirs == mine                       # the same biases train (LayerNorms' included)
    assert trainable_parameters(ours).trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    steps(ref), steps(ours)
    b = batch()
    b.pop("labels")
    with torch.no_grad():
        diff = (ref(**b).logits - ours(**b).logits).abs().max().item()
    assert diff <= 1e-5
    with torch.no_grad():
        moved = (ours(**b).logits - base(**b).logits).abs().max().item()
    assert moved > 1e-3


def test_paper_subset_and_counts():
    model = inject(bert(), BitFit, "paper")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BitFit))
    assert wrapped == [f"bert.encoder.layer.{i}.{s}" for i in range(2)
                       for s in ("attention.self.query", "intermediate.dense")]
    assert trainable_parameters(model).trainable == 2 * (32 + 64)
    everything = inject(bert(), BitFit, "all")
    expected = sum(m.bias.numel() for n, m in bert().named_modules()
                   if n in bias_names(bert()) and "classifier" not in n and "pooler" not in n)
    assert trainable_parameters(everything).trainable == expected


def test_identity_merge_and_round_trip(tmp_path):
    model = inject(gpt2(), BitFit, "all")
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        for m in model.modules():
            if isinstance(m, BitFit):
                m.delta.normal_()
        assert (model(input_ids=ids).logits - plain).abs().max() > 1e-3
        moved = model(input_ids=ids).logits
        merge(model)
        assert (model(input_ids=ids).logits - moved).abs().max() <= 1e-5
        unmerge(model)
        save_adapter(model, tmp_path / "bitfit.safetensors")
        fresh = load_adapter(gpt2(), tmp_path / "bitfit.safetensors")
        assert torch.equal(fresh(input_ids=ids).logits, moved)
        assert (unload(fresh)(input_ids=ids).logits - moved).abs().max() <= 1e-5


def test_errors():
    with pytest.raises(ValueError, match="no bias terms"):
        inject(llama(), BitFit, "all")
    with pytest.raises(ValueError, match="no module with a bias"):
        inject(bert(), BitFit, ["nothing_here"])
    with pytest.raises(TypeError, match="has a bias"):
        BitFit(torch.nn.Linear(3, 3, bias=False))
