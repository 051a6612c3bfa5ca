"""AdaLoRA against peft: the forward, the orthogonality loss, and the rank allocator step by step
(importance scores, budgets, masks, the final rank pattern); training through pefttutor.train; errors."""
import copy
import warnings

import pytest
import torch

from pefttutor import AdaLoRALinear, RankAllocator, inject, load_adapter, merge, save_adapter, unmerge
from pefttutor.adalora import orthogonal_loss
from pefttutor.train import train

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, TaskType, get_peft_model  # noqa: E402

from test_prompts import gpt2, llama  # noqa: E402

R, TARGET, T, TINIT, TFINAL = 6, 2, 14, 2, 3


def config(**kw):
    return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=R, target_r=TARGET, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"], total_step=T, tinit=TINIT, tfinal=TFINAL,
                         deltaT=2, **kw)


def pair(make=llama, targets=("q_proj", "v_proj")):
    """(peft model, our model) with the same A, E, B (E perturbed away from zero)."""
    base = make()
    torch.manual_seed(1)
    ref = get_peft_model(copy.deepcopy(base), config() if make is llama else AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM, init_r=R, target_r=TARGET, lora_alpha=8, target_modules=list(targets),
        total_step=T, tinit=TINIT, tfinal=TFINAL))
    ours = inject(copy.deepcopy(base), AdaLoRALinear, list(targets), r=R, alpha=8)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, AdaLoRALinear)}
    torch.manual_seed(2)
    with torch.no_grad():
        for key, v in ref.named_parameters():
            for name in ("A", "E", "B"):
                tag = f".lora_{name}.default"
                if tag in key:
                    if name == "E":
                        v.copy_(torch.randn_like(v))
                    owner = key.split("base_model.model.", 1)[1].split(tag)[0]
                    getattr(layers[owner], name).copy_(v)
    return ref, ours, layers


def batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 96, (4, 9))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("make,targets", [(llama, ("q_proj", "v_proj")), (gpt2, ("c_attn",))])
def test_logits_and_merge_match_peft(make, targets):
    ref, ours, _ = pair(make, targets)
    b = batch()
    b.pop("labels")
    with torch.no_grad():
        a, o = ref(**b).logits, ours(**b).logits
        assert (a - o).abs().max().item() <= 1e-5
        assert (o - make()(**b).logits).abs().max().item() > 1e-3
        merge(ours)
        assert (ours(**b).logits - a).abs().max().item() <= 1e-5
        unmerge(ours)


def test_identity_at_init():
    model = llama()
    b = batch()
    with torch.no_grad():
        plain = model(**b).logits
        inject(model, AdaLoRALinear, ["q_proj", "v_proj"], r=4)
        assert torch.equal(model(**b).logits, plain)


def test_orthogonality_loss_matches_peft():
    ref, ours, _ = pair()
    b = batch()
    with torch.no_grad():
        with_reg = ref(**b).loss
        ref.peft_config["default"].orth_reg_weight = 0.0
        without = ref(**b).loss
    assert abs((with_reg - without).item() / 0.5 - orthogonal_loss(ours).item()) <= 1e-5


def test_allocator_matches_peft_step_by_step():
    """Same weights, same batch, the same SGD step in both; after each step the allocators agree
    on every importance score, the budget, which triplets are masked, and the final pattern."""
    ref, ours, layers = pair()
    alloc = RankAllocator(ours, target_r=TARGET, total_step=T, tinit=TINIT, tfinal=TFINAL, deltaT=2)
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ref.train(), ours.train()
    peft_alloc = ref.base_model.rankallocator
    masked_steps = []
    for step in range(1, T + 3):
        ref(**batch()).loss.backward()
        (ours(**batch()).loss + alloc.regularization()).backward()
        opt_ref.step(), opt_ours.step()
        ref.base_model.update_and_allocate(step)
        before = len(alloc.budgets)
        alloc.update_and_allocate(step)
        if len(alloc.budgets) > before:
            masked_steps.append(step)
            assert alloc.budgets[-1][1] == peft_alloc.budget_schedule(step)[0]
        for key, avg in peft_alloc.exp_avg_ipt.items():
            name = key.split("base_model.model.", 1)[-1]         # peft scores the unwrapped model
            owner, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
            mine = alloc.avg_ipt[f"{owner}.{kind}"]
            assert torch.allclose(mine, avg.view_as(mine), rtol=1e-4, atol=1e-12)
            assert torch.allclose(alloc.avg_unc[f"{owner}.{kind}"], peft_alloc.exp_avg_unc[key].view_as(mine),
                                  rtol=1e-4, atol=1e-12)
        for key, v in ref.named_parameters():
            if ".lora_E.default" in key:
                owner = key.split("base_model.model.", 1)[1].split(".lora_E")[0]
                assert torch.equal(layers[owner].E == 0, v == 0), (step, owner)
        opt_ref.zero_grad(), opt_ours.zero_grad()
    assert masked_steps == [4, 6, 8, 10, 11]          # every deltaT steps, then the final mask at T - tfinal
    final = {k.split("base_model.model.", 1)[-1].split(".lora_E")[0]: v
             for k, v in ref.peft_config["default"].rank_pattern.items()}
    assert final and final == alloc.rank_pattern
    assert sum(alloc.ranks().values()) == TARGET * len(layers)


def test_training_through_train_reallocates_rank():
    model = llama()
    inject(model, AdaLoRALinear, ["q_proj", "v_proj"], r=4, alpha=8)
    alloc = RankAllocator(model, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=2)
    torch.manual_seed(0)
    examples = [{"input_ids": (ids := torch.randint(3, 96, (8,)).tolist()), "labels": ids} for _ in range(16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no "allocator not called" warning
        hist = train(model, examples, pad_id=0, steps=20, batch_size=4, lr=1e-2, progress=False)
    assert len(hist["loss"]) == 20
    assert sum(alloc.ranks().values()) == 2 * 4
    assert alloc.budgets[0][1] < alloc.init_budget and alloc.budgets[-1] == (16, 8)


def test_save_load_keeps_the_mask(tmp_path):
    _, ours, layers = pair()
    with torch.no_grad():
        next(iter(layers.values())).E[:2] = 0
    save_adapter(ours, tmp_path / "adalora.safetensors")
    fresh = load_adapter(llama(), tmp_path / "adalora.safetensors")
    b = batch()
    b.pop("labels")
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, ours(**b).logits)
    assert next(m for m in fresh.modules() if isinstance(m, AdaLoRALinear)).rank == R - 2


def test_errors():
    model = inject(llama(), AdaLoRALinear, ["q_proj", "v_proj"], r=4)
    with pytest.raises(ValueError, match="no budgeting phase"):
        RankAllocator(model, target_r=2, total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="above the initial rank"):
        RankAllocator(model, target_r=6, total_step=10)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        RankAllocator(llama(), total_step=10)
    with pytest.raises(ValueError, match="rank"):
        inject(llama(), AdaLoRALinear, ["q_proj"], r=0)
    # training without an allocator: a warning that says what to do
    model.train()
    with pytest.warns(UserWarning, match="without a RankAllocator"):
        model(**batch()).loss.backward()
    # with one that is never called: a warning after `patience` forwards
    alloc = RankAllocator(model, target_r=2, total_step=10, tinit=1, tfinal=2, patience=3)
    with pytest.warns(UserWarning, match="since the RankAllocator last ran"):
        for _ in range(4):
            model(**batch())
    # called before backward: no gradients
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="has no gradient"):
        alloc.update_and_allocate(1)
    # train() with another number of steps than the allocator plans
    with pytest.raises(ValueError, match="total_step=10"):
        train(model, [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], pad_id=0, steps=5, progress=False)
