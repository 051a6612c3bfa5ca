"""One training loop and the evaluations every chapter uses.

Defined in the chapter "Full fine-tuning" (book/full_finetuning.ipynb).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
from tqdm.auto import tqdm

from . import checks
from .data import PROMPT, collate, slot_score


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, precision: str = "auto"):
    """None (fp32), torch.bfloat16 or torch.float16. "auto" takes bf16 where the GPU has it
    (Ampere and newer), fp16 on older GPUs such as Colab's T4, and fp32 on the CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _batches(data, batch_size, gen, pad_id, collate_fn=collate):
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate_fn([data[j] for j in order[i:i + batch_size]], pad_id)


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train(model, data, *, pad_id: int, steps: int = 200, batch_size: int = 32, lr: float = 1e-3,
          weight_decay: float = 0.0, warmup: float = 0.1, clip: float = 1.0, evaluate=None,
          eval_every: int | None = None, seed: int = 0, device=None, precision: str = "auto",
          progress: bool | None = None, desc: str = "train", loss_fn=None, collate_fn=None) -> dict:
    """Train the model's trainable parameters on encoded examples (see :mod:`pefttutor.data`).

    AdamW, linear warm-up over ``warmup`` of the steps then linear decay to zero, gradient
    clipping, mixed precision on CUDA. ``evaluate(model) -> dict`` runs every ``eval_every``
    steps and at the end. ``loss_fn(model, batch) -> loss`` replaces the model's own loss (a
    distillation loss, say); ``collate_fn(examples, pad_id) -> batch`` replaces
    :func:`pefttutor.data.collate` (T-Few's examples carry every answer choice). A model with AdaLoRA's ``RankAllocator`` gets its orthogonality loss
    added and the allocator called after every step. Returns the history: losses per step,
    evaluations, seconds.
    """
    steps = checks.integer("steps", steps, low=1, who="train ")
    batch_size = checks.integer("batch_size", batch_size, low=1, who="train ")
    lr = checks.positive("lr", lr, who="train ")
    weight_decay = checks.real("weight_decay", weight_decay, low=0, who="train ")
    warmup = checks.real("warmup", warmup, low=0, high=1, who="train ", desc="in [0, 1] (a fraction of the steps)")
    clip = checks.positive("clip", clip, who="train ")
    if eval_every is not None:
        checks.integer("eval_every", eval_every, low=1, who="train ")
    checks.integer("seed", seed, who="train ")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"train precision={precision!r}: choose 'auto', 'fp32', 'bf16' or 'fp16'")
    if not len(data):
        raise ValueError("train got no examples: data is empty")
    torch.manual_seed(seed)
    device = torch.device(device) if device else default_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: inject an adapter or unfreeze a module")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))
    amp = autocast_dtype(device, precision)
    scaler = torch.amp.GradScaler(enabled=amp is torch.float16)
    batches = _batches(data, min(batch_size, len(data)), torch.Generator().manual_seed(seed), pad_id,
                       collate_fn or collate)
    if progress is None:
        progress = not os.environ.get("PEFTTUTOR_QUIET")
    regularized = any(hasattr(m, "regularization") for m in model.modules())
    allocator = getattr(model, "pefttutor_allocator", None)        # AdaLoRA's rank allocator
    if allocator is not None and allocator.total_step != steps:
        raise ValueError(f"train: the model's AdaLoRA RankAllocator plans total_step={allocator.total_step} "
                         f"but train runs steps={steps}: the budget schedule would end early or never "
                         f"reach its target. Make the allocator with total_step={steps}.")
    history = {"step": [], "loss": [], "eval": []}
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            batch = _to(next(batches), device)
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            loss = loss + regularization(model) if regularized else loss
            loss = loss + allocator.regularization() if allocator is not None else loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt), scaler.update(), sched.step()
        if allocator is not None:          # after the step, before zero_grad (as peft)
            allocator.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        history["step"].append(step), history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if evaluate and ((eval_every and step % eval_every == 0) or step == steps):
            model.eval()
            history["eval"].append({"step": step, **evaluate(model)})
            model.train()
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history


def regularization(model) -> torch.Tensor | float:
    """The sum of the ``regularization()`` terms of modules that define one and train (AdapterFusion's
    pull of its value matrix towards the identity); 0 when there are none."""
    return sum((m.regularization() for m in model.modules()
                if hasattr(m, "regularization") and any(p.requires_grad for p in m.parameters())), 0.0)


@torch.no_grad()
def accuracy(model, data, pad_id: int, batch_size: int = 256) -> float:
    """Fraction of examples whose argmax logit equals the label (sequence classification)."""
    checks.integer("batch_size", batch_size, low=1, who="accuracy ")
    if not len(data):
        raise ValueError("accuracy got no examples: data is empty")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        batch = _to(collate(data[i:i + batch_size], pad_id), device)
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(data)


@torch.no_grad()
def choice_scores(model, examples: list[list[dict]], pad_id: int, normalize: bool = False,
                  batch_size: int = 256) -> list[list[float]]:
    """Log-likelihood of each answer choice: ``examples[i][c]`` is example i encoded with choice c
    (language-model form, the choice's tokens labelled, the rest -100). The score is the sum of the
    choice's token log-probabilities, or their mean with ``normalize`` (T-Few's length
    normalisation)."""
    model.eval()
    device = next(model.parameters()).device
    flat = [c for e in examples for c in e]
    scores = []
    for i in range(0, len(flat), batch_size):
        batch = _to(collate(flat[i:i + batch_size], pad_id), device)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:].float()   # a prompt's positions come first
        target = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        keep = target != -100
        total = (logp * keep).sum(1)
        scores += (total / keep.sum(1) if normalize else total).tolist()
    out, k = [], 0
    for e in examples:
        out.append(scores[k:k + len(e)])
        k += len(e)
    return out


def rank_accuracy(model, tok, split, labels: list[str], normalize: bool = False) -> float:
    """Rank classification: the share of examples whose true label is the most likely answer
    choice (each label's name after ``" =>"``, as :func:`pefttutor.data.encode_text_to_text`)."""
    from datasets import Dataset
    from .data import encode_text_to_text
    gold = list(split["label"])
    columns = {k: list(split[k]) for k in split.column_names if k != "label"}
    per_label = [encode_text_to_text(Dataset.from_dict({**columns, "label": [c] * len(gold)}), tok, labels)
                 for c in range(len(labels))]
    examples = [[per_label[c][i] for c in range(len(labels))] for i in range(len(gold))]
    scores = choice_scores(model, examples, tok.pad_token_id, normalize)
    return sum(max(range(len(s)), key=s.__getitem__) == y for s, y in zip(scores, gold)) / len(gold)


@torch.no_grad()
def eval_loss(model, data, pad_id: int, batch_size: int = 128) -> float:
    """Mean cross-entropy per target token over ``data`` (causal LM with -100 masked labels)."""
    checks.integer("batch_size", batch_size, low=1, who="eval_loss ")
    if not len(data):
        raise ValueError("eval_loss got no examples: data is empty")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = _to(collate(data[i:i + batch_size], pad_id), device)
        n = (batch["labels"][:, 1:] != -100).sum().item()
        total += model(**batch).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 100) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), new text only."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"generate: prompts must be a list of strings, got {type(prompts).__name__}")
    checks.integer("max_new_tokens", max_new_tokens, low=1, who="generate ")
    checks.integer("batch_size", batch_size, low=1, who="generate ")
    model.eval()
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return [t.strip() for t in texts]


def generation_scores(model, tok, split, n: int | None = None, max_new_tokens: int = 48) -> dict:
    """Data-to-text scores on a ``restaurants``-style split: slot accuracy (the fraction of the
    meaning representation's values the text states correctly) and exact match."""
    mrs, refs = list(split["mr"])[:n], list(split["text"])[:n]
    outs = generate(model, tok, [PROMPT.format(mr=m) for m in mrs], max_new_tokens)
    slots = [slot_score(m, o) for m, o in zip(mrs, outs)]
    return {"slot_acc": sum(c for c, _ in slots) / sum(t for _, t in slots),
            "exact": sum(o == r for o, r in zip(outs, refs)) / len(refs)}
