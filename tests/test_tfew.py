"""T-Few's losses against a token-by-token loop and against the authors' code; rank classification;
in-context examples; measured FLOPs; the bench entry and its errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pefttutor import bench, data, inject_ia3, tfew, zoo
from pefttutor.train import rank_accuracy

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def setup():
    model, tok = zoo.load_decoder("zoo-decoder")
    model = inject_ia3(model)
    torch.manual_seed(0)
    with torch.no_grad():                       # move the vectors off ones so the model is not the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    split = data.load_task("nli", sizes={"validation": 5})["validation"]
    examples = tfew.encode_choices(split, tok, data.NLI_LABELS)
    return model, tok, split, examples


def _choice_logps(model, choice):
    """Log-probabilities of a choice's label tokens, one forward pass for this choice alone."""
    ids = torch.tensor([choice["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    return [logp[t - 1, tok_id] for t, tok_id in enumerate(choice["labels"]) if tok_id != -100]


def test_encode_choices_shapes_and_errors(setup):
    model, tok, split, examples = setup
    assert len(examples) == 5 and all(len(e["choices"]) == 3 for e in examples)
    for e, y in zip(examples, split["label"]):
        assert e["label"] == y
        prompts = {tuple(c["input_ids"][:c["labels"].index(next(t for t in c["labels"] if t != -100))])
                   for c in e["choices"]}
        assert len(prompts) == 1                  # every choice continues the same input
    with pytest.raises(ValueError, match="at least two answer choices"):
        tfew.encode_choices(split, tok, ["yes"])
    with pytest.raises(ValueError, match="generation task has no choices"):
        tfew.encode_choices(data.load_task("restaurants", sizes={"train": 2})["train"], tok, LABELS)
    batch = tfew.collate_choices(examples[:2], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["gold"].tolist() == [e["label"] for e in examples[:2]]
    with pytest.raises(ValueError, match="same number of choices"):
        tfew.collate_choices([examples[0], {"choices": examples[1]["choices"][:2], "label": 0}], 0)


def test_losses_equal_a_token_by_token_loop(setup):
    model, tok, _, examples = setup
    model.eval()
    batch = tfew.collate_choices(examples, tok.pad_token_id)
    with torch.no_grad():
        got = tfew.losses(model, batch)
        lm_terms, ul_terms, ln = [], [], 0.0
        for e in examples:
            per_choice = [_choice_logps(model, c) for c in e["choices"]]
            lm_terms += [-v for v in per_choice[e["label"]]]
            for c, lps in enumerate(per_choice):
                if c != e["label"]:
                    ul_terms += [-torch.log(1 - lps_t.exp() + 0.01) for lps_t in lps]
            means = torch.stack([torch.stack(lps).mean() for lps in per_choice])
            ln += -torch.log_softmax(means, 0)[e["label"]] / len(examples)
    lm, ul = torch.stack(lm_terms).mean(), torch.stack(ul_terms).mean()
    assert abs(got["lm"] - lm) < 1e-5 and abs(got["ul"] - ul) < 1e-5 and abs(got["ln"] - ln) < 1e-5
    assert abs(got["total"] - (lm + ul + ln)) < 1e-5
    assert abs(tfew.losses(model, batch, 0.5, 2.0)["total"] - (lm + 0.5 * ul + 2.0 * ln)) < 1e-5


def _authors(logp, keep, gold):
    """The three losses as r-three/t-few's EncoderDecoder.training_step computes them, written on
    (B, C, T) tensors of label-token log-probabilities."""
    B, C, T = logp.shape
    lm_loss = -(logp[range(B), gold] * keep[range(B), gold]).sum() / keep[range(B), gold].sum()
    cand_loglikely = logp.clone() + (~keep) * -100
    cand_loglikely[range(B), gold] = -100
    unlikely_loss = -torch.log(1 - torch.exp(cand_loglikely) + 1e-2).sum() / (cand_loglikely != -100).sum()
    choices_scores = -(logp * keep).sum(-1) / keep.sum(-1)
    mc_loss = F.cross_entropy(-choices_scores, gold)
    return lm_loss, unlikely_loss, mc_loss, (cand_loglikely == -100).sum()


def test_losses_match_the_authors_code_up_to_its_constant(setup):
    """Their unlikelihood adds -log(1.01) for every masked position; ours adds nothing. The
    difference is a constant, so the gradients are equal."""
    model, tok, _, examples = setup
    model.eval()
    batch = tfew.collate_choices(examples, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = tfew.losses(model, batch)
    logp, keep = tfew.token_log_probs(model, batch)
    B = len(examples)
    lm, ul, mc, masked = _authors(logp.view(B, 3, -1), keep.view(B, 3, -1), batch["gold"])
    wrong = keep.view(B, 3, -1).sum() - keep.view(B, 3, -1)[range(B), batch["gold"]].sum()
    assert abs(ours["lm"] - lm) < 1e-5 and abs(ours["ln"] - mc) < 1e-5
    assert abs(ours["ul"] - (ul + masked * math.log(1.01) / wrong)) < 1e-5
    g_ours = torch.autograd.grad(ours["total"], params)
    logp, keep = tfew.token_log_probs(model, batch)
    lm, ul, mc, _ = _authors(logp.view(B, 3, -1), keep.view(B, 3, -1), batch["gold"])
    g_theirs = torch.autograd.grad(lm + ul + mc, params)
    assert max((a - b).abs().max().item() for a, b in zip(g_ours, g_theirs)) < 1e-5


def test_prediction_is_rank_classification(setup):
    model, tok, split, examples = setup
    pred = tfew.predict(model, examples, tok.pad_token_id, batch_size=2)
    acc = tfew.accuracy(model, examples, tok.pad_token_id)
    assert acc == sum(p == e["label"] for p, e in zip(pred, examples)) / len(examples)
    for normalize in (False, True):
        assert tfew.accuracy(model, examples, tok.pad_token_id, normalize) == \
            rank_accuracy(model, tok, split, data.NLI_LABELS, normalize)
    with pytest.raises(ValueError, match="no examples"):
        tfew.accuracy(model, [], tok.pad_token_id)


def test_in_context_places_demonstrations_that_fit(setup):
    model, tok, split, _ = setup
    demos = data.load_task("nli", sizes={"train": 30})["train"]
    examples, used = tfew.in_context(split, demos, tok, data.NLI_LABELS, max_length=128)
    assert len(examples) == len(split) and all(n >= 1 for n in used)
    longest = max(len(c["input_ids"]) for e in examples for c in e["choices"])
    assert longest <= 128
    first = tok.decode(examples[0]["choices"][0]["input_ids"])
    assert first.count("=>") == used[0] + 1 and demos["hypothesis"][0] in first
    none, zero = tfew.in_context(split, demos.select([]), tok, data.NLI_LABELS)
    assert zero == [0] * len(split)
    with pytest.raises(ValueError, match="raise max_length"):
        tfew.in_context(split, demos, tok, data.NLI_LABELS, max_length=10)


def test_forward_flops_count_the_matrix_products(setup):
    model, tok, _, examples = setup
    e = examples[0]
    flops = tfew.forward_flops(model, [e])
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    # 2 per multiply-add: every linear layer on every token, then Q K^T and the weighted sum of V
    expected = sum(2 * linear * len(c["input_ids"]) + 4 * len(c["input_ids"]) ** 2 * cfg.hidden_size
                   * cfg.num_hidden_layers for c in e["choices"])
    assert flops == expected
    assert model.config._attn_implementation == "sdpa"          # restored after counting
    assert tfew.forward_flops(model, examples[:2]) == (expected + tfew.forward_flops(model, examples[1:2])) / 2
    step = tfew.train_step_flops(model, examples, tok.pad_token_id, batch_size=2)
    assert step > 2 * 2 * tfew.forward_flops(model, examples[:2])     # backward costs about twice forward
    assert all(p.grad is None for p in model.parameters())


def test_the_bench_runs_tfew_and_refuses_what_it_cannot_do():
    record = bench.run("tfew", "sentiment", 0, 0.1, steps=3, batch_size=4, progress=False,
                       sizes={"train": 8, "validation": 4, "test": 4})
    assert record["trainable"] == 1536 and len(record["loss"]) == 3
    assert record["validation"] in (0, 0.25, 0.5, 0.75, 1) and record["memory_mb"] > 0
    assert "tfew" in bench.METHODS and bench.method("tfew").rank_choices
    with pytest.raises(ValueError, match="needs a classification task and a decoder"):
        bench.run("tfew", "restaurants", steps=1)
    with pytest.raises(ValueError, match="needs a classification task and a decoder"):
        bench.run("tfew", "sentiment", model="zoo-encoder", steps=1)
    with pytest.raises(ValueError, match="unlikelihood=-1 must be >= 0"):
        tfew.loss_fn(unlikelihood=-1)


def test_train_with_choices_lowers_the_loss():
    from pefttutor.train import train
    model, tok = zoo.load_decoder("zoo-decoder")
    model = inject_ia3(copy.deepcopy(model))
    split = data.load_task("sentiment", sizes={"train": 16})["train"]
    examples = tfew.encode_choices(split, tok, LABELS)
    history = train(model, examples, pad_id=tok.pad_token_id, steps=8, batch_size=16, lr=0.1,
                    loss_fn=tfew.loss_fn(), collate_fn=tfew.collate_choices, progress=False)
    assert history["loss"][-1] < history["loss"][0]


def test_templates_are_checked_and_used(setup):
    model, tok, split, _ = setup
    plain = tfew.encode_choices(split, tok, data.NLI_LABELS, template="{text}")
    arrow = tfew.encode_choices(split, tok, data.NLI_LABELS)
    assert all(len(a["choices"][0]["input_ids"]) > len(p["choices"][0]["input_ids"]) for a, p in zip(arrow, plain))
    assert "=>" not in tok.decode(plain[0]["choices"][0]["input_ids"])
    for bad in ["=> {text}", "{text} {text}", "no text", 3]:
        with pytest.raises(ValueError, match="must start with"):
            tfew.encode_choices(split, tok, data.NLI_LABELS, template=bad)
        with pytest.raises(ValueError, match="must start with"):
            tfew.in_context(split, split, tok, data.NLI_LABELS, template=bad)


def test_icl_run_makes_a_record():
    record = tfew.icl_run("sentiment", seed=1, k=2, sizes={"train": 40, "test": 6}, flops_examples=2)
    assert record["k"] == 2 and record["demos"] >= 1 and record["sizes"] == {"train": 40, "test": 6}
    assert record["accuracy"] in {i / 6 for i in range(7)} and record["flops"] > 0
    assert "icl_run('sentiment', seed=1" in record["command"]
    with pytest.raises(ValueError, match="generation task"):
        tfew.icl_run("restaurants")


def test_the_stores_hold_the_few_shot_comparison():
    """The chapter's table: T-Few on the knowledge task's few-shot split (every rate on seed 0,
    three seeds at the chosen one), with and without its two extra losses, beside in-context
    learning (zero-shot and three draws of demonstrations)."""
    records = bench.load()
    for hp in (None, {"unlikelihood": 0, "length_norm": 0}):
        rows = bench._config(records, "zoo-decoder", "tfew", "knowledge", hp, "few_shot")
        assert {r["lr"] for r in rows if r["seed"] == 0} == set(bench.METHODS["tfew"].lrs)
        tab = bench.table(records, ["tfew"], ["knowledge"], hparams={"tfew": hp} if hp else None,
                          train_split="few_shot")
        assert tab[("tfew", "knowledge")]["seeds"] == 3
    icl = [r for r in tfew.icl_load() if r["task"] == "knowledge" and r["template"] == tfew.TEMPLATE]
    assert sorted((r["k"], r["seed"]) for r in icl) == [(0, 0), (16, 0), (16, 1), (16, 2)]
    assert all(r["sizes"] is None and r["model"] == "zoo-decoder" for r in icl)
