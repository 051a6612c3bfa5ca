"""The core every method uses: wrap a model's linear layers, freeze the rest, count, merge, save, load.

Defined in the chapter "LoRA" (book/lora.ipynb), where the injector is built step by step.

Every operation here that changes a model is atomic: it checks everything it can first, records the
model's structure before it changes it, and on any error puts the model back exactly as it was.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import checks

try:                                    # GPT-2 stores its projections as Conv1D: y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:                     # pragma: no cover - transformers is a dependency
    Conv1D = ()

HEADS = ("lm_head", "classifier", "score", "pooler")
_MODEL_ATTRS = ("pefttutor_config", "pefttutor_modules_to_save", "pefttutor_prompt")


def is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight is stored quantized (``pefttutor.quant.NF4Linear``)."""
    return getattr(module, "is_quantized_linear", False)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or is_quantized(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear``, a GPT-2 ``Conv1D`` (stored transposed) or a
    quantized linear layer."""
    if is_quantized(module):
        return module.out_features, module.in_features
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


class AdapterModule(nn.Module):
    """Whatever the injector wraps: a frozen ``base`` module plus the adapter's own parameters.

    ``inject`` finds targets with the class's ``find_targets``; ``save_adapter`` stores every tensor
    of an adapter module except its base's. Modules that cannot fold into the base weight (an adapter
    beside a whole nonlinear block) set ``mergeable = False``. A subclass checks its hyperparameters
    before calling ``super().__init__(base)``, which freezes the base: a refused layer changes nothing.
    """

    mergeable = True
    frozen: tuple[str, ...] = ()        # child prefixes that are saved with the adapter but do not train

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.merged = False

    @classmethod
    def find_targets(cls, model: nn.Module, targets) -> list[str]:
        return find_targets(model, targets)

    def _base_tensor(self) -> torch.Tensor:
        return next(iter([*self.base.parameters(), *self.base.buffers()]))

    def adapter_dtype(self) -> torch.dtype:
        """Adapter weights train in fp32 when the base is stored in 16 or 4 bits (as peft does)."""
        dtype = self._base_tensor().dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def base_device(self) -> torch.device:
        return self._base_tensor().device

    def attach(self, model: nn.Module, name: str) -> None:
        """Called by ``inject`` once the layer sits at ``name`` in ``model``, inside the same atomic
        change: a method that works on the whole model's inputs (a soft prompt) registers its hook
        here. Most layers need nothing."""

    def check_mergeable(self):
        """Raise the error ``merge`` would raise, without changing anything."""
        raise ValueError(f"{type(self).__name__} cannot be merged: it is not an update of one weight "
                         f"matrix. Keep it unmerged (it costs one small extra branch at inference).")

    def merge(self):
        self.check_mergeable()

    def unmerge(self):
        return self


class AdapterLayer(AdapterModule):
    """The weight-space layer protocol: ``y = base(x) + x @ delta_weight().T``.

    A subclass defines ``delta_weight()`` and, where the method can skip building ΔW, a faster
    ``adapter_forward(x)``. Merging folds ΔW into the frozen base weight, so a merged layer costs
    exactly what the base costs.
    """

    def __init__(self, base: nn.Module):
        shape = self.shape_of(base)             # checked before super().__init__ freezes the base
        super().__init__(base)
        self.out_features, self.in_features = shape

    @classmethod
    def shape_of(cls, base: nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of the layer to wrap; a TypeError if it is not a linear layer."""
        if not is_linear(base):
            raise TypeError(f"{cls.__name__} wraps nn.Linear or transformers' Conv1D, "
                            f"got {type(base).__name__}")
        return linear_shape(base)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code that reads ``layer.weight`` (T5 checks
        ``self.wo.weight.dtype``) sees the layer it wraps, as with peft's layers."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.adapter_dtype()), self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    def check_mergeable(self):
        if is_quantized(self.base):
            raise ValueError(f"cannot merge {type(self).__name__} into a 4-bit base weight (adding ΔW "
                             f"and rounding again to 4 bits would lose most of ΔW). Call "
                             f"pefttutor.quant.dequantize_model(model) first, then merge.")

    @torch.no_grad()
    def _add_to_base(self, sign: float):
        W = self.base.weight
        dW = self.delta_weight().to(W.dtype)
        W.add_(dW.T if isinstance(self.base, Conv1D) else dW, alpha=sign)

    def merge(self):
        if not self.merged:
            self.check_mergeable()
            self._add_to_base(1.0)
            self.merged = True
        return self

    def unmerge(self):
        if self.merged:
            self._add_to_base(-1.0)
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------
# Changing a model atomically


def set_submodule(model: nn.Module, name: str, module):
    """Put ``module`` (or a parameter) at the dotted ``name`` (``"model.layers.0.mlp"``) in ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class Changes:
    """An undo log: what an operation may change, so that an error can restore the model exactly.

    On creation it records every module's children and parameters (so swaps made by nested
    operations, such as the ``inject`` inside ``load_adapter``, are covered too), every parameter's
    ``requires_grad`` and the model's pefttutor attributes."""

    def __init__(self, model: nn.Module):
        self.model = model
        modules = list(model.modules())
        self.children = [(m, name, child) for m in modules for name, child in m._modules.items()]
        self.params = [(m, name, p) for m in modules for name, p in m._parameters.items()]
        self.flags = [(p, p.requires_grad) for _, _, p in self.params if p is not None]
        self.attrs = {a: getattr(model, a) for a in _MODEL_ATTRS if hasattr(model, a)}
        self.hooks = {h: dict(getattr(model, h)) for h in _HOOK_DICTS}

    def replace(self, name: str, new):
        """Swap the submodule (or a module's parameter, ``"lm_head.weight"``) at ``name`` for ``new``."""
        set_submodule(self.model, name, new)

    def undo(self):
        for m, name, child in self.children:
            m._modules[name] = child
        for m, name, p in self.params:
            m._parameters[name] = p
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for a in _MODEL_ATTRS:
            if a in self.attrs:
                setattr(self.model, a, self.attrs[a])
            elif hasattr(self.model, a):
                delattr(self.model, a)
        for h, saved in self.hooks.items():
            getattr(self.model, h).clear()
            getattr(self.model, h).update(saved)


@contextlib.contextmanager
def atomic(model: nn.Module):
    """``with atomic(model) as changes:`` runs an operation that either completes or, on any error,
    leaves ``model`` as it was: its modules, parameters, ``requires_grad`` flags and pefttutor
    attributes (the values of tensors are not copied: operations change them only after their checks)."""
    changes = Changes(model)
    try:
        yield changes
    except BaseException:
        changes.undo()
        raise


# ---------------------------------------------------------------------------------------------
# Finding modules


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's linear modules (adapter-wrapped bases excluded)."""
    return [n for n, m in model.named_modules() if is_linear(m) and not n.endswith(".base")]


def _no_match_message(model, targets) -> str:
    names = linear_names(model)
    suffixes = sorted({n.split(".")[-1] for n in names})
    return (f"no linear module of {type(model).__name__} matches targets={targets!r}. "
            f"Targets are name suffixes such as {suffixes[:2]} or one regular expression matched "
            f"against the whole name. This model's linear modules end in {suffixes}; "
            f"for example {names[:3]}.")


def check_targets(targets):
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({err}); "
                             f"pass a list of module-name suffixes instead, e.g. ['q_proj', 'v_proj']") from None
        return
    if not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)):
        raise TypeError(f"targets must be a list of module-name suffixes or a regular expression, "
                        f"got {targets!r}")


def refuse_adapted(model: nn.Module, names: list[str], targets):
    """A layer takes one adapter: raise if ``targets`` select layers that already carry one."""
    if names:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in names})
        raise ValueError(f"targets={targets!r} select {len(names)} layer(s) that already carry an adapter "
                         f"({', '.join(kinds)}), e.g. {names[:3]}. A layer takes one adapter: choose other "
                         f"targets, or unload(model) first.")


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear modules ``targets`` selects: a list of name suffixes, a regular
    expression (matched against the whole qualified name), or ``"all-linear"`` (every linear
    layer but the output and classification heads). Layers that already carry an adapter are an error."""
    check_targets(targets)
    if targets == "all-linear":
        def select(names):
            return [n for n in names if not set(n.split(".")) & set(HEADS)]
    else:
        def select(names):
            return [n for n in names if _matches(n, targets)]
    adapted = [n for n, m in adapter_layers(model).items() if is_linear(m.base)]
    refuse_adapted(model, select(adapted), targets)
    found = select(linear_names(model))
    if not found:
        raise ValueError(_no_match_message(model, targets))
    return found


def adapter_layers(model: nn.Module) -> dict[str, AdapterModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterModule)}


# ---------------------------------------------------------------------------------------------
# Injecting and freezing


def _hparam_names(layer_cls) -> list[str] | None:
    """The keyword hyperparameters ``layer_cls(base, **hparams)`` accepts (None: any)."""
    params = list(inspect.signature(layer_cls.__init__).parameters.values())[2:]      # self, base
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_hparams(layer_cls, hparams: dict):
    known = _hparam_names(layer_cls)
    unknown = sorted(set(hparams) - set(known)) if known is not None else []
    if unknown:
        raise TypeError(f"{layer_cls.__name__} has no hyperparameter {unknown[0]!r}; its hyperparameters "
                        f"are {known}")
    try:
        json.dumps(hparams)
    except TypeError:
        raise TypeError(f"hyperparameters {hparams!r} must be plain values (numbers, strings, booleans, "
                        f"lists), so that save_adapter can record them with the weights") from None


def resolved_hparams(layer_cls, hparams: dict) -> dict:
    """Every hyperparameter of ``layer_cls``, defaults filled in, as JSON would store it."""
    params = list(inspect.signature(layer_cls.__init__).parameters.values())[2:]
    full = {p.name: p.default for p in params if p.default is not p.empty}
    return json.loads(json.dumps({**full, **hparams}))


def _is_kept(module_name: str, keep) -> bool:
    return any(f".{s}." in f".{module_name}." for s in keep)


def _untie_kept(model: nn.Module, keep, changes: Changes):
    """A kept module (``modules_to_save``) whose weight is shared with a module that is not kept (a
    language-model head tied to the input embeddings) gets its own trainable copy, as in peft: the
    head trains, the embeddings stay frozen, and the adapter file stores the copy."""
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        others = [o for o in owners[id(p)] if not _is_kept(o.rpartition(".")[0], keep)]
        if _is_kept(name.rpartition(".")[0], keep) and others:
            warnings.warn(f"modules_to_save: {name} is tied to {others[0]}. {name} now trains its own "
                          f"copy (as in peft); {others[0]} stays frozen, and save_adapter stores the copy.",
                          stacklevel=3)
            changes.replace(name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            owners[id(p)] = others


def inject(model: nn.Module, layer_cls, targets, *, modules_to_save=(), **hparams) -> nn.Module:
    """Replace the linear modules that ``targets`` selects by ``layer_cls(module, **hparams)``.

    Everything but the adapters' own parameters is frozen; ``modules_to_save`` (name suffixes, such
    as ``["classifier"]``) stay trainable and are saved with the adapter, like peft's option of the
    same name. Returns the model, changed in place; on any error the model is left as it was.
    """
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, AdapterModule)):
        raise TypeError(f"layer_cls must be an adapter class such as LoRALinear, got {layer_cls!r}")
    modules_to_save = checks.names("modules_to_save", modules_to_save)
    _check_hparams(layer_cls, hparams)
    module_names = {n.split(".")[-1] for n, _ in model.named_modules() if n}
    for suffix in modules_to_save:
        if not any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules()):
            raise ValueError(f"modules_to_save: no module named {suffix!r} in {type(model).__name__}; "
                             f"module names include {sorted(module_names)[:40]}")
    names = layer_cls.find_targets(model, targets)
    with atomic(model) as changes:
        layers = {name: layer_cls(model.get_submodule(name), **hparams) for name in names}
        for name, layer in layers.items():
            changes.replace(name, layer.train(layer.base.training))     # an eval model stays in eval mode
        for name, layer in layers.items():
            layer.attach(model, name)
        keep = sorted(set(getattr(model, "pefttutor_modules_to_save", [])) | set(modules_to_save))
        _untie_kept(model, keep, changes)
        model.pefttutor_modules_to_save = keep
        derived = {k: v for layer in layers.values() for k, v in getattr(layer, "derived", {}).items()}
        config = {"layer": layer_cls.__name__, "targets": names, "hparams": {**hparams, **derived}}
        model.pefttutor_config = list(getattr(model, "pefttutor_config", [])) + [config]
        _set_trainable(model)
    return model


def _kept(model, key: str) -> bool:
    """Is the tensor ``key`` inside a module kept trainable (``modules_to_save``)?"""
    return _is_kept(key.rpartition(".")[0], getattr(model, "pefttutor_modules_to_save", []))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a saved adapter holds: adapter layers' own (not their base) and kept modules'."""
    state = model.state_dict()
    layers = adapter_layers(model)
    out = {}
    for key, value in state.items():
        owner = max((n for n in layers if key.startswith(n + ".")), key=len, default=None)
        if owner is not None and not key[len(owner) + 1:].startswith("base."):
            out[key] = value
        elif _kept(model, key):
            out[key] = value
    return out


def _set_trainable(model: nn.Module):
    train = set(adapter_state(model))
    for name, layer in adapter_layers(model).items():
        train -= {k for k in train for prefix in layer.frozen if k.startswith(f"{name}.{prefix}")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")

    __repr__ = __str__


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (each shared tensor counted once). A quantized layer's
    weight is a buffer of packed codes, not a parameter; it counts as the ``out * in`` weights it
    stands for, so the total is the model's parameter count whatever its storage."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))
    return ParameterCount(trainable, total)


# ---------------------------------------------------------------------------------------------
# Merging


def _check_mergeable(model: nn.Module, what: str):
    layers = adapter_layers(model)
    fixed = [n for n, m in layers.items() if not m.mergeable]
    if fixed:
        try:
            layers[fixed[0]].check_mergeable()
            reason = ""
        except ValueError as err:
            reason = f" {err}"
        raise ValueError(f"cannot {what}: {type(layers[fixed[0]]).__name__} at {fixed[:3]} "
                         f"is not a weight update and cannot be folded into the base model. Merge "
                         f"only models whose adapters are all weight-space layers (LoRA, KronA, FedPara)."
                         f"{reason}")
    for layer in layers.values():
        if not layer.merged:
            layer.check_mergeable()


def _merge_all(layers):
    """Merge each layer; should one fail after the checks, unmerge those already merged."""
    done = []
    try:
        for layer in layers:
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def merge(model: nn.Module) -> nn.Module:
    _check_mergeable(model, "merge")
    _merge_all(adapter_layers(model).values())
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base and put the plain layers back: an ordinary model again."""
    _check_mergeable(model, "unload")
    layers = adapter_layers(model)
    _merge_all(layers.values())
    for name, layer in layers.items():
        set_submodule(model, name, layer.base)
    for attr in _MODEL_ATTRS:
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_adapter(model: nn.Module, path) -> None:
    """Write only the adapter (and kept-trainable) tensors to a safetensors file."""
    from safetensors.torch import save_file
    state = adapter_state(model)
    if not state:
        raise ValueError("the model has no adapter: call inject(...) before save_adapter(...)")
    meta = {"format": "pefttutor", "model": type(model).__name__,
            "config": json.dumps(getattr(model, "pefttutor_config", [])),
            "modules_to_save": json.dumps(getattr(model, "pefttutor_modules_to_save", []))}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def _config_differences(saved: list, current: list) -> list[str]:
    """What differs between the injections recorded in an adapter file and those of a model."""
    import pefttutor
    if len(saved) != len(current):
        return [f"the file records {len(saved)} inject call(s), the model {len(current)}"]
    out = []
    for s, c in zip(saved, current):
        if s["layer"] != c["layer"]:
            out.append(f"layer: file {s['layer']} vs model {c['layer']}")
            continue
        layer_cls = getattr(pefttutor, s["layer"], None)
        if layer_cls is not None:
            hs, hc = resolved_hparams(layer_cls, s["hparams"]), resolved_hparams(layer_cls, c["hparams"])
            out += [f"{s['layer']} {k}: file {hs.get(k)!r} vs model {hc.get(k)!r}"
                    for k in sorted(set(hs) | set(hc)) if hs.get(k) != hc.get(k)]
        if sorted(s["targets"]) != sorted(c["targets"]):
            out.append(f"{s['layer']} targets: file {s['targets'][:3]}... vs model {c['targets'][:3]}...")
    return out


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a saved adapter into ``model``; inject it first if the model has none.

    Keys, shapes and the recorded hyperparameters (scale, alpha, rsLoRA, ...) must match exactly: a
    clear ``ValueError`` says what differs, rather than loading part of an adapter into the wrong
    layers or computing with another scaling. On any error the model is left as it was.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    saved = load_file(str(path))
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("the model's adapters are merged: call unmerge(model) before load_adapter")
    saved_config = json.loads(meta["config"]) if meta.get("config") else None
    origin = f"saved from a {meta.get('model', '?')} with {meta.get('config', '?')}"
    with atomic(model):
        if not adapter_layers(model) and saved_config:
            _inject_from_config(model, saved_config, json.loads(meta.get("modules_to_save", "[]")))
        expected = adapter_state(model)
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        shapes = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(saved) & set(expected)) if saved[k].shape != expected[k].shape]
        differ = _config_differences(saved_config, getattr(model, "pefttutor_config", [])) if saved_config else []
        if missing or unexpected or shapes:
            fusion = any(c["layer"] == "AdapterFusion" for c in saved_config or []) and any(
                ".adapters." in k for k in missing)
            raise ValueError(
                (f"the fusion file {path} lacks the weights of the adapters it fuses: save a fused model with "
                 f"save_adapter (it stores them), or rebuild the fusion with fuse(model, {{name: path}}). "
                 if fusion else "") +
                f"adapter file {path} does not fit this {type(model).__name__} ({origin}). "
                f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
                f"shape mismatches: {shapes[:5]}. "
                + (f"The file records: {'; '.join(differ[:5])}. " if differ else "")
                + "Load it into the same base model, injected with the same targets and hyperparameters.")
        if differ:
            raise ValueError(f"adapter file {path} was made with other hyperparameters than this model's "
                             f"adapters: {'; '.join(differ[:5])}. The tensors fit, but the model would compute "
                             f"with its own values. Load it into a model without adapters (load_adapter injects "
                             f"them as recorded), or inject with the same hyperparameters.")
        with torch.no_grad():
            for key, value in saved.items():
                expected[key].copy_(value)
    return model


def _inject_from_config(model, configs, modules_to_save):
    import pefttutor
    modules = dict(model.named_modules())
    for i, cfg in enumerate(configs):
        layer_cls = getattr(pefttutor, cfg["layer"], None)
        if layer_cls is None:
            raise ValueError(f"the adapter file uses layer {cfg['layer']!r}, which pefttutor does not export")
        missing = [n for n in cfg["targets"] if n not in modules]
        if missing:
            raise ValueError(f"the adapter file was made for a model with modules {missing[:3]}, which this "
                             f"{type(model).__name__} does not have: load it into the model it was trained on")
        pattern = "|".join(re.escape(n) for n in cfg["targets"])
        inject(model, layer_cls, pattern, modules_to_save=modules_to_save if i == 0 else (),
               **cfg["hparams"])
