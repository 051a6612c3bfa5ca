"""Soft prompts: prompt tuning, P-tuning, prefix tuning (and P-tuning v2), multitask prompt tuning.

Defined in the chapters "Prompt tuning and P-tuning" (book/prompt_tuning.ipynb) and "Prefix tuning
and P-tuning v2" (book/prefix_tuning.ipynb).

A soft prompt is extra input, not a change of weights. Its parameters live in a module that wraps
the model's input embedding, so ``inject``, ``save_adapter``, ``load_adapter`` and
``trainable_parameters`` treat it like every other method, and a forward pre-hook on the model
adds the virtual tokens to each call:

* input-level prompts (:class:`PromptTuning`, :class:`PTuning`, :class:`MultitaskPromptTuning`)
  put p vectors in front of the input embeddings, p ones in front of the attention mask and p
  ignored labels (-100) in front of a language model's labels;
* a prefix (:class:`PrefixTuning`; P-tuning v2 is a prefix without projection under a
  classification head) puts p key and value vectors in front of every layer's attention, through
  the model's cache object, and p ones in front of the mask.

In generation the virtual tokens enter once, at prefill; later steps find them in the cache and
only shift their positions by p.
"""
from __future__ import annotations

import contextlib
import inspect
import re

import torch
from torch import nn

from . import checks
from .inject import AdapterModule, adapter_layers

# Architectures that only encode (read from ``config.model_type``).
ENCODER_TYPES = {"bert", "roberta", "roberta-prelayernorm", "distilbert", "albert", "electra",
                 "deberta", "deberta-v2", "xlm-roberta", "modernbert"}


def is_encoder_config(config) -> bool:
    return config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)


def geometry(model: nn.Module) -> dict:
    """Layers, key-value heads, head width and positions of a transformers model's attention."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    absolute = any(n.split(".")[-1] in ("wpe", "position_embeddings") for n, _ in model.named_modules())
    positions = getattr(config, "max_position_embeddings", None)
    if positions and config.model_type in ("roberta", "xlm-roberta", "roberta-prelayernorm"):
        positions -= config.pad_token_id + 1           # RoBERTa numbers positions from padding_idx + 1
    return {"layers": config.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "positions": positions, "absolute": absolute}


def init_ids(tokenizer, text: str, num_virtual_tokens: int, repeat: bool = False) -> list[int]:
    """Token ids of ``text`` to initialise ``num_virtual_tokens`` prompt vectors from (Lester et al.:
    vocabulary or class-label words beat random vectors). Without ``repeat`` the text must tokenize
    to exactly that many tokens; with it, the ids are cycled and cut to length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} tokenizes to no tokens: give some words")
    if len(ids) != num_virtual_tokens and not repeat:
        raise ValueError(f"init text {text!r} tokenizes to {len(ids)} tokens, not num_virtual_tokens="
                         f"{num_virtual_tokens}. Use a text of {num_virtual_tokens} tokens, set "
                         f"num_virtual_tokens={len(ids)}, or pass repeat=True to cycle the ids "
                         f"(peft cycles or cuts silently).")
    return (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]


# ---------------------------------------------------------------------------------------------
# The cache a prefix travels in

def _prefix_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's prefix that a training forward reads but never grows: ``update`` returns
        [prefix; new] without storing the new keys, so recomputing a layer under gradient
        checkpointing sees the same cache as the first pass."""

        def __init__(self, keys, values):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values, self.is_initialized = keys, values, True

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    return PrefixLayer


def prefix_cache(pairs, cache=None, frozen: bool = False):
    """A cache holding each layer's (keys, values) prefix, shaped [batch, kv_heads, p, head_dim].

    ``cache``: an empty cache to fill (generation's, which then grows as tokens are decoded). With
    ``frozen`` (training) a cache whose layers return [prefix; new] without storing: safe under
    gradient checkpointing, where transformers recomputes each layer."""
    from transformers.cache_utils import Cache, DynamicCache
    if frozen:
        layer = _prefix_layer_class()
        return Cache(layers=[layer(k, v) for k, v in pairs])
    cache = DynamicCache() if cache is None else cache
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


# ---------------------------------------------------------------------------------------------
# The hooks that add the virtual tokens to a call

def _cache_key(model, kw: dict) -> str:
    """The keyword a call carries its key-value cache in: ``past_key_values`` up to transformers
    5.23, ``cache`` from 5.24 (which still accepts the old name, but ignores it when both are
    given). Use the one the call already has, else the one the model's forward names."""
    for key in ("cache", "past_key_values"):
        if kw.get(key) is not None:
            return key
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _prompt_of(model) -> "SoftPrompt":
    return model.get_submodule(model.pefttutor_prompt)


def _before(model, args, kwargs):
    prompt = _prompt_of(model)
    prompt.armed = True
    if not prompt.active:
        return None
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError(f"{type(model).__name__} with a soft prompt: pass the inputs by keyword "
                            f"(input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
    return (), prompt.rewrite(model, kwargs)


def _after(model, args, output):
    _prompt_of(model).armed = False


@contextlib.contextmanager
def disabled(model: nn.Module):
    """``with disabled(model):`` calls run the base model without its soft prompt."""
    prompt = _prompt_of(model) if hasattr(model, "pefttutor_prompt") else None
    if prompt is None:
        raise ValueError(f"{type(model).__name__} has no soft prompt to disable")
    prompt.active = False
    try:
        yield model
    finally:
        prompt.active = True


class SoftPrompt(AdapterModule):
    """The input embedding of a model with a soft prompt, and the prompt's parameters.

    ``inject(model, PromptTuning, "auto", num_virtual_tokens=20)`` wraps the input embedding and
    hooks the model's forward (see the module's docstring). Subclasses define ``prompts(batch,
    task_ids)`` (input level) or ``pairs(batch)`` (a prefix in every layer)."""

    mergeable = False
    deep = False                    # True: the virtual tokens enter every layer's attention

    def __init__(self, base: nn.Module, num_virtual_tokens: int = 20):
        checks.integer("num_virtual_tokens", num_virtual_tokens, low=1, who=f"{type(self).__name__} ")
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"{type(self).__name__} wraps the model's input embedding (nn.Embedding), "
                            f"got {type(base).__name__}; inject it with targets='auto'")
        super().__init__(base)
        self.num_virtual_tokens = num_virtual_tokens
        self.dim = base.embedding_dim
        self.armed = False          # set by the model's hook for the length of one call
        self.active = True

    @classmethod
    def find_targets(cls, model: nn.Module, targets) -> list[str]:
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
            raise TypeError(f"{cls.__name__} needs a transformers model (with get_input_embeddings and a "
                            f"config), got {type(model).__name__}")
        have = [n for n, m in adapter_layers(model).items() if isinstance(m, SoftPrompt)]
        if have:
            raise ValueError(f"{type(model).__name__} already has a soft prompt "
                             f"({type(model.get_submodule(have[0])).__name__} at {have[0]}); a model "
                             f"takes one. Load the model afresh to use another.")
        emb = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is emb)
        if targets != "auto" and not (isinstance(targets, str) and re.fullmatch(targets, name)):
            raise ValueError(f"{cls.__name__} sits at the model's input embedding ({name}); pass "
                             f"targets='auto', got {targets!r}")
        return [name]

    # the embedding's attributes that transformers reads (tying, resizing)
    @property
    def weight(self):
        return self.base.weight

    @property
    def num_embeddings(self):
        return self.base.num_embeddings

    @property
    def embedding_dim(self):
        return self.base.embedding_dim

    @property
    def padding_idx(self):
        return self.base.padding_idx

    def attach(self, model: nn.Module, name: str):
        g = geometry(model)
        if g["positions"] and self.num_virtual_tokens >= g["positions"]:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens} does not fit: "
                             f"{type(model).__name__} has {g['positions']} positions, and the prompt "
                             f"and the input share them. Use fewer virtual tokens (the papers use 1 to "
                             f"100; 20 is a common choice).")
        self.positions = g["positions"] if g["absolute"] else None
        self.decoder_classifier = (type(model).__name__.endswith("ForSequenceClassification")
                                   and not is_encoder_config(model.config))
        self.build(model, g)
        model.pefttutor_prompt = name
        model.register_forward_pre_hook(_before, with_kwargs=True)
        model.register_forward_hook(_after, always_call=True)

    def build(self, model: nn.Module, g: dict):
        """Create parameters that depend on the whole model (a prefix's layers and heads)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            raise RuntimeError(
                f"the input embedding carries a {type(self).__name__}, but this call did not come "
                f"through the model it was injected into, so the prompt would be left out silently. "
                f"Call that model (its forward and generate add the virtual tokens), or use "
                f"`with pefttutor.prompts.disabled(model):` to run it without the prompt.")
        return self.base(input_ids)

    def check_mergeable(self):
        raise ValueError(f"{type(self).__name__} cannot be merged: a soft prompt is extra input (virtual "
                         f"tokens), not an update of a weight matrix. Keep it attached; it costs "
                         f"{self.num_virtual_tokens} extra positions per sequence at inference.")

    def prompts(self, batch: int, task_ids=None) -> torch.Tensor:
        raise NotImplementedError

    def _param_dtype(self):
        return next(self.parameters()).dtype

    def rewrite(self, model, kw: dict) -> dict:
        """The keyword arguments of one call with the virtual tokens added."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            raise ValueError("a model with a soft prompt needs input_ids or inputs_embeds")
        batch, length = x.shape[:2]
        p = self.num_virtual_tokens
        cache_key = _cache_key(model, kw)
        other = "past_key_values" if cache_key == "cache" else "cache"
        if other in kw and kw[other] is None:
            del kw[other]
        cache = kw.get(cache_key)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError(f"soft prompts need transformers' Cache objects for {cache_key}, not tuples")
        past = cache.get_seq_length() if cache is not None else 0
        first = past == 0
        if self.positions and p + past + length > self.positions:
            raise ValueError(f"{p} virtual tokens + {past + length} tokens exceed the model's "
                             f"{self.positions} positions: shorten the input to at most "
                             f"{self.positions - p} tokens or use fewer virtual tokens")
        task_ids = kw.pop("task_ids", None)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"soft prompts need a 2-D attention mask [batch, tokens], got shape "
                                 f"{tuple(mask.shape)}")
            mask = torch.cat([mask.new_ones(batch, p), mask], 1)
            kw["attention_mask"] = mask
        if self.deep or not first:       # the virtual tokens are in the cache: shift positions by p
            for key in ("position_ids", "cache_position"):
                if kw.get(key) is not None:
                    kw[key] = kw[key] + p
            if self.deep and first:
                frozen = model.training and cache is None
                kw[cache_key] = prefix_cache(self.pairs(batch, dtype=x.dtype if ids is None
                                                                else self.weight.dtype),
                                                     cache, frozen=frozen)
            return kw
        embeds = embeds if embeds is not None else self.base(ids)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([self.prompts(batch, task_ids).to(embeds.dtype), embeds], 1)
        labels = kw.get("labels")
        if labels is not None and labels.dim() == 2:
            kw["labels"] = torch.cat([labels.new_full((batch, p), -100), labels], 1)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = torch.cat([kw["token_type_ids"].new_zeros(batch, p),
                                              kw["token_type_ids"]], 1)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = torch.arange(p + length, device=x.device)
        if kw.get("position_ids") is not None:
            virtual = torch.arange(p, device=x.device).expand(kw["position_ids"].shape[0], p)
            kw["position_ids"] = torch.cat([virtual, kw["position_ids"] + p], 1)
        if self.decoder_classifier and mask is not None and not bool(mask.all()):
            # transformers' decoder classifiers read the last position when given embeddings, not the
            # last real token: move each row's padding to the front and number positions past it.
            order = torch.argsort(mask, dim=1, stable=True)
            kw["inputs_embeds"] = kw["inputs_embeds"].gather(
                1, order[..., None].expand_as(kw["inputs_embeds"]))
            kw["attention_mask"] = mask = mask.gather(1, order)
            kw["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return kw

    def _no_tasks(self, task_ids):
        if task_ids is not None:
            raise ValueError(f"task_ids are for MultitaskPromptTuning; {type(self).__name__} has one prompt")


def _vocab_rows(base: nn.Embedding, n: int, ids) -> torch.Tensor:
    if ids is None:
        ids = torch.randint(0, base.num_embeddings, (n,))
    else:
        if (not isinstance(ids, (list, tuple)) or len(ids) != n
                or not all(isinstance(i, int) and 0 <= i < base.num_embeddings for i in ids)):
            got = f"{len(ids)} ids" if isinstance(ids, (list, tuple)) else repr(ids)
            raise ValueError(f"init_ids must be {n} token ids in [0, {base.num_embeddings}), one per "
                             f"virtual token; got {got}. pefttutor.prompts.init_ids(tokenizer, text, "
                             f"{n}) makes them from a text.")
        ids = torch.tensor(ids)
    return base.weight.detach()[ids.to(base.weight.device)].float().clone()


def _initial_prompt(base: nn.Embedding, n: int, init: str, ids) -> torch.Tensor:
    if init not in ("vocab", "random"):
        raise ValueError(f"init={init!r}: choose 'vocab' (embeddings of vocabulary tokens, or of init_ids) "
                         f"or 'random' (normal with the embeddings' standard deviation)")
    if init == "random":
        if ids is not None:
            raise ValueError("init_ids go with init='vocab'")
        std = base.weight.detach().float().std().item()
        return torch.randn(n, base.embedding_dim, device=base.weight.device) * std
    return _vocab_rows(base, n, ids)


class PromptTuning(SoftPrompt):
    """Prompt tuning (Lester et al. 2021): p trainable vectors in front of the input embeddings.

    ``init="vocab"`` starts them at the embeddings of random vocabulary tokens, or of ``init_ids``
    (class-label words, a task description: see :func:`init_ids`); ``"random"`` draws them."""

    def __init__(self, base: nn.Module, num_virtual_tokens: int = 20, init: str = "vocab",
                 init_ids: list | None = None):
        super().__init__(base, num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, self.dim, device=base.weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(_initial_prompt(base, num_virtual_tokens, init, init_ids))

    def prompts(self, batch: int, task_ids=None) -> torch.Tensor:
        self._no_tasks(task_ids)
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)


class PTuning(SoftPrompt):
    """P-tuning (Liu et al. 2021): the virtual tokens come out of a prompt encoder, an MLP
    (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM followed by a two-layer MLP, as in peft's
    ``PromptEncoder``. ``baked=True`` keeps only the encoder's output (:func:`bake`)."""

    def __init__(self, base: nn.Module, num_virtual_tokens: int = 20, encoder: str = "mlp",
                 hidden: int | None = None, lstm_layers: int = 2, dropout: float = 0.0,
                 baked: bool = False):
        if encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder={encoder!r}: choose 'mlp' or 'lstm'")
        super().__init__(base, num_virtual_tokens)
        d = self.dim
        h = d if hidden is None else checks.integer("hidden", hidden, low=1, who="PTuning ")
        device = base.weight.device
        self.encoder, self.baked = encoder, baked
        self.embedding = nn.Embedding(num_virtual_tokens, d, device=device)
        if baked:
            return
        if encoder == "lstm":
            checks.integer("lstm_layers", lstm_layers, low=1, who="PTuning ")
            self.lstm_head = nn.LSTM(d, h, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d)).to(device)
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, d)).to(device)

    def table(self) -> torch.Tensor:
        """The p virtual-token vectors [p, d] the encoder makes."""
        x = self.embedding.weight
        if self.baked:
            return x
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0]).squeeze(0)
        return self.mlp_head(x)

    def prompts(self, batch: int, task_ids=None) -> torch.Tensor:
        self._no_tasks(task_ids)
        return self.table().unsqueeze(0).expand(batch, -1, -1)


class PrefixTuning(SoftPrompt):
    """Prefix tuning (Li and Liang 2021) and P-tuning v2 (Liu et al. 2022): p trainable key and value
    vectors in front of every layer's attention.

    ``projection=True`` reparameterises them as an MLP of p smaller vectors (Embedding -> Linear ->
    Tanh -> Linear, as in peft); :func:`bake` replaces the MLP by its output after training.
    ``projection=False`` trains the table itself (P-tuning v2). ``layers``, ``kv_heads`` and
    ``head_dim`` are read from the model; a saved prefix records them, and loading it into a model
    of another shape is an error."""

    deep = True

    def __init__(self, base: nn.Module, num_virtual_tokens: int = 20, projection: bool = False,
                 hidden: int | None = None, layers: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, baked: bool = False):
        super().__init__(base, num_virtual_tokens)
        if hidden is not None:
            checks.integer("hidden", hidden, low=1, who="PrefixTuning ")
        self.projection, self.hidden, self.baked = projection, hidden, baked
        self.wanted = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}

    def build(self, model, g):
        mine = {k: g[k] for k in self.wanted}
        wrong = {k: v for k, v in self.wanted.items() if v is not None and v != mine[k]}
        if wrong:
            raise ValueError(f"this prefix is for a model with {self.wanted['layers']} layers, "
                             f"{self.wanted['kv_heads']} key-value heads of width {self.wanted['head_dim']}; "
                             f"{type(model).__name__} has {mine['layers']} layers, {mine['kv_heads']} "
                             f"key-value heads of width {mine['head_dim']}. A prefix holds keys and values "
                             f"for each layer and head: load it into the model it was trained with, or "
                             f"train a new one (leave layers / kv_heads / head_dim unset).")
        self.derived = mine
        self.layers, self.kv_heads, self.head_dim = mine["layers"], mine["kv_heads"], mine["head_dim"]
        token_dim = self.kv_heads * self.head_dim
        width = self.layers * 2 * token_dim
        device = self.base.weight.device
        if self.projection and not self.baked:
            h = self.hidden or token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, h), nn.Tanh(), nn.Linear(h, width)).to(device)
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width, device=device)
        # A prefix travels in the cache: let transformers' checkpointed layers keep it (the training
        # cache never grows, so recomputing a layer sees the same prefix).
        for m in model.modules():
            if hasattr(type(m), "_can_checkpoint_with_cache"):
                m._can_checkpoint_with_cache = True

    def table(self) -> torch.Tensor:
        """[p, layers * 2 * kv_heads * head_dim]: every layer's key and value vectors, flat."""
        if self.projection and not self.baked:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def pairs(self, batch: int, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values), [batch, kv_heads, p, head_dim] (peft's layout: the flat
        vector is [layer 0 keys, layer 0 values, layer 1 keys, ...], each split into heads)."""
        p = self.num_virtual_tokens
        kv = self.table().view(p, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        if dtype is not None:
            kv = kv.to(dtype)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]


class MultitaskPromptTuning(SoftPrompt):
    """Multitask prompt tuning (Wang et al. 2023): task t's prompt is a shared prompt P times
    (elementwise) a rank-``rank`` matrix U_t V_t. ``task_ids`` in the call choose each row's task
    (the module's ``task`` otherwise, for generation)."""

    def __init__(self, base: nn.Module, num_virtual_tokens: int = 20, num_tasks: int = 1, rank: int = 1,
                 init: str = "vocab", init_ids: list | None = None):
        super().__init__(base, num_virtual_tokens)
        checks.integer("num_tasks", num_tasks, low=1, who="MultitaskPromptTuning ")
        checks.integer("rank", rank, low=1, who="MultitaskPromptTuning ")
        device = base.weight.device
        self.num_tasks, self.rank, self.task = num_tasks, rank, 0
        self.embedding = nn.Embedding(num_virtual_tokens, self.dim, device=device)
        with torch.no_grad():
            self.embedding.weight.copy_(_initial_prompt(base, num_virtual_tokens, init, init_ids))
        self.prefix_task_cols = nn.Parameter(torch.randn(num_tasks, num_virtual_tokens, rank, device=device) * .02)
        self.prefix_task_rows = nn.Parameter(torch.randn(num_tasks, rank, self.dim, device=device) * .02)

    def prompts(self, batch: int, task_ids=None) -> torch.Tensor:
        if task_ids is None:
            task_ids = torch.full((batch,), self.task, dtype=torch.long, device=self.embedding.weight.device)
        task_ids = torch.as_tensor(task_ids, device=self.embedding.weight.device).long().reshape(-1)
        if task_ids.numel() != batch or bool((task_ids < 0).any()) or bool((task_ids >= self.num_tasks).any()):
            raise ValueError(f"task_ids must hold one task in [0, {self.num_tasks}) per row of the batch "
                             f"({batch}), got {task_ids.tolist()}")
        scale = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]       # [batch, p, d]
        return self.embedding.weight.unsqueeze(0) * scale


SOURCE_INITS = ("average", "exact", "shared")


def _source_tensors(source) -> dict:
    """The shared prompt and the task factors of a source multitask prompt: from a model that
    carries one, a file written by ``save_adapter``, or a dict (pefttutor's or peft's keys)."""
    if isinstance(source, nn.Module):
        prompt = _prompt_of(source) if hasattr(source, "pefttutor_prompt") else None
        if not isinstance(prompt, MultitaskPromptTuning):
            raise ValueError(f"the source {type(source).__name__} carries no MultitaskPromptTuning")
        return {"shared": prompt.embedding.weight, "cols": prompt.prefix_task_cols,
                "rows": prompt.prefix_task_rows}
    if not isinstance(source, dict):
        from safetensors.torch import load_file
        source = load_file(str(source))
    found = {}
    for key, value in source.items():
        for short, ends in (("shared", ("embedding.weight", "prompt_embeddings")),
                            ("cols", ("prefix_task_cols",)), ("rows", ("prefix_task_rows",))):
            if key.endswith(ends):
                found[short] = value
    if set(found) != {"shared", "cols", "rows"}:
        raise ValueError(f"the source holds no multitask prompt (a shared prompt, prefix_task_cols and "
                         f"prefix_task_rows); its keys are {sorted(source)[:6]}")
    return found


def from_source(model: nn.Module, source, how: str = "average", task: int | None = None) -> nn.Module:
    """Multitask prompt tuning's target adaptation: start the model's :class:`MultitaskPromptTuning`
    from a prompt trained on source tasks.

    ``how="average"`` copies the shared prompt and the *average* of the source tasks' vectors
    u_k and v_k (averaged separately, as the paper and peft's ``AVERAGE_SOURCE_TASKS`` do);
    ``"exact"`` copies source task ``task``'s vectors; ``"shared"`` copies the shared prompt only.
    Every task of the target gets the same start. ``source``: a model with a multitask prompt, a
    file from ``save_adapter``, or a state dict (peft's keys work too)."""
    if how not in SOURCE_INITS:
        raise ValueError(f"how={how!r}: choose 'average' (the paper's), 'exact' (one source task, "
                         "with task=k) or 'shared' (the shared prompt only)")
    prompt = _prompt_of(model) if hasattr(model, "pefttutor_prompt") else None
    if not isinstance(prompt, MultitaskPromptTuning):
        raise ValueError("from_source starts a MultitaskPromptTuning; inject one first: "
                         "inject(model, MultitaskPromptTuning, 'auto', num_virtual_tokens=..., rank=...)")
    src = _source_tensors(source)
    n_src = src["cols"].shape[0]
    want = {"shared": tuple(prompt.embedding.weight.shape), "cols": tuple(prompt.prefix_task_cols.shape[1:]),
            "rows": tuple(prompt.prefix_task_rows.shape[1:])}
    have = {"shared": tuple(src["shared"].shape), "cols": tuple(src["cols"].shape[1:]),
            "rows": tuple(src["rows"].shape[1:])}
    if want != have:
        raise ValueError(f"the source prompt does not fit this one: source shared prompt {have['shared']}, "
                         f"task vectors {have['cols']} and {have['rows']}; this model's {want['shared']}, "
                         f"{want['cols']} and {want['rows']}. Inject with the source's num_virtual_tokens "
                         f"and rank, into a model with the same embedding width.")
    if how == "exact":
        if task is None or not isinstance(task, int) or not 0 <= task < n_src:
            raise ValueError(f"how='exact' copies one source task: pass task=k with k in [0, {n_src})")
    elif task is not None:
        raise ValueError(f"task={task} goes with how='exact'")
    with torch.no_grad():
        prompt.embedding.weight.copy_(src["shared"])
        if how != "shared":
            pick = (lambda t: t[task]) if how == "exact" else (lambda t: t.float().mean(0))
            prompt.prefix_task_cols.copy_(pick(src["cols"]).expand_as(prompt.prefix_task_cols))
            prompt.prefix_task_rows.copy_(pick(src["rows"]).expand_as(prompt.prefix_task_rows))
    return model


class Distillation:
    """Multitask prompt tuning's source-training loss, a ``loss_fn`` for :func:`pefttutor.train`:

        L = L_LM(student) + lam * (KL(teacher || student) + MSE(h_student, h_teacher))

    The student is the model with a :class:`MultitaskPromptTuning` (a batch's ``task_ids`` choose
    each row's task); ``teachers[k]`` is the same base model with source task k's own prompt
    (trained alone, by conventional prompt tuning). The KL is taken at the positions that predict
    the labels; the hidden states compared are the last layer's over the real input tokens."""

    def __init__(self, teachers: list, lam: float = 1.0):
        if not teachers:
            raise ValueError("Distillation needs one teacher model per source task")
        self.teachers = list(teachers)
        self.lam = checks.real("lam", lam, low=0, who="Distillation ")
        self.last = {}

    def __call__(self, model, batch: dict) -> torch.Tensor:
        import torch.nn.functional as F
        task_ids = batch["task_ids"]
        student = model(**batch, output_hidden_states=True)
        p = _prompt_of(model).num_virtual_tokens
        logits, hidden = student.logits[:, p:], student.hidden_states[-1][:, p:]
        t_logits, t_hidden = torch.empty_like(logits), torch.empty_like(hidden)
        with torch.no_grad():
            for k in task_ids.unique().tolist():
                if not 0 <= k < len(self.teachers):
                    raise ValueError(f"task id {k} has no teacher: {len(self.teachers)} teachers were given")
                rows = task_ids == k
                teacher = self.teachers[k]
                q = _prompt_of(teacher).num_virtual_tokens
                out = teacher(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                              output_hidden_states=True)
                t_logits[rows], t_hidden[rows] = out.logits[:, q:], out.hidden_states[-1][:, q:]
        at = batch["labels"][:, 1:] != -100                      # positions that predict a label token
        kl = F.kl_div(F.log_softmax(logits[:, :-1][at], -1), F.log_softmax(t_logits[:, :-1][at], -1),
                      log_target=True, reduction="batchmean")
        real = batch["attention_mask"].bool()
        mse = F.mse_loss(hidden[real], t_hidden[real])
        self.last = {"lm": student.loss.item(), "kl": kl.item(), "mse": mse.item()}
        return student.loss + self.lam * (kl + mse)


def bake(model: nn.Module) -> nn.Module:
    """Replace a prompt encoder (P-tuning) or a prefix's MLP (prefix tuning with projection) by the
    vectors it produces, as the papers do after training: the model computes the same, and the saved
    prompt is just the table. The model's recorded hyperparameters gain ``baked=True``."""
    prompt = _prompt_of(model) if hasattr(model, "pefttutor_prompt") else None
    if not isinstance(prompt, (PTuning, PrefixTuning)):
        raise ValueError(f"bake applies to PTuning and PrefixTuning; this model has "
                         f"{type(prompt).__name__ if prompt else 'no soft prompt'}")
    if prompt.baked or (isinstance(prompt, PrefixTuning) and not prompt.projection):
        return model
    with torch.no_grad():
        table = prompt.table().detach().clone()
    for child in ("transform", "mlp_head", "lstm_head"):
        if hasattr(prompt, child):
            delattr(prompt, child)
    prompt.embedding = nn.Embedding.from_pretrained(table, freeze=False)
    prompt.baked = True
    for cfg in model.pefttutor_config:
        if cfg["layer"] == type(prompt).__name__:
            cfg["hparams"] = {**cfg["hparams"], "baked": True}
    return model
