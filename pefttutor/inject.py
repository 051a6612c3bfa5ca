"""The core every method uses: wrap a model's linear layers, freeze the rest, count, merge, save, load.

Defined in the chapter "LoRA" (book/lora.ipynb), where the injector is built step by step.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

try:                                    # GPT-2 stores its projections as Conv1D: y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:                     # pragma: no cover - transformers is a dependency
    Conv1D = ()

HEADS = ("lm_head", "classifier", "score", "pooler")


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
    beside a whole nonlinear block) set ``mergeable = False``.
    """

    mergeable = True

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

    def merge(self):
        raise ValueError(f"{type(self).__name__} cannot be merged: it is not an update of one weight "
                         f"matrix. Keep it unmerged (it costs one small extra branch at inference).")

    def unmerge(self):
        return self


class AdapterLayer(AdapterModule):
    """The weight-space layer protocol: ``y = base(x) + x @ delta_weight().T``.

    A subclass defines ``delta_weight()`` and, where the method can skip building ΔW, a faster
    ``adapter_forward(x)``. Merging folds ΔW into the frozen base weight, so a merged layer costs
    exactly what the base costs.
    """

    def __init__(self, base: nn.Module):
        if not is_linear(base):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or transformers' Conv1D, "
                            f"got {type(base).__name__}")
        super().__init__(base)
        self.out_features, self.in_features = linear_shape(base)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.adapter_dtype()), self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def _add_to_base(self, sign: float):
        if is_quantized(self.base):
            raise ValueError(f"cannot merge {type(self).__name__} into a 4-bit base weight (adding ΔW "
                             f"and rounding again to 4 bits would lose most of ΔW). Call "
                             f"pefttutor.quant.dequantize_model(model) first, then merge.")
        W = self.base.weight
        dW = self.delta_weight().to(W.dtype)
        W.add_(dW.T if isinstance(self.base, Conv1D) else dW, alpha=sign)

    def merge(self):
        if not self.merged:
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


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear modules ``targets`` selects: a list of name suffixes, a regular
    expression (matched against the whole qualified name), or ``"all-linear"`` (every linear
    layer but the output and classification heads)."""
    if isinstance(targets, str) and targets == "all-linear":
        found = [n for n in linear_names(model) if not set(n.split(".")) & set(HEADS)]
    elif isinstance(targets, str) or (isinstance(targets, (list, tuple)) and targets
                                      and all(isinstance(t, str) for t in targets)):
        found = [n for n in linear_names(model) if _matches(n, targets)]
    else:
        raise TypeError(f"targets must be a list of module-name suffixes or a regular expression, "
                        f"got {targets!r}")
    if not found:
        raise ValueError(_no_match_message(model, targets))
    return found


def adapter_layers(model: nn.Module) -> dict[str, AdapterModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterModule)}


# ---------------------------------------------------------------------------------------------
# Injecting and freezing


def inject(model: nn.Module, layer_cls, targets, *, modules_to_save=(), **hparams) -> nn.Module:
    """Replace the linear modules that ``targets`` selects by ``layer_cls(module, **hparams)``.

    Everything but the adapters' own parameters is frozen; ``modules_to_save`` (name suffixes, such
    as ``["classifier"]``) stay trainable and are saved with the adapter, like peft's option of the
    same name. Returns the model, changed in place.
    """
    wrapped = set(adapter_layers(model))
    names = [n for n in layer_cls.find_targets(model, targets) if n not in wrapped]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), **hparams))
    keep = list(getattr(model, "pefttutor_modules_to_save", []))
    for suffix in modules_to_save:
        if not any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules()):
            children = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            raise ValueError(f"modules_to_save: no module named {suffix!r} in {type(model).__name__}; "
                             f"module names include {children[:40]}")
        keep.append(suffix)
    model.pefttutor_modules_to_save = sorted(set(keep))
    config = {"layer": layer_cls.__name__, "targets": names, "hparams": hparams}
    model.pefttutor_config = list(getattr(model, "pefttutor_config", [])) + [config]
    _set_trainable(model)
    return model


def _kept(model, key: str) -> bool:
    """Is the tensor ``key`` inside a module kept trainable (``modules_to_save``)?"""
    return any(f".{s}." in f".{key}" for s in getattr(model, "pefttutor_modules_to_save", []))


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
    """Trainable and total parameter counts (each shared tensor counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)


# ---------------------------------------------------------------------------------------------
# Merging


def _check_mergeable(model: nn.Module, what: str):
    layers = adapter_layers(model)
    fixed = [n for n, m in layers.items() if not m.mergeable]
    if fixed:
        raise ValueError(f"cannot {what}: {type(layers[fixed[0]]).__name__} at {fixed[:3]} "
                         f"is not a weight update and cannot be folded into the base model. Merge "
                         f"only models whose adapters are all weight-space layers (LoRA, KronA, FedPara).")


def merge(model: nn.Module) -> nn.Module:
    _check_mergeable(model, "merge")
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base and put the plain layers back: an ordinary model again."""
    _check_mergeable(model, "unload")
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    for attr in ("pefttutor_config", "pefttutor_modules_to_save"):
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


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a saved adapter into ``model``; inject it first if the model has none.

    Keys and shapes must match exactly: a clear ``ValueError`` says what differs, rather than
    loading part of an adapter into the wrong layers.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    saved = load_file(str(path))
    if not adapter_layers(model) and meta.get("config"):
        _inject_from_config(model, json.loads(meta["config"]), json.loads(meta.get("modules_to_save", "[]")))
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("the model's adapters are merged: call unmerge(model) before load_adapter")
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(saved) & set(expected)) if saved[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        origin = f"saved from a {meta.get('model', '?')} with {meta.get('config', '?')}"
        raise ValueError(
            f"adapter file {path} does not fit this {type(model).__name__} ({origin}). "
            f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
            f"shape mismatches: {shapes[:5]}. Load it into the same base model, injected with the "
            f"same targets and hyperparameters.")
    with torch.no_grad():
        for key, value in saved.items():
            expected[key].copy_(value)
    return model


def _inject_from_config(model, configs, modules_to_save):
    import pefttutor
    for i, cfg in enumerate(configs):
        layer_cls = getattr(pefttutor, cfg["layer"], None)
        if layer_cls is None:
            raise ValueError(f"the adapter file uses layer {cfg['layer']!r}, which pefttutor does not export")
        names = cfg["targets"]
        pattern = "|".join(re.escape(n) for n in names)
        inject(model, layer_cls, pattern, modules_to_save=modules_to_save if i == 0 else (),
               **cfg["hparams"])
