"""Bottleneck adapters: Houlsby (serial, twice per layer), Pfeiffer (serial, once per layer), parallel,
AdapterFusion and AdapterDrop.

Defined in the chapters "Adapters" (book/adapters.ipynb), "AdapterFusion" and "AdapterDrop".
Houlsby et al. 2019 (arXiv 1902.00751); He et al. 2022 (2110.04366); Pfeiffer et al. 2021
(2005.00247); Rücklé et al. 2021 (2010.11918). The placements compute what AdapterHub's ``adapters``
computes for ``DoubleSeqBnConfig``, ``SeqBnConfig``, ``ParBnConfig`` and ``Fuse`` (tests/test_adapters.py
checks it on fixtures that ``adapters`` itself wrote), with one documented exception: on a pre-LN model
(Llama, GPT-2) our parallel adapter reads the feed-forward block's own (normalised) input, where
``adapters`` reads the residual stream before the norm.

An adapter is a small block ``a(z) = s * up(f(down(z)))`` with ``d -> m -> d`` and ``m << d``. Where it
sits ("site") decides what ``z`` is and where ``a(z)`` is added. With h a sublayer's output, x its
residual input and LN the sublayer's own LayerNorm (post-LN models such as BERT):

* Houlsby, after attention and after the FFN:  ``LN(a(h) + h + x)``
* Pfeiffer, after the FFN only:                 ``LN(a(z) + h + x)`` with ``z = LN(h + x)``
* parallel, beside the FFN:                     ``LN(a(x) + h + x)``

A pre-LN model adds the residual itself, so there a sublayer returns ``a(h) + h`` (Houlsby), the layer
returns ``a(y) + y`` for its output y (Pfeiffer) and the FFN returns ``a(u) + h`` for its input u
(parallel). None of these is a change of one weight matrix, so none can merge.
"""
from __future__ import annotations

import json
import math
import random
import re

import torch
from torch import nn

from . import checks
from .inject import (AdapterModule, _matches, atomic, check_targets, inject, is_linear, linear_shape,
                     refuse_adapted)

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}
INITS = ("mam", "houlsby", "bert")


# ---------------------------------------------------------------------------------------------
# Where an adapter can sit


def site_of(module: nn.Module) -> str | None:
    """The kind of place ``module`` is, for an adapter:

    * ``"post-attention"`` / ``"post-ffn"``: BERT/RoBERTa's ``SelfOutput`` / ``Output``, called as
      ``(h, x)``, which project, add the residual x and apply their LayerNorm;
    * ``"attention"`` / ``"ffn"``: a pre-LN model's attention block / feed-forward block (Llama, GPT-2);
    * ``"layer"``: a pre-LN model's whole decoder layer;
    * None: not a place for an adapter."""
    name = type(module).__name__
    post = hasattr(module, "dense") and hasattr(module, "LayerNorm")
    if post and name.endswith("SelfOutput"):
        return "post-attention"
    if post and name.endswith("Output"):
        return "post-ffn"
    if name.endswith("Attention") and (hasattr(module, "o_proj") or hasattr(module, "c_proj")):
        return "attention"
    if name.endswith("MLP"):
        return "ffn"
    if name.endswith(("DecoderLayer", "Block")) and hasattr(module, "mlp"):
        return "layer"
    return None


def hidden_size(module: nn.Module) -> int:
    """d_model at a site: what the adapter reads and writes."""
    site = site_of(module)
    if site in ("post-attention", "post-ffn"):
        return module.dense.out_features
    if site == "attention":
        return linear_shape(getattr(module, "o_proj", None) or module.c_proj)[0]
    block = module.mlp if site == "layer" else module      # the FFN's first linear layer reads d_model
    return next(linear_shape(m) for m in block.modules() if is_linear(m))[1]


def layer_index(name: str) -> int | None:
    """The transformer layer a module belongs to, from its name: ``bert.encoder.layer.3.output`` -> 3."""
    found = re.search(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def layer_norm_names(model: nn.Module) -> list[str]:
    """Suffixes of the model's normalisation modules (``LayerNorm``, ``ln_1``, ``input_layernorm``...),
    for training them beside a Houlsby adapter (``modules_to_save``) as the paper does."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if n and type(m).__name__.endswith(("LayerNorm", "RMSNorm"))})


# ---------------------------------------------------------------------------------------------
# The bottleneck


class Bottleneck(nn.Module):
    """``a(z) = scaling * up(f(down(z)))``: d -> m -> d.

    ``init`` as in ``adapters``: ``"mam"`` (down Kaiming-uniform, up zero, so a(z) = 0 and the model
    starts exactly as the base), ``"houlsby"`` (both truncated normal with std 1e-2: near zero) or
    ``"bert"`` (both normal with std 0.02: not near the identity)."""

    def __init__(self, d: int, m: int, activation: str = "relu", scaling: float = 1.0, init: str = "mam",
                 dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d, dtype=dtype, device=device)
        self.scaling = scaling
        with torch.no_grad():
            self.down.bias.zero_(), self.up.bias.zero_()
            if init == "mam":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.up.weight.zero_()
            elif init == "houlsby":
                for w in (self.down.weight, self.up.weight):
                    nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2)
            else:
                for w in (self.down.weight, self.up.weight):
                    w.normal_(0.0, 0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z))) * self.scaling


def _check_bottleneck(who, d, bottleneck, default_reduction, activation, scaling, init) -> tuple[int, str]:
    if bottleneck is None:
        bottleneck = max(1, d // default_reduction)
    m = checks.integer("bottleneck", bottleneck, low=1, who=who)
    if m > d:
        raise ValueError(f"{who}bottleneck={m} does not fit: the adapter projects d_model={d} down to m "
                         f"dimensions, so m must be in [1, {d}] (the papers use d/16 to d/2; "
                         f"bottleneck=None gives d/{default_reduction} = {max(1, d // default_reduction)})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}activation={activation!r}: choose one of {sorted(ACTIVATIONS)}")
    checks.positive("scaling", scaling, who=who)
    if init not in INITS:
        raise ValueError(f"{who}init={init!r}: choose one of {list(INITS)} ('mam': up projection zero, "
                         f"the model starts as the base)")
    return m, activation


def _sites_message(cls, model, sites) -> str:
    have = sorted({site_of(m) for _, m in model.named_modules()} - {None})
    found = [n for n, m in model.named_modules() if site_of(m) in cls.sites and not n.endswith(".base")]
    return (f"{cls.__name__} sits at {' / '.join(cls.sites)} modules; {type(model).__name__} has places of "
            f"kind {have}, and {len(found)} for this adapter, e.g. {found[:3]}. Use targets='auto' for the "
            f"paper's placement, or name-suffixes / a regular expression among those.")


class _AtSite(AdapterModule):
    """Shared plumbing of the modules that sit at a site: finding the sites, and the forward of each
    kind of site. Subclasses say which sites they take and how they combine (``post_ln``/``pre_ln``)."""

    mergeable = False
    sites: tuple[str, ...] = ()

    def _init_site(self, base):
        site = site_of(base)
        if site not in self.sites:
            raise TypeError(f"{type(self).__name__} sits at {' / '.join(self.sites)} modules (BERT's "
                            f"attention.output / output, a Llama or GPT-2 self_attn / mlp / layer); got "
                            f"{type(base).__name__}, which is a {site or 'not a place for an adapter'}")
        return site, hidden_size(base)

    @classmethod
    def find_targets(cls, model: nn.Module, targets="auto") -> list[str]:
        """``"auto"``: every place of the paper's placement; a list of name suffixes or a regex
        selects among them. A name that is not such a place is an error that lists the places."""
        check_targets(targets)

        def select(names):
            return names if targets == "auto" else [n for n in names if _matches(n, targets)]
        adapted = [n for n, m in model.named_modules() if isinstance(m, _AtSite) and site_of(m.base) in cls.sites]
        refuse_adapted(model, select(adapted), targets)
        sites = [n for n, m in model.named_modules() if site_of(m) in cls.sites and not n.endswith(".base")]
        found = select(sites)
        if not found:
            raise ValueError(f"no place for {cls.__name__} matches targets={targets!r}. "
                             + _sites_message(cls, model, sites))
        return found

    def forward(self, *args, **kwargs):
        if not self.active:                                  # dropped (AdapterDrop): the base alone
            return self.base(*args, **kwargs)
        if self.site.startswith("post-"):                    # BertSelfOutput / BertOutput(h, x)
            hidden = args[0] if args else kwargs["hidden_states"]
            x = args[1] if len(args) > 1 else kwargs["input_tensor"]
            h = self.base.dropout(self.base.dense(hidden))
            return self.post_ln(h, x, self.base.LayerNorm)
        if self.site == "attention":                         # returns (output, attention weights)
            out = self.base(*args, **kwargs)
            return (self.pre_ln(out[0], None), *out[1:])
        inp = args[0] if args else kwargs["hidden_states"]
        return self.pre_ln(self.base(*args, **kwargs), inp)

    def _run(self, fn, z):
        """Run ``fn`` in the dtype of the adapter's own weights (fp32 over a 16-bit or 4-bit base, unless
        the model was cast after injection), and give the result back in z's dtype."""
        return fn(z.to(self.own_dtype())).to(z.dtype)

    def own_dtype(self) -> torch.dtype:
        return next(p for n, p in self.named_parameters() if not n.startswith("base.")).dtype


class BottleneckAdapter(_AtSite):
    """A bottleneck adapter at one site. Use :class:`HoulsbyAdapter`, :class:`PfeifferAdapter` or
    :class:`ParallelAdapter`, which say where it sits and what it reads."""

    default_reduction = 16

    def __init__(self, base: nn.Module, bottleneck: int | None = None, activation: str = "relu",
                 scaling: float = 1.0, init: str = "mam"):
        who = f"{type(self).__name__} "
        site, d = self._init_site(base)
        m, activation = _check_bottleneck(who, d, bottleneck, self.default_reduction, activation, scaling, init)
        super().__init__(base)
        self.site, self.d_model, self.bottleneck, self.active = site, d, m, True
        self.adapter = Bottleneck(d, m, activation, float(scaling), init, dtype=self.adapter_dtype(),
                                  device=self.base_device())

    def extra_repr(self) -> str:
        return f"site={self.site}, d_model={self.d_model}, bottleneck={self.bottleneck}, active={self.active}"


class HoulsbyAdapter(BottleneckAdapter):
    """Houlsby et al.: an adapter on the output of each attention block and each FFN, before the
    residual (``adapters``' ``DoubleSeqBnConfig``, which uses swish). Inject at both::

        inject(model, HoulsbyAdapter, "auto", bottleneck=8)   # attention and FFN of every layer
    """

    sites = ("post-attention", "post-ffn", "attention", "ffn")

    def __init__(self, base, bottleneck=None, activation="swish", scaling=1.0, init="mam"):
        super().__init__(base, bottleneck, activation, scaling, init)

    def post_ln(self, h, x, ln):
        return ln(self._run(self.adapter, h) + h + x)

    def pre_ln(self, h, inp):
        return self._run(self.adapter, h) + h


class PfeifferAdapter(BottleneckAdapter):
    """Pfeiffer et al.: one adapter per layer, reading the layer's output after the FFN
    (``adapters``' ``SeqBnConfig``). On BERT it sits in ``output`` and its result passes through the
    layer's LayerNorm again; on Llama / GPT-2 it wraps the whole decoder layer."""

    sites = ("post-ffn", "layer")

    def post_ln(self, h, x, ln):
        return ln(self._run(self.adapter, ln(h + x)) + h + x)

    def pre_ln(self, y, inp):
        return self._run(self.adapter, y) + y


class ParallelAdapter(BottleneckAdapter):
    """He et al.: an adapter beside the FFN, reading the FFN's input, its output scaled by ``scaling``
    and added to the FFN's (``adapters``' ``ParBnConfig``: bottleneck d/2, scaling 4)."""

    sites = ("post-ffn", "ffn")
    default_reduction = 2

    def __init__(self, base, bottleneck=None, activation="relu", scaling=4.0, init="mam"):
        super().__init__(base, bottleneck, activation, scaling, init)

    def post_ln(self, h, x, ln):
        return ln(self._run(self.adapter, x) + h + x)

    def pre_ln(self, h, inp):
        return self._run(self.adapter, inp) + h


# ---------------------------------------------------------------------------------------------
# AdapterFusion


class AdapterFusion(_AtSite):
    """Attention over N frozen Pfeiffer adapters at one site (Pfeiffer et al. 2021, stage 2).

    With z the layer's output at the site (the adapters' common input) and ``a_n(z)`` each adapter's
    output: ``s = softmax_n((z Q) . (a_n(z) K))``, ``o = sum_n s_n a_n(z) V``, and o takes the place of
    the single adapter's output. Q, K start as normal(0, 0.02), V as the identity (``adapters``'
    "dynamic" fusion). Only Q, K, V train; ``regularization()`` is the paper's pull of V towards the
    identity, which :func:`pefttutor.train.train` adds to the loss. Build it with :func:`fuse`."""

    sites = PfeifferAdapter.sites
    frozen = ("adapters.",)

    def __init__(self, base: nn.Module, names=("a", "b"), bottleneck: int | None = None, activation: str = "relu",
                 scaling: float = 1.0, dropout: float = 0.0):
        who = "AdapterFusion "
        site, d = self._init_site(base)
        if not (isinstance(names, (list, tuple)) and len(names) >= 1 and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names)):
            raise ValueError(f"{who}names={names!r} must be a list of distinct adapter names")
        m, activation = _check_bottleneck(who, d, bottleneck, 16, activation, scaling, "mam")
        dropout = checks.real("dropout", dropout, low=0, high=1, high_open=True, who=who)
        super().__init__(base)
        self.site, self.d_model, self.bottleneck, self.active = site, d, m, True
        kw = dict(dtype=self.adapter_dtype(), device=self.base_device())
        self.adapters = nn.ModuleDict({n: Bottleneck(d, m, activation, float(scaling), **kw) for n in names})
        self.adapters.requires_grad_(False)
        self.query, self.key = nn.Linear(d, d, **kw), nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, bias=False, **kw)
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.normal_(0.0, 0.02), lin.bias.zero_()
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(dropout)
        self.last_attention = None          # (batch, seq, N) of the last forward, for plots

    def fused(self, z: torch.Tensor) -> torch.Tensor:
        ups = torch.stack([a(z) for a in self.adapters.values()], dim=2)         # (B, T, N, d)
        q, k, v = self.query(z), self.key(ups), self.value(ups)                 # (B, T, d), (B, T, N, d) x2
        scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)   # (B, T, N)
        probs = torch.softmax(self.dropout(scores), dim=-1)
        self.last_attention = probs.detach()
        return torch.matmul(probs.unsqueeze(2), v).squeeze(2)                   # (B, T, d)

    def post_ln(self, h, x, ln):
        return ln(self._run(self.fused, ln(h + x)) + h + x)

    def pre_ln(self, y, inp):
        return self._run(self.fused, y) + y

    def regularization(self) -> torch.Tensor:
        """``0.01 * ||I - V||^2``, as ``adapters`` adds while V trains."""
        eye = torch.eye(self.d_model, dtype=self.value.weight.dtype, device=self.value.weight.device)
        return 0.01 * (eye - self.value.weight).pow(2).sum()

    def extra_repr(self) -> str:
        return f"site={self.site}, d_model={self.d_model}, adapters={list(self.adapters)}, active={self.active}"


def _read_adapter(path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config") or "[]")
    if len(config) != 1 or config[0]["layer"] != "PfeifferAdapter":
        kinds = [c["layer"] for c in config] or ["nothing pefttutor wrote"]
        raise ValueError(f"fuse: {path} holds {kinds}; AdapterFusion combines single PfeifferAdapter "
                         f"files, each saved with save_adapter after inject(model, PfeifferAdapter, 'auto')")
    return meta.get("model", "?"), config[0], load_file(str(path))


def fuse(model: nn.Module, sources: dict, *, dropout: float = 0.0, modules_to_save=()) -> nn.Module:
    """AdapterFusion, stage 2: put the Pfeiffer adapters saved at ``sources`` (``{name: path}``, each
    from ``save_adapter``) side by side at every site, frozen, with a fusion layer that learns to
    combine them. The adapters must share their sites and sizes and fit this model; on any error the
    model is left as it was."""
    if not isinstance(sources, dict) or len(sources) < 2:
        raise ValueError(f"fuse needs at least two adapters as {{name: path}}, got {sources!r}")
    if any(isinstance(m, _AtSite) for m in model.modules()):
        raise ValueError("fuse: the model already carries adapters; fuse into the plain base model")
    read = {name: _read_adapter(path) for name, path in sources.items()}
    first_name, (origin, config, _) = next(iter(read.items()))
    for name, (o, c, _) in read.items():
        if sorted(c["targets"]) != sorted(config["targets"]) or _resolved(c) != _resolved(config):
            raise ValueError(f"fuse: adapters {first_name!r} and {name!r} differ ({origin} {_resolved(config)} "
                             f"at {len(config['targets'])} sites vs {o} {_resolved(c)} at {len(c['targets'])}). "
                             f"Fusion needs adapters of one size at the same sites: train each source with "
                             f"the same inject(model, PfeifferAdapter, ...) arguments")
    modules = dict(model.named_modules())
    missing = [t for t in config["targets"] if site_of(modules.get(t, nn.Identity())) not in AdapterFusion.sites]
    d = {t: hidden_size(modules[t]) for t in config["targets"] if t not in missing}
    shapes = {t: tuple(read[first_name][2][f"{t}.adapter.down.weight"].shape) for t in d}
    wrong = [f"{t}: adapter reads {s[1]}, model has d_model {d[t]}" for t, s in shapes.items() if s[1] != d[t]]
    if missing or wrong:
        raise ValueError(f"fuse: the adapters were trained for another model ({origin}): "
                         f"{'sites ' + str(missing[:3]) + ' do not exist here; ' if missing else ''}{'; '.join(wrong[:3])}. "
                         f"Fuse them into the base model they were trained on.")
    hp = _resolved(config)
    with atomic(model):
        pattern = "|".join(re.escape(t) for t in config["targets"])
        inject(model, AdapterFusion, pattern, modules_to_save=modules_to_save, names=list(sources),
               bottleneck=shapes[config["targets"][0]][0], activation=hp["activation"],
               scaling=hp["scaling"], dropout=dropout)
        with torch.no_grad():
            for name, (_, _, tensors) in read.items():
                for t in config["targets"]:
                    fusion = model.get_submodule(t)
                    for key, value in fusion.adapters[name].state_dict().items():
                        value.copy_(tensors[f"{t}.adapter.{key}"])
    return model


def _resolved(config) -> dict:
    hp = {"bottleneck": None, "activation": "relu", "scaling": 1.0, **config["hparams"]}
    return {k: hp[k] for k in ("bottleneck", "activation", "scaling")}


def fusions(model: nn.Module) -> dict[str, AdapterFusion]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterFusion)}


def prune_fusion(model: nn.Module, keep) -> nn.Module:
    """AdapterDrop's pruning of a fusion: keep only the adapters named in ``keep`` at every fusion
    layer (the rest are deleted, with their cost)."""
    layers = fusions(model)
    if not layers:
        raise ValueError("prune_fusion: the model has no AdapterFusion; build one with fuse(model, {...})")
    have = list(next(iter(layers.values())).adapters)
    if not (isinstance(keep, (list, tuple)) and keep and set(keep) <= set(have)):
        raise ValueError(f"prune_fusion: keep={keep!r} must name at least one of the fused adapters {have}")
    for layer in layers.values():
        for name in [n for n in layer.adapters if n not in keep]:
            del layer.adapters[name]
    for cfg in getattr(model, "pefttutor_config", []):
        if cfg["layer"] == "AdapterFusion":
            cfg["hparams"]["names"] = [n for n in cfg["hparams"]["names"] if n in keep]
    return model


# ---------------------------------------------------------------------------------------------
# Weights from AdapterHub


def _projection(rest: str, key: str) -> str:
    for theirs, ours in (("adapter_down.0.", "down."), ("adapter_up.", "up.")):
        if rest.startswith(theirs):
            return ours + rest[len(theirs):]
    raise ValueError(f"from_adapterhub: {key} is not a bottleneck adapter's down or up projection (layer "
                     f"norms, gates and PHM layers inside an adapter have no counterpart here)")


def from_adapterhub(model: nn.Module, tensors: dict) -> dict[str, torch.Tensor]:
    """Rename the tensors of AdapterHub bottleneck adapters and fusions (``model.state_dict()`` of an
    ``adapters`` model, or a saved adapter) to pefttutor's names in ``model``, which must carry the
    same placement (``inject(model, PfeifferAdapter, "auto", bottleneck=...)`` for ``SeqBnConfig``, or
    ``fuse``/``AdapterFusion`` for ``Fuse``). Load the result with ``model.load_state_dict(out,
    strict=False)``. Tensors that are not adapters' are left out."""
    sites = {n: m for n, m in model.named_modules() if isinstance(m, _AtSite)}
    out = {}
    for key, value in tensors.items():
        hooked = re.fullmatch(r"((?:.*\.)?\d+)\.(attention|output)_adapters\.(.*)", key)   # Llama, GPT-2
        if hooked:
            layer, where, rest = hooked.groups()
            kinds = ("attention",) if where == "attention" else ("ffn", "layer")
            site = next((n for n, m in sites.items()
                         if (n == layer or n.startswith(layer + ".")) and m.site in kinds), None)
        else:                                                                           # BERT, RoBERTa
            found = re.fullmatch(r"(.*?)\.((?:adapters|adapter_fusion_layer)\..*)", key)
            if not found:
                continue
            site, rest = found.groups()
        if site not in sites:
            raise ValueError(f"from_adapterhub: {key} has no place in this {type(model).__name__}; its adapters "
                             f"sit at {list(sites)[:4]}. Inject the placement the AdapterHub model used first.")
        module = sites[site]
        if rest.startswith("adapter_fusion_layer."):
            out[f"{site}.{rest.split('.', 2)[2]}"] = value                             # query, key, value
            continue
        _, name, proj = rest.split(".", 2)
        inner = f"adapters.{name}." if isinstance(module, AdapterFusion) else "adapter."
        out[f"{site}.{inner}{_projection(proj, key)}"] = value
    return out


# ---------------------------------------------------------------------------------------------
# AdapterDrop


def _droppable(model) -> dict[str, _AtSite]:
    out = {n: m for n, m in model.named_modules() if isinstance(m, _AtSite)}
    if not out:
        raise ValueError("the model has no adapters to drop: inject HoulsbyAdapter, PfeifferAdapter, "
                         "ParallelAdapter or fuse(...) first")
    return out


def drop_adapters(model: nn.Module, n_layers: int) -> list[str]:
    """AdapterDrop: switch off the adapters (and fusions) of the lowest ``n_layers`` layers; the
    others run as before. ``n_layers=0`` switches every adapter back on. Returns the names dropped.

    Below the lowest active adapter nothing trains, so the backward pass stops there, and at inference
    those layers compute exactly what the base model computes (shareable between tasks)."""
    layers = _droppable(model)
    depth = 1 + max((layer_index(n) or 0) for n in layers)
    n_layers = checks.integer("n_layers", n_layers, low=0, high=depth, who="drop_adapters ")
    for name, m in layers.items():
        m.active = (layer_index(name) or 0) >= n_layers
    return [n for n, m in layers.items() if not m.active]


class RobustAdapterDrop:
    """Robust AdapterDrop: while the model trains, each forward drops the adapters of the lowest n
    layers, n drawn uniformly from 0..``max_layers``; afterwards (and in eval mode) the fixed choice
    ``n_eval`` holds. ``remove()`` takes the hooks off. ::

        drop = RobustAdapterDrop(model, max_layers=2)
        train(model, ...)
        drop.remove()
    """

    def __init__(self, model: nn.Module, max_layers: int, seed: int = 0, n_eval: int = 0):
        layers = _droppable(model)
        depth = 1 + max((layer_index(n) or 0) for n in layers)
        self.max_layers = checks.integer("max_layers", max_layers, low=0, high=depth, who="RobustAdapterDrop ")
        self.n_eval = checks.integer("n_eval", n_eval, low=0, high=depth, who="RobustAdapterDrop ")
        self.rng, self.model = random.Random(checks.integer("seed", seed, who="RobustAdapterDrop ")), model
        self.drawn: list[int] = []
        self.handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]
        drop_adapters(model, self.n_eval)

    def _before(self, module, args):
        if module.training:
            self.drawn.append(self.rng.randint(0, self.max_layers))
            drop_adapters(module, self.drawn[-1])

    def _after(self, module, args, output):
        drop_adapters(module, self.n_eval)

    def remove(self):
        for h in self.handles:
            h.remove()
        drop_adapters(self.model, 0)
