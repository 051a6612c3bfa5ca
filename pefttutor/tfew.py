"""T-Few: the recipe around (IA)3 for few-shot classification with a language model.

Defined in the chapter "(IA)3 and T-Few" (book/ia3.ipynb). Liu et al., 2022, arXiv 2205.05638.

A classification example is scored by *rank classification*: every answer choice (each label's
name after ``" =>"``, then EOS) is appended to the input, and the choice the language model finds
most likely wins. T-Few trains on three losses over those choices:

* ``lm``: cross-entropy on the correct choice's tokens, one mean over all of them in the batch;
* ``ul`` (unlikelihood): ``-log(1 - p + 0.01)`` on every token of every *wrong* choice, summed and
  divided by the number of those tokens in the batch; it pushes wrong answers down;
* ``ln`` (length-normalised): each choice's score is its mean token log-probability, and a
  softmax cross-entropy over the choices' scores picks the correct one.

The total is ``lm + unlikelihood * ul + length_norm * ln`` (T-Few: both weights 1), and prediction
ranks the choices by the same length-normalised score. This follows the authors' code
(``src/models/EncoderDecoder.py`` in r-three/t-few) with one difference: their unlikelihood term
also adds ``-log(1.01)`` for every masked position (padding and the correct choice), a constant
without a gradient; here the masked positions add nothing. :func:`in_context` builds the
in-context-learning baseline the paper compares against, and :func:`forward_flops` measures what
a forward pass costs.
"""
from __future__ import annotations

import contextlib
import pathlib
import time

import torch
import torch.nn.functional as F

from . import checks
from .data import PROMPT, pad_rows


def _texts(split) -> list[str]:
    if "label" not in split.column_names:
        raise ValueError("T-Few ranks answer choices, so it needs a classification split (with a label "
                         "column); a generation task has no choices to rank")
    if "premise" in split.column_names:
        return [f"{p} {h}" for p, h in zip(split["premise"], split["hypothesis"])]
    return list(split["text"])


def _choice_ids(tok, labels: list[str]) -> list[list[int]]:
    if not labels or len(labels) < 2:
        raise ValueError(f"rank classification needs at least two answer choices, got labels={labels!r}")
    return [tok(" " + w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in labels]


TEMPLATE = PROMPT.replace("{mr}", "{text}")          # "{text} =>", the book's text-to-text form


def _template(template: str, who: str) -> str:
    if not isinstance(template, str) or template.count("{text}") != 1 or not template.startswith("{text}"):
        raise ValueError(f"{who}: template={template!r} must start with '{{text}}' once, then any fixed words "
                         f"(e.g. '{{text}} =>' or '{{text}}' alone, which asks for a plain continuation)")
    return template


def encode_choices(split, tok, labels: list[str], max_length: int = 128, template: str = TEMPLATE) -> list[dict]:
    """Every example with all its answer choices: ``{"choices": [{"input_ids", "labels"}, ...],
    "label": y}``. Choice c is the template filled with the text (``"<text> =>"`` by default, the
    form of :func:`pefttutor.data.encode_text_to_text`), then label c's name and EOS, the labels
    -100 on the input so only the choice's tokens count. A text too long for ``max_length`` is
    shortened, keeping the template's words after it."""
    checks.integer("max_length", max_length, low=8, who="encode_choices ")
    template = _template(template, "encode_choices")
    words = _choice_ids(tok, labels)
    arrow = tok(template.format(text=""), add_special_tokens=False)["input_ids"]
    longest = max(map(len, words))
    out = []
    for text, y in zip(_texts(split), split["label"]):
        prompt = tok(template.format(text=text))["input_ids"]
        if len(prompt) + longest > max_length:
            prompt = prompt[:max_length - longest - len(arrow)] + arrow
        out.append({"choices": [{"input_ids": prompt + w, "labels": [-100] * len(prompt) + w} for w in words],
                    "label": int(y)})
    return out


def collate_choices(examples: list[dict], pad_id: int) -> dict:
    """A batch of B examples with C choices each as B * C right-padded rows (example-major), and
    ``gold``, the index of each example's correct choice."""
    sizes = {len(e["choices"]) for e in examples}
    if len(sizes) != 1:
        raise ValueError(f"collate_choices: every example needs the same number of choices, got {sorted(sizes)}")
    rows = [c for e in examples for c in e["choices"]]
    return {"input_ids": pad_rows([r["input_ids"] for r in rows], pad_id),
            "attention_mask": pad_rows([[1] * len(r["input_ids"]) for r in rows], 0),
            "labels": pad_rows([r["labels"] for r in rows], -100),
            "gold": torch.tensor([e["label"] for e in examples])}


def token_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, mask of the label tokens), both (rows, length - 1):
    position t predicts token t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    keep = target != -100
    return logp * keep, keep


def losses(model, batch: dict, unlikelihood: float = 1.0, length_norm: float = 1.0) -> dict:
    """T-Few's three losses on a batch from :func:`collate_choices`, and their weighted total."""
    logp, keep = token_log_probs(model, batch)
    gold = batch["gold"]
    B = gold.numel()
    C = logp.shape[0] // B
    logp, keep = logp.view(B, C, -1), keep.view(B, C, -1)
    correct = torch.zeros(B, C, dtype=torch.bool, device=logp.device)
    correct[torch.arange(B, device=logp.device), gold] = True
    lm = -logp[correct].sum() / keep[correct].sum()
    wrong = keep & ~correct[..., None]
    ul = -(torch.log(1 - logp.exp() + 1e-2) * wrong).sum() / wrong.sum().clamp(min=1)
    scores = logp.sum(-1) / keep.sum(-1)                 # mean log-probability of each choice
    ln = F.cross_entropy(scores, gold)
    return {"lm": lm, "ul": ul, "ln": ln, "total": lm + unlikelihood * ul + length_norm * ln}


def loss_fn(unlikelihood: float = 1.0, length_norm: float = 1.0):
    """``loss_fn(model, batch)`` for :func:`pefttutor.train.train`: T-Few's total loss.
    ``unlikelihood=0, length_norm=0`` leaves the language-model loss alone."""
    unlikelihood = checks.real("unlikelihood", unlikelihood, low=0, who="tfew.loss_fn ")
    length_norm = checks.real("length_norm", length_norm, low=0, who="tfew.loss_fn ")

    def total(model, batch):
        return losses(model, batch, unlikelihood, length_norm)["total"]
    return total


@torch.no_grad()
def predict(model, examples: list[dict], pad_id: int, normalize: bool = True, batch_size: int = 64) -> list[int]:
    """The most likely choice of each example from :func:`encode_choices` (by mean token
    log-probability with ``normalize``, T-Few's rule; by the sum without)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_choices(examples[i:i + batch_size], pad_id).items()}
        logp, keep = token_log_probs(model, batch)
        B = batch["gold"].numel()
        s = logp.sum(-1) / keep.sum(-1) if normalize else logp.sum(-1)
        out += s.view(B, -1).argmax(-1).tolist()
    return out


def accuracy(model, examples: list[dict], pad_id: int, normalize: bool = True) -> float:
    """Rank-classification accuracy on examples from :func:`encode_choices`."""
    if not examples:
        raise ValueError("tfew.accuracy got no examples")
    pred = predict(model, examples, pad_id, normalize)
    return sum(p == e["label"] for p, e in zip(pred, examples)) / len(examples)


def in_context(split, demos, tok, labels: list[str], max_length: int = 128,
               template: str = TEMPLATE) -> tuple[list[dict], list[int]]:
    """In-context learning: each example of ``split`` with demonstrations from ``demos`` before it,
    each the filled template (``"<text> =>"``), its label's name and EOS, as many as fit in
    ``max_length`` positions with the longest choice (taken in order; a demonstration that does
    not fit is skipped). Returns the examples in the form of :func:`encode_choices` and how many
    demonstrations each one holds."""
    checks.integer("max_length", max_length, low=8, who="in_context ")
    template = _template(template, "in_context")
    words = _choice_ids(tok, labels)
    longest = max(map(len, words))
    shown = [tok(" " + template.format(text=t), add_special_tokens=False)["input_ids"] + words[y]
             for t, y in zip(_texts(demos), demos["label"])] if len(demos) else []
    out, used = [], []
    for text, y in zip(_texts(split), split["label"]):
        query = tok(" " + template.format(text=text), add_special_tokens=False)["input_ids"]
        room = max_length - 1 - len(query) - longest
        if room < 0:
            raise ValueError(f"in_context: an example of {len(query)} tokens leaves no room for its answer "
                             f"within max_length={max_length}; raise max_length or shorten the texts")
        context, n = [], 0
        for d in shown:
            if len(context) + len(d) <= room:
                context, n = context + d, n + 1
        prompt = [tok.bos_token_id] + context + query
        out.append({"choices": [{"input_ids": prompt + w, "labels": [-100] * len(prompt) + w} for w in words],
                    "label": int(y)})
        used.append(n)
    return out, used


@contextlib.contextmanager
def _eager_attention(model):
    """Attention as plain matrix products while counting: ``FlopCounterMode`` sees ``bmm`` but
    not every fused attention kernel (the CPU's SDPA kernel goes uncounted). Same result."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def forward_flops(model, examples: list[dict]) -> float:
    """Floating-point operations of the forward passes that score ``examples`` (every choice of
    each), counted by ``torch.utils.flop_counter.FlopCounterMode`` one sequence at a time, so no
    padding is counted: the mean per example. Matrix products only (linear layers, attention
    scores and their weighted sums), a multiply-add counting 2; normalisation, activations and
    softmax are left out, as in the usual 2 x parameters x tokens estimate."""
    from torch.utils.flop_counter import FlopCounterMode
    if not examples:
        raise ValueError("forward_flops got no examples")
    model.eval()
    device = next(model.parameters()).device
    total = 0
    with torch.no_grad(), _eager_attention(model):
        for e in examples:
            for c in e["choices"]:
                ids = torch.tensor([c["input_ids"]], device=device)
                with FlopCounterMode(display=False) as counter:
                    model(input_ids=ids)
                total += counter.get_total_flops()
    return total / len(examples)


def train_step_flops(model, examples: list[dict], pad_id: int, batch_size: int,
                     unlikelihood: float = 1.0, length_norm: float = 1.0) -> float:
    """Floating-point operations of one T-Few training step (forward and backward, the padded
    batch as it runs) on the first ``batch_size`` examples, counted by ``FlopCounterMode``; the
    gradients are thrown away."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_choices(examples[:batch_size], pad_id).items()}
    with _eager_attention(model), FlopCounterMode(display=False) as counter:
        losses(model, batch, unlikelihood, length_norm)["total"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# In-context learning on the bench's tasks, and its store

ICL_STORE = pathlib.Path(__file__).parent / "results" / "icl.jsonl"


def icl_run(task: str, seed: int = 0, model: str = "zoo-decoder", k: int = 16, max_length: int = 128,
            template: str = TEMPLATE, flops_examples: int = 20, sizes: dict | None = None) -> dict:
    """In-context learning with the frozen ``model`` on ``task``'s test split: demonstrations drawn
    from the training split (``k`` per label, shuffled by ``seed``; as many as fit are shown, ``k=0``
    is zero-shot), rank classification by the length-normalised score (T-Few's rule) and by the
    sum. Returns one record: accuracies, demonstrations shown, forward FLOPs per example (the
    mean over the first ``flops_examples``). ``sizes`` caps the task's splits (a quick check)."""
    from . import bench, zoo
    from .data import few_shot, load_task, task_info
    info = task_info(task)
    if info.kind == "generation":
        raise ValueError(f"icl_run: {task!r} is a generation task; in-context rank classification needs a "
                         f"classification task (sentiment, nli, jobs, knowledge)")
    checks.integer("k", k, low=0, who="icl_run ")
    dd = load_task(task, sizes=sizes)
    net, tok = zoo.load_decoder(model)
    demos = few_shot(dd["train"], k, seed) if k else dd["train"].select([])
    examples, used = in_context(dd["test"], demos, tok, info.labels, max_length, template)
    start = time.perf_counter()
    acc = {norm: accuracy(net, examples, tok.pad_token_id, norm) for norm in (True, False)}
    return {"model": model, "task": task, "seed": seed, "k": k, "max_length": max_length, "template": template, "sizes": sizes,
            "accuracy": acc[True], "accuracy_sum": acc[False], "demos": sum(used) / len(used),
            "tokens": sum(len(e["choices"][0]["input_ids"]) for e in examples) / len(examples),
            "flops": forward_flops(net, examples[:flops_examples]), "seconds": time.perf_counter() - start,
            "command": f"pefttutor.tfew.icl_run({task!r}, seed={seed}, model={model!r}, k={k}, "
                       f"max_length={max_length}, template={template!r})",
            "version": bench._version(), "torch": torch.__version__, "machine": bench._machine()}


def icl_load(path=None) -> list[dict]:
    """The in-context records (the store shipped with the package by default)."""
    from .bench import load
    return load(path or ICL_STORE)


def main(argv=None):
    import argparse
    from .bench import append
    from .data import SUITE, task_info
    parser = argparse.ArgumentParser(description="In-context learning on the suite's classification tasks, "
                                                 "into a results store (resumes: records there are kept).")
    parser.add_argument("--tasks", nargs="+", default=[t for t in SUITE if task_info(t).kind != "generation"])
    parser.add_argument("--k", nargs="+", type=int, default=[0, 16], help="demonstrations per label to draw")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="zoo-decoder")
    parser.add_argument("--template", default=TEMPLATE, help="the input's form, with {text} first")
    parser.add_argument("--store", default=str(ICL_STORE))
    args = parser.parse_args(argv)
    done = {(r["model"], r["task"], r["k"], r["seed"], r["template"]) for r in icl_load(args.store)}
    for task in args.tasks:
        for k in args.k:
            for seed in (range(args.seeds) if k else [0]):       # zero-shot has nothing to draw
                if (args.model, task, k, seed, args.template) in done:
                    continue
                record = icl_run(task, seed, args.model, k, template=args.template)
                append(record, args.store)
                print(f"{task:10s} {args.template!r} k {k:2d} seed {seed} demos {record['demos']:.1f} "
                      f"accuracy {record['accuracy']:.3f} (sum {record['accuracy_sum']:.3f}) "
                      f"{record['flops']:.3g} FLOPs/example", flush=True)


if __name__ == "__main__":
    main()
