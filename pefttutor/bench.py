"""The bench: every method by name, one harness, one results store, one command line.

Defined in the chapter "Full fine-tuning" (book/full_finetuning.ipynb).

* :data:`METHODS` is the registry: a name (``"lora"``) maps to how the method is applied to a
  model, its default hyperparameters and the learning rates its sweep tries. A chapter that adds a
  method adds one entry with :func:`register`.
* :func:`run` fine-tunes one method with its hyperparameters on one task and seed and returns one
  result record: validation and test scores, trainable parameters, training time per step,
  training memory, the loss history, and the command and package version that made it.
* :func:`sweep` runs a method's learning rates on seed 0, picks the best on *validation*, then
  runs the other seeds at that rate. Records go to a JSON-lines store (:func:`load`,
  :func:`append`); runs already in the store are skipped, so an interrupted sweep resumes.
* :func:`table` turns the records into mean and spread over seeds per method and task;
  :func:`format_table` prints it and :func:`pefttutor.plot.comparison` draws it.

Command line: ``python -m pefttutor.bench run`` fills the store (with a progress bar),
``python -m pefttutor.bench table`` prints the table, ``--help`` says more.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import pathlib
import platform
import re
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import checks, data, tfew, zoo
from .adapters import HoulsbyAdapter, ParallelAdapter, PfeifferAdapter, fuse, layer_index, layer_norm_names
from .adalora import AdaLoRALinear, RankAllocator
from .bitfit import BitFit
from .fedpara import FedParaLinear
from .ia3 import inject_ia3
from .inject import inject, save_adapter, trainable_parameters
from .krona import KronALinear
from .lora import LoRALinear
from .memory import measure, storage_bytes
from .prompts import (ENCODER_TYPES, Distillation, MultitaskPromptTuning, PrefixTuning, PromptTuning, PTuning,
                      from_source)
from .train import accuracy, generation_scores, train

STORE = pathlib.Path(__file__).parent / "results" / "bench.jsonl"
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# The registry

@dataclass
class Method:
    """How a method is applied to a freshly loaded model, its defaults and its learning rates."""
    name: str
    apply: object          # apply(model, task_kind, **hparams) -> None, changes the model in place
    defaults: dict
    lrs: tuple
    about: str = ""
    family: str = "reparameterisation"
    rank_choices: bool = False     # trains the language model on answer choices (T-Few), not a head


METHODS: dict[str, Method] = {}


def register(name: str, lrs, about: str = "", family: str = "reparameterisation", rank_choices: bool = False,
             **defaults):
    """Decorator: add ``apply(model, kind, **hparams)`` to :data:`METHODS` under ``name``. A method
    with ``rank_choices`` keeps the language-model head and classifies by ranking the labels'
    names (:mod:`pefttutor.tfew`), so its ``apply`` must not add a head."""
    def add(apply):
        METHODS[name] = Method(name, apply, defaults, tuple(lrs), about, family, rank_choices)
        return apply
    return add


# The query and value projections (LoRA's placement) in each architecture the book uses.
QUERY_VALUE = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
               "qwen2": ["q_proj", "v_proj"], "bert": ["query", "value"],
               "roberta": ["query", "value"], "gpt2": ["c_attn"]}


def resolve_targets(model, targets):
    """``"query-value"`` becomes the architecture's names for W_q and W_v; others pass through."""
    if targets != "query-value":
        return targets
    kind = model.config.model_type
    if kind not in QUERY_VALUE:
        raise ValueError(f"targets='query-value' does not know the {kind!r} architecture: pass the "
                         f"module names, e.g. targets=['q_proj', 'v_proj'] (see pefttutor.linear_names)")
    return QUERY_VALUE[kind]


def task_heads(model, kind: str) -> list[str]:
    """What trains in full beside any adapter: a classifier's head (and BERT's pooler); for a
    generation task nothing (the language-model head is the frozen, tied embedding)."""
    return [] if kind == "generation" else zoo.head_names(model)


@register("head", lrs=(1e-3, 3e-3, 1e-2, 3e-2), family="baseline",
          about="the pretrained body frozen; only the task head trains (nothing for generation)")
def _head(model, kind):
    model.requires_grad_(False)
    heads = task_heads(model, kind)
    for name, p in model.named_parameters():
        p.requires_grad = any(h in name.split(".") for h in heads)


@register("full", lrs=(1e-4, 3e-4, 1e-3, 3e-3), family="baseline", about="every weight trains")
def _full(model, kind):
    model.requires_grad_(True)


def adapter(layer_cls):
    """``apply`` for any layer class that ``inject`` takes: targets (``"query-value"`` by default)
    wrapped with ``layer_cls(module, **hparams)``, the task head trained in full."""
    def apply(model, kind, targets="query-value", **hparams):
        inject(model, layer_cls, resolve_targets(model, targets),
               modules_to_save=task_heads(model, kind), **hparams)
    return apply


register("lora", lrs=(1e-3, 3e-3, 1e-2, 3e-2), r=8, alpha=16, targets="query-value",
         about="LoRA on W_q, W_v (the paper's placement), alpha / r = 2")(adapter(LoRALinear))
register("krona", lrs=(3e-3, 1e-2, 3e-2, 1e-1), a_shape=None, scale=4.0, targets="query-value",
         about="KronA on W_q, W_v, factors near the square root of each dimension"
         )(adapter(KronALinear))
register("fedpara", lrs=(1e-3, 3e-3, 1e-2, 3e-2), r=4, alpha=8, targets="query-value",
         about="FedPara (Hadamard of two rank-4 products) on W_q, W_v")(adapter(FedParaLinear))


@register("adalora", lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), r=12, target_r=8, alpha=24, tinit=0.1, tfinal=0.2,
          deltaT=5, targets="query-value",
          about="AdaLoRA on W_q, W_v: rank 12 per matrix at the start, 8 (LoRA's) on average at the end")
def _adalora(model, kind, steps, targets="query-value", r=12, target_r=8, alpha=24, tinit=0.1, tfinal=0.2,
             deltaT=5):
    """tinit and tfinal are fractions of the training steps."""
    adapter(AdaLoRALinear)(model, kind, targets=targets, r=r, alpha=alpha)
    RankAllocator(model, target_r=target_r, total_step=steps, tinit=int(tinit * steps),
                  tfinal=int(tfinal * steps), deltaT=deltaT)


@register("ia3", lrs=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1), targets="auto", feedforward="auto",
          about="(IA)3: keys, values and the feed-forward down projection's input rescaled")
def _ia3(model, kind, targets="auto", feedforward="auto"):
    inject_ia3(model, targets, feedforward, modules_to_save=task_heads(model, kind))


@register("tfew", lrs=(1e-2, 3e-2, 1e-1, 3e-1), targets="auto", feedforward="auto", unlikelihood=1.0,
          length_norm=1.0, template=tfew.TEMPLATE, rank_choices=True,
          about="T-Few: (IA)3 with the language-model head, rank classification, LM + UL + LN losses")
def _tfew(model, kind, targets="auto", feedforward="auto", unlikelihood=1.0, length_norm=1.0,
          template=tfew.TEMPLATE):
    """The losses' weights and the template are read by :func:`fit`; here (IA)3 goes in, no head."""
    inject_ia3(model, targets, feedforward)


@register("bitfit", lrs=(1e-3, 3e-3, 1e-2, 3e-2), targets="all",
          about="BitFit: every bias term (and the head); models without biases (Llama) cannot use it")
def _bitfit(model, kind, targets="all"):
    inject(model, BitFit, targets, modules_to_save=task_heads(model, kind))


def bottleneck(layer_cls, layer_norms: bool = False):
    """``apply`` for a bottleneck adapter at its paper's places (``targets="auto"``), the task head
    trained in full, and with ``layer_norms`` every LayerNorm too (Houlsby et al. train them)."""
    def apply(model, kind, targets="auto", **hparams):
        keep = task_heads(model, kind) + (layer_norm_names(model) if layer_norms else [])
        inject(model, layer_cls, targets, modules_to_save=keep, **hparams)
    return apply


register("houlsby", lrs=(1e-3, 3e-3, 1e-2, 3e-2), bottleneck=8, targets="auto", family="adapter",
         about="Houlsby adapters (m = 8) after attention and FFN; LayerNorms train"
         )(bottleneck(HoulsbyAdapter, layer_norms=True))
register("pfeiffer", lrs=(1e-3, 3e-3, 1e-2, 3e-2), bottleneck=8, targets="auto", family="adapter",
         about="Pfeiffer adapter (m = 8) after the FFN of every layer")(bottleneck(PfeifferAdapter))
register("parallel", lrs=(1e-3, 3e-3, 1e-2, 3e-2), bottleneck=8, scaling=4.0, targets="auto", family="adapter",
         about="parallel adapter (m = 8, scaling 4) beside the FFN of every layer")(bottleneck(ParallelAdapter))


@register("adapterdrop", lrs=(1e-3, 3e-3, 1e-2, 3e-2), bottleneck=8, drop=1, family="adapter",
          about="AdapterDrop: Pfeiffer adapters (m = 8) above the lowest `drop` layers")
def _adapterdrop(model, kind, bottleneck=8, drop=1):
    names = PfeifferAdapter.find_targets(model, "auto")
    depth = len(names)
    drop = checks.integer("drop", drop, low=0, high=depth - 1, who="adapterdrop ")
    kept = [n for n in names if (layer_index(n) or 0) >= drop]
    inject(model, PfeifferAdapter, "|".join(re.escape(n) for n in kept),
           modules_to_save=task_heads(model, kind), bottleneck=bottleneck)


FUSION_SOURCES = ("reviews", "sentiment", "nli", "jobs", "knowledge")


def _cache(cache=None) -> pathlib.Path:
    """Where trained source stages are kept: ``cache``, else ``PEFTTUTOR_CACHE``, else ~/.cache/pefttutor."""
    return pathlib.Path(cache or os.environ.get("PEFTTUTOR_CACHE", pathlib.Path.home() / ".cache" / "pefttutor"))


def _file_safe(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(model_name)).strip("_")[-60:]


def _model_name(model) -> str:
    """The bench's name of a loaded model: a zoo name for the zoo's folders, else its Hub name or path."""
    name = getattr(model, "name_or_path", "") or "zoo-decoder"
    return next((k for k, v in zoo.ZOO.items() if str(v) == str(name)), name)


def source_adapter(model_name: str, task: str, bottleneck: int = 8, cache=None) -> pathlib.Path:
    """The Pfeiffer adapter of ``task`` (seed 0, the bench's best rate on validation, or the middle
    rate), trained once and cached as a safetensors file: AdapterFusion's stage 1."""
    path = _cache(cache) / "fusion_sources" / f"{_file_safe(model_name)}-{task}-pfeiffer-m{bottleneck}.safetensors"
    if not path.exists():
        lr = best_lr(load(), "pfeiffer", task, model_name) if model_name in zoo.ZOO else None
        _, net = fit("pfeiffer", task, seed=0, lr=lr, model=model_name, bottleneck=bottleneck, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(net, path)
    return path


@register("fusion", lrs=(1e-3, 3e-3, 1e-2, 3e-2), bottleneck=8, sources=list(FUSION_SOURCES), family="adapter",
          about="AdapterFusion of the sources' and the target's Pfeiffer adapters")
def _fusion(model, kind, bottleneck=8, sources=FUSION_SOURCES, task=None):
    name = _model_name(model)
    rng = torch.random.get_rng_state()           # training the sources must not change this run's seed
    paths = {t: source_adapter(name, t, bottleneck) for t in dict.fromkeys([*sources, *([task] if task else [])])}
    torch.random.set_rng_state(rng)
    fuse(model, paths, modules_to_save=task_heads(model, kind))


def soft_prompt(layer_cls):
    """``apply`` for a soft prompt (at the input embedding, ``targets="auto"``), the task head
    trained in full."""
    def apply(model, kind, **hparams):
        inject(model, layer_cls, "auto", modules_to_save=task_heads(model, kind), **hparams)
    return apply


register("prompt", lrs=(3e-3, 1e-2, 3e-2, 1e-1), num_virtual_tokens=20, init="vocab", init_ids=None,
         family="prompt",
         about="prompt tuning: 20 vectors before the input, started at vocabulary embeddings"
         )(soft_prompt(PromptTuning))
register("ptuning", lrs=(1e-3, 3e-3, 1e-2, 3e-2), num_virtual_tokens=20, encoder="mlp", family="prompt",
         about="P-tuning: 20 input vectors made by an MLP prompt encoder")(soft_prompt(PTuning))
register("prefix", lrs=(1e-3, 3e-3, 1e-2, 3e-2), num_virtual_tokens=20, projection=True, family="prompt",
         about="prefix tuning: 20 keys and values in every layer, through an MLP")(soft_prompt(PrefixTuning))
register("ptuning-v2", lrs=(1e-3, 3e-3, 1e-2, 3e-2), num_virtual_tokens=20, projection=False, family="prompt",
         about="P-tuning v2: 20 keys and values in every layer, trained directly")(soft_prompt(PrefixTuning))


# Multitask prompt tuning: the source stage (teachers, then one prompt distilled from them), cached

MPT_SOURCES = ("reviews", "sentiment", "nli", "jobs", "knowledge", "restaurants")
MPT_SHIPPED = pathlib.Path(__file__).parent / "results" / "mpt_sources"


def text_to_text(task: str, tok, split: str = "train", task_id: int | None = None, sizes=None) -> list[dict]:
    """A task as language modelling (the label's name after ``" =>"``; the generation task as it
    is), each example tagged with ``task_id``: multitask prompt tuning's source data."""
    info, dd = data.task_info(task), data.load_task(task, sizes=sizes)
    if info.kind == "generation":
        out = data.encode_generation(dd[split], tok)
        return [{**e, "task_ids": task_id} for e in out] if task_id is not None else out
    return data.encode_text_to_text(dd[split], tok, info.labels, task_id=task_id)


def teacher_prompt(model_name: str, task: str, num_virtual_tokens: int = 20, steps: int = 300,
                   lr: float = 3e-2, seed: int = 0, progress: bool | None = None):
    """A source task's own prompt, trained alone by prompt tuning on the language-model form of
    the task: the teacher that multitask prompt tuning distils from."""
    torch.manual_seed(seed)
    net, tok = zoo.load_decoder(model_name)
    inject(net, PromptTuning, "auto", num_virtual_tokens=num_virtual_tokens)
    history = train(net, text_to_text(task, tok), pad_id=tok.pad_token_id, steps=steps, batch_size=32,
                    lr=lr, seed=seed, progress=progress, desc=f"teacher {task}")
    return net, history


def mpt_source(model_name: str = "zoo-decoder", sources=MPT_SOURCES, num_virtual_tokens: int = 20,
               rank: int = 1, teacher_steps: int = 300, steps: int = 600, lr: float = 3e-2, lam: float = 1.0,
               seed: int = 0, out=None, progress: bool | None = None) -> pathlib.Path:
    """Multitask prompt tuning's source stage, run once and stored: a teacher prompt per source
    task (:func:`teacher_prompt`), then one :class:`MultitaskPromptTuning` with a task vector pair
    per source, trained on the mixture of the sources with the teachers' distillation
    (:class:`pefttutor.prompts.Distillation`). Returns the path of its ``save_adapter`` file: the
    package's own for the shipped defaults, else ``out`` or the cache (``PEFTTUTOR_CACHE``)."""
    sources = list(sources)
    unknown = [t for t in sources if t not in data.TASKS]
    if len(sources) < 2 or unknown:
        raise ValueError(f"mpt_source needs at least two source tasks from {sorted(data.TASKS)}; "
                         f"got {sources}")
    if is_encoder(model_name):
        raise ValueError(f"mpt_source trains the language-model form of the source tasks, which needs a "
                         f"decoder; {model_name!r} is an encoder (use zoo-decoder or a Hub decoder)")
    settings = dict(sources=sources, num_virtual_tokens=num_virtual_tokens, rank=rank,
                    teacher_steps=teacher_steps, steps=steps, lr=lr, lam=lam, seed=seed)
    import hashlib
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{_file_safe(model_name)}-{key}.safetensors"
    cache = _cache()
    for place in ([pathlib.Path(out)] if out else []) + [MPT_SHIPPED, cache / "mpt_sources"]:
        if (place / name).exists():
            return place / name
    rng = torch.random.get_rng_state()           # the source stage must not change the caller's seed
    start = time.perf_counter()
    teachers = [teacher_prompt(model_name, t, num_virtual_tokens, teacher_steps, lr, seed, progress)[0]
                for t in sources]
    teacher_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    net, tok = zoo.load_decoder(model_name)
    inject(net, MultitaskPromptTuning, "auto", num_virtual_tokens=num_virtual_tokens,
           num_tasks=len(sources), rank=rank)
    mixture = [e for k, t in enumerate(sources) for e in text_to_text(t, tok, task_id=k)]
    history = train(net, mixture, pad_id=tok.pad_token_id, steps=steps, batch_size=32, lr=lr, seed=seed,
                    progress=progress, desc="multitask source", loss_fn=Distillation(teachers, lam))
    torch.random.set_rng_state(rng)
    path = pathlib.Path(out or cache / "mpt_sources") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(net, path)
    path.with_suffix(".json").write_text(json.dumps(
        {**settings, "model": model_name, "loss": [round(v, 5) for v in history["loss"]],
         "seconds": history["seconds"], "teacher_seconds": teacher_seconds, "version": _version(),
         "torch": torch.__version__, "machine": _machine()}, indent=1))
    return path


@register("mpt", lrs=(3e-3, 1e-2, 3e-2, 1e-1), num_virtual_tokens=20, rank=1, sources=list(MPT_SOURCES),
          family="prompt",
          about="multitask prompt tuning: starts from a prompt distilled from six tasks")
def _mpt(model, kind, num_virtual_tokens=20, rank=1, sources=MPT_SOURCES):
    name = _model_name(model)
    path = mpt_source(name, sources, num_virtual_tokens, rank)
    inject(model, MultitaskPromptTuning, "auto", modules_to_save=task_heads(model, kind),
           num_virtual_tokens=num_virtual_tokens, rank=rank)
    from_source(model, path, "average")


@register("qlora", lrs=(1e-3, 3e-3, 1e-2, 3e-2), r=8, alpha=16, targets="all-linear", blocksize=64,
          double_quant=True, about="NF4 base with double quantization, LoRA on every linear layer")
def _qlora(model, kind, targets="all-linear", blocksize=64, double_quant=True, **hparams):
    from .quant import quantize_model
    quantize_model(model, blocksize=blocksize, double_quant=double_quant)
    adapter(LoRALinear)(model, kind, targets=targets, **hparams)


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: the registry has {sorted(METHODS)}; "
                         f"add one with pefttutor.bench.register")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# The harness

@dataclass
class Budget:
    """Training steps, batch size and evaluation sizes for one kind of task."""
    steps: int
    batch_size: int
    eval_n: dict = field(default_factory=dict)    # generation: examples scored per split


BUDGETS = {"classification": Budget(150, 32), "pair": Budget(150, 32),
           "generation": Budget(150, 16, {"validation": 100, "test": 200})}
# An encoder classifies from [CLS] through a new pooler and head. On the zoo encoder the loss of full
# fine-tuning barely moves for a first stretch (about 70 steps on reviews, over 150 on sentiment, the
# decoder's whole budget) while [CLS] learns to gather the sentence; LoRA's loss on sentiment was still
# falling steeply at 600 steps (0.3 and dropping on two seeds of three), so encoders get 1,000 steps.
ENCODER_BUDGETS = {"classification": Budget(1000, 32), "pair": Budget(1000, 32)}


def budget_for(model_name: str, kind: str) -> Budget:
    """The default steps and batch size of ``kind``'s tasks (:data:`BUDGETS`) on ``model_name``;
    encoders have their own (:data:`ENCODER_BUDGETS`)."""
    if kind in ENCODER_BUDGETS and is_encoder(model_name):
        return ENCODER_BUDGETS[kind]
    return BUDGETS[kind]


def is_encoder(model_name: str) -> bool:
    """Whether ``model_name`` (a zoo name, a local folder or a Hub name) is an encoder-only model,
    read from its configuration."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(zoo.resolve(model_name))
    return config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)


def _load_model(model_name: str, info: data.Task):
    if info.kind == "generation":
        return zoo.load_decoder(model_name)
    return zoo.load_classifier(model_name, num_labels=info.num_labels)


def _scores(model, tok, dd, info: data.Task, budget: Budget) -> dict:
    if info.kind == "generation":
        return {s: generation_scores(model, tok, dd[s], n=budget.eval_n.get(s))["slot_acc"]
                for s in ("validation", "test")}
    return {s: accuracy(model, data.encode_classification(dd[s], tok), tok.pad_token_id)
            for s in ("validation", "test")}


def _encode(dd, tok, info, split="train"):
    if info.kind == "generation":
        return data.encode_generation(dd[split], tok)
    return data.encode_classification(dd[split], tok)


def _memory_bytes(model, examples, pad_id, batch_size, collate_fn=data.collate, loss_fn=None) -> int:
    """Training memory of one step (weights, gradients, AdamW state, saved activations), counted
    by walking tensors (:func:`pefttutor.memory.measure`): the same on every device and CPU."""
    clone = copy.deepcopy(model)
    params = [p for p in clone.parameters() if p.requires_grad]
    if not params:                     # nothing trains: the weights are all there is
        return storage_bytes([*clone.parameters(), *clone.buffers()])
    opt = torch.optim.AdamW(params, lr=0.0)
    batch = collate_fn(examples[:batch_size], pad_id)
    if loss_fn is None:
        return measure(clone.train(), batch, opt).total
    return measure(clone.train(), batch, opt, loss_fn=loss_fn).total


def run(method_name: str, task: str, seed: int = 0, lr: float | None = None, **kw) -> dict:
    """Fine-tune ``method_name`` on ``task`` from a fresh copy of the model; return the record.
    The arguments are those of :func:`fit`."""
    return fit(method_name, task, seed, lr, **kw)[0]


def fit(method_name: str, task: str, seed: int = 0, lr: float | None = None, *,
        model: str = "zoo-decoder", steps: int | None = None, batch_size: int | None = None,
        sizes: dict | None = None, train_split: str = "train", progress: bool | None = None, **hparams):
    """Fine-tune ``method_name`` on ``task`` from a fresh copy of ``model``; return the result
    record and the trained model.

    ``lr`` defaults to the middle of the method's sweep; ``hparams`` override the registry's
    defaults; ``steps`` and ``batch_size`` default to the task kind's budget (:func:`budget_for`). The seed sets
    the new weights' initialisation and the order of the batches (the data are the same for
    every seed). ``train_split="few_shot"`` trains on the task's few-shot split (16 examples per
    label) instead of the whole training split."""
    m = method(method_name)
    if train_split not in ("train", "few_shot"):
        raise ValueError(f"bench.run: train_split={train_split!r}: choose 'train' or 'few_shot'")
    info = data.task_info(task)
    checks.integer("seed", seed, low=0, who="bench.run ")
    unknown = sorted(set(hparams) - set(m.defaults))
    if unknown:
        raise TypeError(f"bench.run: method {method_name!r} has no hyperparameter {unknown[0]!r}; "
                        f"its hyperparameters are {sorted(m.defaults) or 'none'}")
    hp = {**m.defaults, **hparams}
    lr = m.lrs[len(m.lrs) // 2] if lr is None else checks.positive("lr", lr, who="bench.run ")
    budget = budget_for(model, info.kind)
    steps = budget.steps if steps is None else checks.integer("steps", steps, low=1, who="bench.run ")
    batch_size = (budget.batch_size if batch_size is None
                  else checks.integer("batch_size", batch_size, low=1, who="bench.run "))
    if info.kind == "generation" and is_encoder(model):
        raise ValueError(f"bench.run: task {task!r} generates text and {model!r} is an encoder; use a "
                         f"decoder (zoo-decoder) or leave {task!r} out (--tasks ...)")
    if m.rank_choices and (info.kind == "generation" or is_encoder(model)):
        raise ValueError(f"bench.run: {method_name!r} ranks answer choices with a language model, so it "
                         f"needs a classification task and a decoder; {task!r} is a {info.kind} task and "
                         f"{model!r} {'is' if is_encoder(model) else 'is not'} an encoder. Use zoo-decoder "
                         f"on sentiment, nli, jobs or knowledge.")
    dd = data.load_task(task, sizes=sizes)

    torch.manual_seed(seed)
    net, tok = zoo.load_decoder(model) if m.rank_choices else _load_model(model, info)
    wanted = inspect.signature(m.apply).parameters     # AdapterFusion fuses the target's adapter too;
    extra = {k: v for k, v in (("task", task), ("steps", steps)) if k in wanted}   # AdaLoRA plans its budget
    m.apply(net, info.kind, **hp, **extra)
    if m.rank_choices:                 # T-Few: every answer choice, its losses, rank classification
        examples = tfew.encode_choices(dd[train_split], tok, info.labels, template=hp["template"])
        how = {"collate_fn": tfew.collate_choices, "loss_fn": tfew.loss_fn(hp["unlikelihood"], hp["length_norm"])}
    else:
        examples, how = _encode(dd, tok, info, train_split), {}
    count = trainable_parameters(net)
    memory = _memory_bytes(net, examples, tok.pad_token_id, batch_size, **how)
    if count.trainable:
        history = train(net, examples, pad_id=tok.pad_token_id, steps=steps, batch_size=batch_size,
                        lr=lr, seed=seed, progress=progress, desc=f"{method_name} {task} seed {seed}", **how)
    else:              # nothing to train (the frozen baseline of a generation task): evaluate as is
        history = {"seconds": 0.0, "loss": []}
    if m.rank_choices:
        scores = {s: tfew.accuracy(net, tfew.encode_choices(dd[s], tok, info.labels, template=hp["template"]),
                                   tok.pad_token_id)
                  for s in ("validation", "test")}
    else:
        scores = _scores(net, tok, dd, info, budget)
    every = max(1, steps // 50)
    record = {"model": model, "method": method_name, "task": task, "seed": seed, "lr": lr,
            "hparams": hp, "steps": steps, "batch_size": batch_size, "sizes": sizes,
            **({"train_split": train_split} if train_split != "train" else {}),
            "metric": "slot accuracy" if info.kind == "generation" else "accuracy",
            "validation": scores["validation"], "test": scores["test"],
            "trainable": count.trainable, "total": count.total,
            "seconds": history["seconds"], "step_ms": 1e3 * history["seconds"] / steps,
            "memory_mb": memory / 2**20,
            "loss": [round(v, 5) for v in history["loss"][::every]], "loss_every": every,
            "command": (f"pefttutor.bench.run({method_name!r}, {task!r}, seed={seed}, lr={lr!r}, "
                        f"model={model!r}, steps={steps}, batch_size={batch_size}"
                        + (f", sizes={sizes!r}" if sizes else "")
                        + (f", train_split={train_split!r}" if train_split != "train" else "")
                        + "".join(f", {k}={v!r}" for k, v in hparams.items()) + ")"),
            "version": _version(), "torch": torch.__version__, "machine": _machine()}
    return record, net


def _version() -> str:
    from . import __version__
    return __version__


def _machine() -> str:
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# The store

def load(path=None) -> list[dict]:
    """Every record in the store (the one shipped with the package by default)."""
    path = pathlib.Path(path or STORE)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg}); a run "
                                 f"interrupted while writing leaves such a line: delete it") from None
    return records


def append(record: dict, path=None) -> None:
    path = pathlib.Path(path or STORE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _config(records, model, name, task, hparams=None, train_split="train"):
    """The records of one configuration: model, method, task and hyperparameters (defaults unless
    ``hparams`` overrides some), the task's default budget and sizes, any seed and learning rate."""
    hp = json.dumps({**method(name).defaults, **(hparams or {})}, sort_keys=True)
    budget = budget_for(model, data.task_info(task).kind)
    return [r for r in records if (r["model"], r["method"], r["task"]) == (model, name, task)
            and json.dumps(r["hparams"], sort_keys=True) == hp and r["sizes"] is None
            and r.get("train_split", "train") == train_split
            and (r["steps"], r["batch_size"]) == (budget.steps, budget.batch_size)]


def best_lr(records: list[dict], method_name: str, task: str, model: str = "zoo-decoder",
            hparams: dict | None = None, seed: int = SEEDS[0], train_split: str = "train"):
    """The learning rate with the best *validation* score on the sweep's seed (ties: the smaller
    rate); None when the store has no such sweep."""
    first = [r for r in _config(records, model, method_name, task, hparams, train_split) if r["seed"] == seed]
    if not first:
        return None
    return max(first, key=lambda r: (r["validation"], -r["lr"]))["lr"]


def sweep(methods, tasks, seeds=SEEDS, *, model: str = "zoo-decoder", hparams: dict | None = None,
          path=None, progress: bool = True, log=print, train_split: str = "train") -> list[dict]:
    """Fill the store: every method's learning rates on the first seed, then the other seeds at the
    rate that won on validation. ``hparams`` overrides defaults ({"lora": {"r": 4}}). Runs already
    in the store are skipped, so an interrupted sweep resumes where it stopped."""
    from tqdm.auto import tqdm
    hparams = hparams or {}
    if not seeds:
        raise ValueError("bench.sweep: seeds is empty; give at least one seed, e.g. seeds=(0, 1, 2)")
    todo = [(name, task, seeds[0], lr) for task in tasks for name in methods for lr in method(name).lrs]
    todo += [(name, task, s, None) for task in tasks for name in methods for s in seeds[1:]]
    bar = tqdm(todo, desc="bench", disable=not progress)
    for name, task, seed, lr in bar:
        done = _config(load(path), model, name, task, hparams.get(name), train_split)
        lr = best_lr(done, name, task, model, hparams.get(name), seeds[0], train_split) if lr is None else lr
        bar.set_postfix_str(f"{name} {task} seed {seed} lr {lr:g}")
        if any((r["seed"], r["lr"]) == (seed, lr) for r in done):
            continue
        record = run(name, task, seed, lr, model=model, progress=False, train_split=train_split,
                     **hparams.get(name, {}))
        append(record, path)
        log(f"{name:8s} {task:11s} seed {seed} lr {lr:<6g} val {record['validation']:.3f} "
            f"test {record['test']:.3f} ({record['seconds']:.0f} s)")
    return load(path)


# ---------------------------------------------------------------------------------------------
# The table

def table(records: list[dict], methods=None, tasks=None, model: str = "zoo-decoder",
          hparams: dict | None = None, train_split: str = "train") -> dict:
    """(method, task) -> mean and standard deviation of the test score over seeds at the learning
    rate chosen on validation, with the trainable parameters, step time and memory. ``hparams``
    picks a configuration other than the defaults ({"lora": {"r": 4}})."""
    hparams = hparams or {}
    methods = methods or list(dict.fromkeys(r["method"] for r in records))
    if not records:
        raise ValueError("bench.table: no records; fill the store with python -m pefttutor.bench run")
    tasks = tasks or list(dict.fromkeys(r["task"] for r in records))
    out = {}
    for name in methods:
        for task in tasks:
            rows = _config(records, model, name, task, hparams.get(name), train_split)
            lr = best_lr(rows, name, task, model, hparams.get(name), train_split=train_split)
            rows = list({r["seed"]: r for r in rows if r["lr"] == lr}.values())   # one per seed
            if not rows:
                continue
            tests = [r["test"] for r in rows]
            out[(name, task)] = {
                "mean": statistics.fmean(tests), "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "seeds": len(tests), "lr": lr, "trainable": rows[0]["trainable"],
                "total": rows[0]["total"], "step_ms": statistics.median(r["step_ms"] for r in rows),
                "memory_mb": rows[0]["memory_mb"], "metric": rows[0]["metric"]}
    return out


def format_table(tab: dict, digits: int = 3) -> str:
    """The table as Markdown: one row per method, one column per task (mean ± std), then the
    trainable parameters, step time and training memory of the first task."""
    if not tab:
        raise ValueError("bench.format_table: the table is empty; no records match this model, "
                         "these methods, tasks and hyperparameters (python -m pefttutor.bench run ...)")
    methods = list(dict.fromkeys(m for m, _ in tab))
    tasks = list(dict.fromkeys(t for _, t in tab))
    head = "| method | " + " | ".join(tasks) + " | trainable | step (ms) | memory (MB) |"
    lines = [head, "|" + " --- |" * (len(tasks) + 4)]
    for name in methods:
        cells = []
        for task in tasks:
            c = tab.get((name, task))
            cells.append("" if c is None else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}")
        first = next(tab[(name, t)] for t in tasks if (name, t) in tab)
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {first['trainable']:,} | {first['step_ms']:.0f} | {first['memory_mb']:.1f} |")
    return "\n".join(lines)


def separated(tab: dict, a: str, b: str, task: str, k: float = 2.0) -> bool:
    """Do methods ``a`` and ``b`` differ on ``task`` by more than ``k`` seed standard deviations
    (the larger of the two)?"""
    x, y = tab[(a, task)], tab[(b, task)]
    if min(x["seeds"], y["seeds"]) < 2:
        raise ValueError(f"bench.separated: {a!r} or {b!r} on {task!r} has one seed; a spread needs "
                         f"at least two (python -m pefttutor.bench run --seeds 3)")
    return abs(x["mean"] - y["mean"]) > k * max(x["std"], y["std"])


# ---------------------------------------------------------------------------------------------
# The command line

def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--hparams {text!r}: give a JSON object, e.g. '{{\"r\": 4}}'")
    return value


def _per_method(hparams: dict, methods, parser) -> dict:
    """Each method gets the overrides it has; a name that no chosen method has is an error."""
    for key in hparams:
        if not any(key in METHODS[m].defaults for m in methods):
            have = sorted({k for m in methods for k in METHODS[m].defaults})
            parser.error(f"--hparams: none of {methods} has a hyperparameter {key!r}; they have {have}")
    return {m: {k: v for k, v in hparams.items() if k in METHODS[m].defaults} for m in methods}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pefttutor.bench",
        description="Fine-tune methods on the task suite, store one record per run, print the table.")
    sub = parser.add_subparsers(dest="command", required=True)
    src = sub.add_parser("mpt-source", help="build multitask prompt tuning's source prompt (teachers, then "
                                            "the distilled multitask prompt) and print where it is")
    src.add_argument("--model", default="zoo-decoder")
    src.add_argument("--sources", nargs="+", default=list(MPT_SOURCES), choices=sorted(data.TASKS),
                     metavar="TASK")
    src.add_argument("--out", default=None, help="a folder (default: the cache, PEFTTUTOR_CACHE)")
    for name in ("run", "table", "plot"):
        p = sub.add_parser(name)
        p.add_argument("--methods", nargs="+", default=["head", "full", "lora", "krona", "fedpara", "qlora"],
                       choices=sorted(METHODS), metavar="METHOD")
        p.add_argument("--tasks", nargs="+", default=list(data.SUITE), choices=sorted(data.TASKS),
                       metavar="TASK")
        p.add_argument("--model", default="zoo-decoder")
        p.add_argument("--store", default=str(STORE), help="the JSON-lines results file")
        p.add_argument("--hparams", type=_json_object, default={},
                       help='JSON overriding the methods\' defaults, e.g. \'{"r": 4}\'')
        p.add_argument("--train-split", default="train", choices=["train", "few_shot"],
                       help="train on the whole training split or on the few-shot split")
        if name == "run":
            p.add_argument("--seeds", type=int, default=len(SEEDS), help="how many seeds (from 0)")
        if name == "plot":
            p.add_argument("--out", default="bench.png")
    args = parser.parse_args(argv)
    if args.command == "mpt-source":
        print(mpt_source(args.model, args.sources, out=args.out))
        return
    hparams = _per_method(args.hparams, args.methods, parser)
    if args.command == "run" and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.command == "run":
        start = time.perf_counter()
        sweep(args.methods, args.tasks, tuple(range(args.seeds)), model=args.model, path=args.store,
              train_split=args.train_split,
              hparams=hparams)
        print(f"bench: {(time.perf_counter() - start) / 60:.1f} min")
    tab = table(load(args.store), args.methods, args.tasks, args.model, hparams, args.train_split)
    if not tab:
        print("no records for this model, methods and tasks: fill the store with "
              "python -m pefttutor.bench run (same options)")
        return
    if args.command == "plot":
        from .plot import comparison
        comparison(tab).savefig(args.out, dpi=150, bbox_inches="tight")
        print(f"saved {args.out}")
    else:
        print(format_table(tab))


if __name__ == "__main__":
    main()
