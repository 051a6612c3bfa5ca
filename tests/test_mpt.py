"""Multitask prompt tuning's two stages: the source prompt's distillation loss and the target's start
from the source (against peft's MultitaskPromptTuningInit), the language-model form of the tasks,
rank classification, and the errors."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_prompts import llama            # the same tiny Llama (GQA: 4 heads, 2 key-value heads)
from transformers import LlamaForSequenceClassification

from pefttutor import MultitaskPromptTuning, PromptTuning, inject, save_adapter, trainable_parameters, zoo
from pefttutor import data
from pefttutor.prompts import Distillation, from_source
from pefttutor.train import choice_scores, rank_accuracy

peft = pytest.importorskip("peft")
from peft import (MultitaskPromptTuningConfig, MultitaskPromptTuningInit, TaskType,  # noqa: E402
                  get_peft_model)

P, RANK, TASKS = 5, 2, 3


def source_model():
    """A source multitask prompt with 3 tasks, every factor away from its initial value."""
    model = inject(llama(), MultitaskPromptTuning, "auto", num_virtual_tokens=P, num_tasks=TASKS, rank=RANK)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.get_input_embeddings().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def ids_and_mask():
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (2, 7))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("how", ["average", "exact", "shared"])
def test_from_source_matches_peft(tmp_path, how):
    source = source_model()
    prompt = source.get_input_embeddings()
    ours_file, peft_file = tmp_path / "source.safetensors", tmp_path / "peft_source.safetensors"
    save_adapter(source, ours_file)
    save_file({"prompt_embeddings": prompt.embedding.weight.detach().clone(),
               "prefix_task_cols": prompt.prefix_task_cols.detach().clone(),
               "prefix_task_rows": prompt.prefix_task_rows.detach().clone()}, str(peft_file))
    init = {"average": MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
            "exact": MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
            "shared": MultitaskPromptTuningInit.ONLY_SOURCE_SHARED}[how]
    base = llama()
    torch.manual_seed(1)
    ref = get_peft_model(copy.deepcopy(base), MultitaskPromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, num_tasks=1, num_ranks=RANK,
        prompt_tuning_init=init, prompt_tuning_init_task=1,
        prompt_tuning_init_state_dict_path=str(peft_file))).eval()
    ours = inject(copy.deepcopy(base), MultitaskPromptTuning, "auto", num_virtual_tokens=P, rank=RANK).eval()
    mine = ours.get_input_embeddings()
    if how == "shared":                       # the task vectors keep their random start: use peft's
        with torch.no_grad():
            enc = ref.prompt_encoder.default
            mine.prefix_task_cols.copy_(enc.prefix_task_cols), mine.prefix_task_rows.copy_(enc.prefix_task_rows)
    from_source(ours, ours_file, how, task=1 if how == "exact" else None)
    ids, mask = ids_and_mask()
    task_ids = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        b = ours(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    # the three starts differ, and "average" averages u and v, not the products u v
    want = {"average": prompt.prefix_task_cols.mean(0), "exact": prompt.prefix_task_cols[1]}.get(how)
    if want is not None:
        assert torch.equal(mine.prefix_task_cols[0], want.detach())
    if how == "average":
        product = (prompt.prefix_task_cols @ prompt.prefix_task_rows).mean(0)
        assert not torch.allclose(mine.prefix_task_cols[0] @ mine.prefix_task_rows[0], product, atol=1e-3)


def test_from_source_takes_a_model_and_fills_every_target_task():
    source = source_model()
    target = inject(llama(LlamaForSequenceClassification, num_labels=2), MultitaskPromptTuning, "auto",
                    num_virtual_tokens=P, num_tasks=2, rank=RANK)
    from_source(target, source)
    s, t = source.get_input_embeddings(), target.get_input_embeddings()
    assert torch.equal(t.embedding.weight, s.embedding.weight)
    for k in range(2):
        assert torch.allclose(t.prefix_task_rows[k], s.prefix_task_rows.mean(0))


def test_from_source_errors(tmp_path):
    source = source_model()
    with pytest.raises(ValueError, match="inject one first"):
        from_source(inject(llama(), PromptTuning, "auto", num_virtual_tokens=P), source)
    longer = inject(llama(), MultitaskPromptTuning, "auto", num_virtual_tokens=P + 1, rank=RANK)
    with pytest.raises(ValueError, match=r"source shared prompt \(5, 32\).*this model's \(6, 32\)"):
        from_source(longer, source)
    other_rank = inject(llama(), MultitaskPromptTuning, "auto", num_virtual_tokens=P, rank=1)
    with pytest.raises(ValueError, match="same embedding width"):
        from_source(other_rank, source)
    target = inject(llama(), MultitaskPromptTuning, "auto", num_virtual_tokens=P, rank=RANK)
    with pytest.raises(ValueError, match=r"pass task=k with k in \[0, 3\)"):
        from_source(target, source, "exact")
    with pytest.raises(ValueError, match="how='mean'"):
        from_source(target, source, "mean")
    with pytest.raises(ValueError, match="task=1 goes with how='exact'"):
        from_source(target, source, "average", task=1)
    plain = inject(llama(), PromptTuning, "auto", num_virtual_tokens=P)
    save_adapter(plain, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds no multitask prompt"):
        from_source(target, tmp_path / "plain.safetensors")


def teachers_equal_to(student):
    """One PromptTuning per task whose prompt is exactly the student's prompt for that task."""
    out = []
    prompt = student.get_input_embeddings()
    for k in range(TASKS):
        teacher = inject(llama(), PromptTuning, "auto", num_virtual_tokens=P).eval()
        with torch.no_grad():
            teacher.get_input_embeddings().embedding.weight.copy_(prompt.prompts(1, torch.tensor([k]))[0])
        out.append(teacher)
    return out


def lm_batch():
    ids, mask = ids_and_mask()
    ids = torch.cat([ids, ids.flip(0)])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor([0, 2, 1, 2])}


def test_distillation_against_the_student_itself_is_the_lm_loss():
    student = source_model().eval()
    loss_fn = Distillation(teachers_equal_to(student), lam=1.0)
    batch = lm_batch()
    loss = loss_fn(student, batch)
    assert loss_fn.last["kl"] <= 1e-6 and loss_fn.last["mse"] <= 1e-10
    with torch.no_grad():
        lm = student(**batch).loss
    assert abs(loss.item() - lm.item()) <= 1e-5


def test_distillation_trains_the_student_only():
    student = source_model().train()
    teachers = [inject(llama(), PromptTuning, "auto", num_virtual_tokens=P) for _ in range(TASKS)]
    loss_fn = Distillation(teachers, lam=0.5)
    loss = loss_fn(student, lm_batch())
    assert loss_fn.last["kl"] > 1e-5 and loss_fn.last["mse"] > 1e-6      # other prompts: something to distil
    assert abs(loss.item() - (loss_fn.last["lm"] + 0.5 * (loss_fn.last["kl"] + loss_fn.last["mse"]))) < 1e-4
    loss.backward()
    prompt = student.get_input_embeddings()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (prompt.embedding.weight, prompt.prefix_task_cols, prompt.prefix_task_rows))
    # task 1's vectors get gradient (one row of task 1), so do 0 and 2
    assert all(prompt.prefix_task_rows.grad[k].abs().sum() > 0 for k in range(TASKS))
    assert all(p.grad is None for t in teachers for p in t.parameters())
    with pytest.raises(ValueError, match="task id 2 has no teacher: 2 teachers"):
        Distillation(teachers[:2])(student, lm_batch())
    with pytest.raises(ValueError, match="one teacher model per source task"):
        Distillation([])


def test_text_to_text_encoding_and_task_ids():
    tok = zoo.load_tokenizer("zoo-decoder")
    split = data.load_task("nli", sizes={"train": 6})["train"]
    enc = data.encode_text_to_text(split, tok, data.NLI_LABELS, task_id=4)
    for e, y in zip(enc, split["label"]):
        target = [t for t in e["labels"] if t != -100]
        assert tok.decode(target[:-1]).strip() == data.NLI_LABELS[y] and target[-1] == tok.eos_token_id
        assert e["input_ids"][-len(target):] == target and e["task_ids"] == 4
        assert tok.decode(e["input_ids"][:-len(target)]).endswith("=>")
    short = data.encode_text_to_text(split, tok, data.NLI_LABELS, max_length=16)
    assert all(len(e["input_ids"]) <= 16 and tok.decode(e["input_ids"]).count("=>") == 1 for e in short)
    batch = data.collate(enc, tok.pad_token_id)
    assert batch["task_ids"].tolist() == [4] * 6
    with pytest.raises(ValueError, match="use encode_generation"):
        data.encode_text_to_text(data.load_task("restaurants", sizes={"train": 2})["train"], tok, ["x"])


def test_choice_scores_are_the_label_log_likelihood():
    model, tok = zoo.load_decoder("zoo-decoder")
    split = data.load_task("sentiment", sizes={"validation": 4})["validation"]
    enc = data.encode_text_to_text(split, tok, ["negative", "positive"])
    scores = choice_scores(model, [[e] for e in enc], tok.pad_token_id)
    with torch.no_grad():
        for e, (s,) in zip(enc, scores):
            out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
            n = sum(t != -100 for t in e["labels"])
            assert abs(-out.loss.item() * n - s) < 1e-4
    mean = choice_scores(model, [[e] for e in enc], tok.pad_token_id, normalize=True)
    assert all(abs(m[0] * sum(t != -100 for t in e["labels"]) - s[0]) < 1e-4
               for m, s, e in zip(mean, scores, enc))
    with_prompt = inject(copy.deepcopy(model), PromptTuning, "auto", num_virtual_tokens=4)
    acc = rank_accuracy(with_prompt, tok, split, ["negative", "positive"])
    assert acc in (0, 0.25, 0.5, 0.75, 1)


def test_the_bench_entry_starts_from_the_shipped_source():
    from pefttutor import bench
    path = bench.mpt_source("zoo-decoder")                 # shipped with the package: no training
    assert path.parent == bench.MPT_SHIPPED and path.exists()
    model, _ = zoo.load_classifier("zoo-decoder", num_labels=3)
    bench.method("mpt").apply(model, "pair")
    source = {k.rsplit(".", 1)[-1] if "prefix_task" in k else "shared": v
              for k, v in load_file(str(path)).items()}
    prompt = model.get_input_embeddings()
    assert torch.equal(prompt.embedding.weight, source["shared"])
    assert torch.equal(prompt.prefix_task_cols[0], source["prefix_task_cols"].mean(0))
    assert torch.equal(prompt.prefix_task_rows[0], source["prefix_task_rows"].mean(0))
    assert trainable_parameters(model).trainable == 128 * 3 + 20 * 128 + 20 + 128     # head, P*, u, v
    with pytest.raises(ValueError, match="needs a decoder"):
        bench.mpt_source("zoo-encoder")
    with pytest.raises(ValueError, match="at least two source tasks"):
        bench.mpt_source("zoo-decoder", sources=["nli"])
