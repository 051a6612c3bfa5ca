"""The training loop and the evaluations."""
import pytest
import torch

from pefttutor import LoRALinear, inject, zoo
from pefttutor.data import encode_classification, encode_generation, load_task
from pefttutor.train import accuracy, autocast_dtype, eval_loss, generation_scores, train


def test_train_lora_classifier_learns_and_is_seeded():
    task = load_task("reviews", sizes={"train": 256, "validation": 64, "test": 64})
    runs = []
    for _ in range(2):
        torch.manual_seed(0)                  # the new classification head is initialised at load time
        model, tok = zoo.load_classifier("zoo-decoder")
        inject(model, LoRALinear, ["q_proj", "v_proj"], r=4, alpha=8, modules_to_save=zoo.head_names(model))
        data = encode_classification(task["train"], tok)
        val = encode_classification(task["validation"], tok)
        hist = train(model, data, pad_id=tok.pad_token_id, steps=40, lr=3e-3, progress=False,
                     evaluate=lambda m: {"acc": accuracy(m, val, tok.pad_token_id)}, eval_every=20)
        runs.append(hist)
    assert runs[0]["loss"] == runs[1]["loss"]
    assert [e["step"] for e in runs[0]["eval"]] == [20, 40]
    assert sum(runs[0]["loss"][-5:]) < sum(runs[0]["loss"][:5])
    assert runs[0]["eval"][-1]["acc"] > 0.6


def test_generation_metrics_run():
    model, tok = zoo.load_decoder()
    task = load_task("restaurants", sizes={"train": 8, "validation": 8, "test": 8})
    loss = eval_loss(model, encode_generation(task["validation"], tok), tok.pad_token_id)
    assert 0 < loss < 20
    scores = generation_scores(model, tok, task["validation"], n=4, max_new_tokens=8)
    assert set(scores) == {"slot_acc", "exact"} and 0 <= scores["slot_acc"] <= 1


def test_no_trainable_parameters_is_an_error():
    model, tok = zoo.load_encoder()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, [{"input_ids": [1, 2], "labels": 0}], pad_id=0, steps=1, progress=False)


def test_autocast_choice():
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
