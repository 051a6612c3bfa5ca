"""The bench: registry, harness, store, table, command line, and one stored record reproduced."""
import json
import math
import pathlib

import pytest

from pefttutor import bench, data, zoo
from pefttutor.plot import comparison

TINY = {"train": 64, "validation": 32, "test": 32}


def test_registry_has_every_method_of_the_table():
    for name in ("head", "full", "lora", "krona", "fedpara", "qlora"):
        m = bench.method(name)
        assert len(m.lrs) >= 3 and callable(m.apply)
    with pytest.raises(ValueError, match=r"unknown method 'lorra': the registry has \[.*'lora'.*register"):
        bench.method("lorra")


@pytest.mark.parametrize("name", ["head", "full", "lora", "krona", "fedpara", "qlora", "houlsby", "pfeiffer",
                                  "parallel", "adapterdrop", "prompt", "ptuning", "prefix", "ptuning-v2", "mpt",
                                  "adalora", "ia3"])
def test_run_returns_one_record(name):
    record = bench.run(name, "nli", seed=1, lr=1e-3, steps=2, batch_size=8, sizes=TINY, progress=False)
    assert (record["method"], record["task"], record["seed"], record["lr"]) == (name, "nli", 1, 1e-3)
    assert 0 <= record["validation"] <= 1 and 0 <= record["test"] <= 1
    assert record["hparams"] == bench.METHODS[name].defaults and record["metric"] == "accuracy"
    assert 0 < record["trainable"] <= record["total"] and record["memory_mb"] > 0
    assert len(record["loss"]) == 2 and record["version"] and "bench.run('" in record["command"]
    model, _ = zoo.load_classifier("zoo-decoder", num_labels=3)
    head = 128 * 3                                   # LlamaForSequenceClassification.score, no bias
    adapter = 2 * 8 * 128 + 8 + 128                  # 2 m d + m + d with m = 8
    norms = 2 * 128                                   # Houlsby trains each layer's two RMSNorms (and the last)
    per_layer = {"head": 0, "lora": 2 * 2 * 8 * 128, "fedpara": 2 * 2 * 2 * 4 * 128,
                 "krona": 2 * (8 * 8 + 16 * 16), "houlsby": 2 * adapter + norms, "pfeiffer": adapter,
                 "parallel": adapter, "adapterdrop": 2 * adapter / 3}      # layers 1 and 2 of 3
    if name in per_layer:
        assert record["trainable"] == head + 3 * per_layer[name] + (128 if name == "houlsby" else 0)
    if name == "full":
        assert record["trainable"] == sum(p.numel() for p in model.parameters())
    mlp = 128 * 128 + 128                             # a Linear(128, 128) with its bias
    prompts = {"prompt": 20 * 128,                    # p d
               "ptuning": 20 * 128 + 3 * mlp,         # the inputs and the MLP encoder
               "prefix": 20 * 128 + mlp + 128 * 768 + 768,   # P' and the MLP up to L 2 d = 768
               "ptuning-v2": 20 * 3 * 2 * 128,        # p L 2 n_kv d_h
               "mpt": 20 * 128 + 20 + 128}            # P*, u, v
    if name in prompts:
        assert record["trainable"] == head + prompts[name]
    first = model.model.layers[0]
    if name == "adalora":                             # r (in + out + 1) for W_q and W_v, r = 12
        qv = sum(12 * (m.in_features + m.out_features + 1) for m in (first.self_attn.q_proj, first.self_attn.v_proj))
        assert record["trainable"] == head + 3 * qv
    if name == "ia3":                                 # the outputs of W_k, W_v, the input of the down projection
        vectors = (first.self_attn.k_proj.out_features + first.self_attn.v_proj.out_features
                   + first.mlp.down_proj.in_features)
        assert record["trainable"] == head + 3 * vectors


def test_bitfit_needs_biases():
    with pytest.raises(ValueError, match="no bias terms"):
        bench.run("bitfit", "nli", seed=0, steps=2, batch_size=8, sizes=TINY, progress=False)
    record = bench.run("bitfit", "nli", seed=0, steps=2, batch_size=8, sizes=TINY, progress=False,
                       model="zoo-encoder")
    model, _ = zoo.load_classifier("zoo-encoder", num_labels=3)
    heads = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] == "classifier"
                or ".pooler." in f".{n}")
    biases = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(".bias") and ".pooler." not in f".{n}" and not n.startswith("classifier"))
    assert record["trainable"] == heads + biases


def test_few_shot_runs_are_their_own_configuration(tmp_path):
    record = bench.run("lora", "nli", seed=0, lr=1e-3, steps=2, batch_size=8, sizes=TINY,
                       train_split="few_shot", progress=False)
    assert record["train_split"] == "few_shot" and "train_split='few_shot'" in record["command"]
    record.update(sizes=None, steps=150, batch_size=32)       # as the default budget stores it
    plain = {**record, "train_split": "train", "test": 0.25}
    few = {**record, "test": 0.75}
    tab = bench.table([plain, few], ["lora"], ["nli"])
    assert tab[("lora", "nli")]["mean"] == 0.25
    assert bench.table([plain, few], ["lora"], ["nli"], train_split="few_shot")[("lora", "nli")]["mean"] == 0.75
    with pytest.raises(ValueError, match="train_split='dev': choose 'train' or 'few_shot'"):
        bench.run("lora", "nli", train_split="dev")


def test_fusion_trains_its_sources_once_and_fuses_the_target_too(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTTUTOR_CACHE", str(tmp_path))
    real_fit, sources_fit = bench.fit, []

    def quick_fit(name, task, *args, **kw):         # stage 1, shortened for the test
        if name == "pfeiffer":
            sources_fit.append(task)
            kw = {**kw, "steps": 2, "sizes": TINY}
        return real_fit(name, task, *args, **kw)
    monkeypatch.setattr(bench, "fit", quick_fit)
    kw = dict(seed=0, lr=1e-3, steps=2, batch_size=8, sizes=TINY, progress=False, sources=["reviews", "knowledge"])
    first = bench.run("fusion", "nli", **kw)
    assert sorted(sources_fit) == ["knowledge", "nli", "reviews"]             # the target's own adapter too
    assert len(list((tmp_path / "fusion_sources").glob("*.safetensors"))) == 3
    assert first["trainable"] == 128 * 3 + 3 * (3 * 128 * 128 + 2 * 128)    # head + Q, K, V per layer
    again = bench.run("fusion", "nli", **kw)
    assert len(sources_fit) == 3                                               # cached: not trained again
    assert again["loss"] == first["loss"]                                      # and the same run


def test_run_generation_and_the_frozen_baseline():
    record = bench.run("head", "restaurants", steps=2, sizes={"train": 16, "validation": 4, "test": 4},
                       progress=False)
    assert record["trainable"] == 0 and record["loss"] == [] and record["metric"] == "slot accuracy"
    record = bench.run("lora", "restaurants", steps=2, sizes={"train": 16, "validation": 4, "test": 4},
                       progress=False)
    assert record["trainable"] == 3 * 2 * 2 * 8 * 128        # LoRA only: the LM head stays tied, frozen


def test_run_refuses_unknown_hyperparameters_and_bad_values():
    with pytest.raises(TypeError, match="method 'lora' has no hyperparameter 'rank'.*'alpha', 'r', 'targets'"):
        bench.run("lora", "nli", rank=4)
    with pytest.raises(ValueError, match="lr"):
        bench.run("lora", "nli", lr=-1.0)
    with pytest.raises(ValueError, match="unknown task"):
        bench.run("lora", "glue")


def test_an_encoder_is_refused_a_generation_task_by_its_architecture():
    # by name and by path: the check reads the model's configuration, not its zoo name
    assert bench.is_encoder("zoo-encoder") and not bench.is_encoder("zoo-decoder")
    for model in ("zoo-encoder", zoo.resolve("zoo-encoder")):
        with pytest.raises(ValueError, match="generates text and .* is an encoder; use a decoder"):
            bench.run("lora", "restaurants", model=model)


def _fake_run(calls):
    def run(name, task, seed=0, lr=None, **kw):
        calls.append((name, task, seed, lr))
        m = bench.method(name)
        unknown = set(kw) - set(m.defaults) - {"model", "progress", "train_split"}
        if unknown:                                                  # as bench.fit does
            raise TypeError(f"method {name!r} has no hyperparameter {unknown.pop()!r}")
        budget = bench.BUDGETS[data.task_info(task).kind]
        val = 0.9 - abs(math.log10(lr) + 2.5) / 10           # best at lr = 3e-3
        return {"model": kw.get("model", "zoo-decoder"), "method": name, "task": task, "seed": seed,
                "lr": lr, "hparams": {**m.defaults, **{k: v for k, v in kw.items() if k in m.defaults}},
                "steps": budget.steps, "batch_size": budget.batch_size, "sizes": None,
                "metric": "accuracy", "validation": val, "test": val - 0.01 * seed,
                "trainable": 10, "total": 100, "step_ms": 5.0, "memory_mb": 1.0, "seconds": 1.0,
                **({"train_split": kw["train_split"]} if kw.get("train_split", "train") != "train" else {})}
    return run


def test_sweep_picks_the_rate_on_validation_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "run", _fake_run(calls))
    store = tmp_path / "bench.jsonl"
    bench.sweep(["lora", "head"], ["nli"], seeds=(0, 1, 2), path=store, progress=False, log=lambda *_: None)
    assert len(calls) == len(bench.METHODS['lora'].lrs) + len(bench.METHODS['head'].lrs) + 2 * 2
    assert [c for c in calls if c[0] == "lora" and c[2] > 0] == [("lora", "nli", 1, 3e-3), ("lora", "nli", 2, 3e-3)]
    calls.clear()
    bench.sweep(["lora", "head"], ["nli"], seeds=(0, 1, 2), path=store, progress=False, log=lambda *_: None)
    assert calls == []                                         # everything is in the store
    bench.sweep(["lora"], ["nli"], seeds=(0, 1), hparams={"lora": {"r": 2}}, path=store,
                progress=False, log=lambda *_: None)
    assert len(calls) == len(bench.METHODS['lora'].lrs) + 1   # another configuration is another sweep
    tab = bench.table(bench.load(store), ["lora", "head"], ["nli"])
    cell = tab[("lora", "nli")]
    assert cell["lr"] == 3e-3 and cell["seeds"] == 3
    best = 0.9 - abs(math.log10(3e-3) + 2.5) / 10                   # the fake's validation at 3e-3
    assert cell["mean"] == pytest.approx(best - 0.01) and cell["std"] == pytest.approx(0.01)
    assert bench.table(bench.load(store), ["lora"], ["nli"], hparams={"lora": {"r": 2}})[("lora", "nli")]["seeds"] == 2
    text = bench.format_table(tab)
    assert f"| lora | {best - 0.01:.3f} ± 0.010 | 10 | 5 | 1.0 |" in text
    assert comparison(tab).axes[0].get_ylabel().startswith("test score")
    from pefttutor.plot import METHOD_COLORS, method_colors
    assert method_colors(["lora", "mine"])["lora"] == METHOD_COLORS["lora"]      # the same in every figure
    assert method_colors(["mine"])["mine"] not in METHOD_COLORS.values()


def test_best_lr_uses_validation_not_test():
    rows = [{"model": "zoo-decoder", "method": "lora", "task": "nli", "seed": 0, "lr": lr,
             "hparams": bench.METHODS["lora"].defaults, "sizes": None, "steps": 150, "batch_size": 32,
             "validation": v, "test": t} for lr, v, t in [(1e-3, 0.5, 0.9), (1e-2, 0.6, 0.1)]]
    assert bench.best_lr(rows, "lora", "nli") == 1e-2


def test_command_line_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", _fake_run([]))
    store = str(tmp_path / "s.jsonl")
    bench.main(["run", "--methods", "lora", "--tasks", "nli", "--seeds", "2", "--store", store])
    out = capsys.readouterr().out
    assert "| method | nli |" in out and "| lora |" in out
    bench.main(["plot", "--methods", "lora", "--tasks", "nli", "--store", store,
                "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "b.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        bench.main(["run", "--methods", "lorra"])
    bench.main(["run", "--methods", "lora", "head", "--tasks", "nli", "--seeds", "1", "--store", store,
                "--hparams", '{"r": 2}'])                          # r goes to lora only
    assert {json.dumps(r["hparams"], sort_keys=True) for r in bench.load(store) if r["method"] == "head"} == {"{}"}
    for bad in ('{"rank": 2}', "4", "{r: 2}"):
        with pytest.raises(SystemExit):
            bench.main(["run", "--methods", "lora", "--store", store, "--hparams", bad])
    with pytest.raises(SystemExit):
        bench.main(["run", "--methods", "lora", "--store", store, "--seeds", "0"])


def test_the_store_holds_the_shared_table():
    records = bench.load()
    methods = ["head", "full", "lora", "krona", "fedpara", "qlora", "houlsby", "pfeiffer", "parallel", "fusion",
               "adapterdrop", "prompt", "ptuning", "prefix", "ptuning-v2", "mpt", "adalora", "ia3"]
    tab = bench.table(records, methods, data.SUITE)
    assert len(tab) == len(methods) * len(data.SUITE) and all(c["seeds"] == 3 for c in tab.values())
    keys = [(r["model"], r["method"], r["task"], r["seed"], r["lr"], json.dumps(r["hparams"], sort_keys=True),
             r.get("train_split", "train")) for r in records]
    assert len(keys) == len(set(keys))                                   # one record per run
    for name in methods:                                                 # every rate of every sweep
        for task in data.SUITE:
            swept = {r["lr"] for r in bench._config(records, "zoo-decoder", name, task) if r["seed"] == 0}
            assert swept == set(bench.METHODS[name].lrs), (name, task)
    full, qlora = tab[("full", "sentiment")], tab[("qlora", "sentiment")]
    assert qlora["total"] == full["total"] - 256 + qlora["trainable"]   # the 4-bit weights count too


def test_a_stored_record_reproduces():
    """Re-run LoRA on the sentiment task, seed 1, at the rate the sweep chose. On the machine that
    wrote the store the result is bit-identical; another CPU rounds sums in another order, so the
    test allows the last digits of the loss and two test examples in 500 to differ."""
    records = bench.load()
    lr = bench.best_lr(records, "lora", "sentiment")
    stored = next(r for r in records if (r["method"], r["task"], r["seed"], r["lr"]) == ("lora", "sentiment", 1, lr)
                  and r["model"] == "zoo-decoder" and r["hparams"] == bench.METHODS["lora"].defaults)
    again = bench.run("lora", "sentiment", seed=1, lr=lr, progress=False)
    for k in ("hparams", "steps", "batch_size", "trainable", "total", "memory_mb", "loss_every"):
        assert again[k] == stored[k], k
    assert again["loss"][0] == pytest.approx(stored["loss"][0], abs=1e-4)
    assert again["loss"][-1] == pytest.approx(stored["loss"][-1], abs=0.05)
    assert again["test"] == pytest.approx(stored["test"], abs=2 / 500)
    assert again["validation"] == pytest.approx(stored["validation"], abs=2 / 300)


def test_encoders_get_their_own_budget():
    """An encoder's [CLS] classifier needs more steps than the decoder's last token (ENCODER_BUDGETS)."""
    assert bench.budget_for("zoo-encoder", "classification") is bench.ENCODER_BUDGETS["classification"]
    assert bench.budget_for("zoo-encoder", "classification").steps > bench.BUDGETS["classification"].steps
    assert bench.budget_for("zoo-decoder", "classification") is bench.BUDGETS["classification"]
    assert bench.budget_for("zoo-encoder", "generation") is bench.BUDGETS["generation"]


def test_the_store_holds_the_encoder_table_the_readme_shows():
    """The zoo encoder on sentiment and reviews: every rate swept, three seeds, full fine-tuning clearly
    above the frozen head on both, and the README's table is the store's."""
    records = bench.load()
    tasks = ["sentiment", "reviews"]
    methods = ["head", "bitfit", "lora", "full"]
    tab = bench.table(records, methods, tasks, "zoo-encoder")
    paper = bench.table(records, ["bitfit"], tasks, "zoo-encoder", hparams={"bitfit": {"targets": "paper"}})
    assert len(tab) == 8 and len(paper) == 2 and all(c["seeds"] == 3 for c in [*tab.values(), *paper.values()])
    for name in methods:
        for task in tasks:
            swept = {r["lr"] for r in bench._config(records, "zoo-encoder", name, task) if r["seed"] == 0}
            assert swept == set(bench.METHODS[name].lrs), (name, task)
            steps = bench.ENCODER_BUDGETS["classification"].steps
            assert all(r["steps"] == steps for r in bench._config(records, "zoo-encoder", name, task))
    for task in tasks:
        assert bench.separated(tab, "full", "head", task) and tab[("full", task)]["mean"] > tab[("head", task)]["mean"]
    # the bench issue's acceptance: LoRA on the encoder reaches 90% of full fine-tuning on sentiment
    assert tab[("lora", "sentiment")]["mean"] >= 0.9 * tab[("full", "sentiment")]["mean"]
    rows = {**tab, **{("bitfit (query and intermediate biases)", t): c for (_, t), c in paper.items()}}
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for line in bench.format_table(rows).splitlines()[2:]:
        assert line in readme, line
