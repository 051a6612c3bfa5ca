"""Where the memory of fine-tuning goes: measured exactly, and predicted with an analytic model.

Defined in the chapter "Memory" (book/memory.ipynb). Four terms: weights (any dtype, NF4 included),
gradients of the trainable parameters, optimizer state, and activations saved for backward.
``measure`` walks the tensors of one real training step; ``predict`` computes the same four terms
from a Llama-style configuration (built on the meta device, so a 65B model costs no memory).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from . import checks
from .inject import find_targets, linear_shape
from .quant.nf4 import bits_per_parameter

MB = 2 ** 20


@dataclass
class MemoryBreakdown:
    """Bytes of each term of training memory."""
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self, unit: float = 1) -> dict:
        out = {f.name: getattr(self, f.name) / unit for f in fields(self)}
        return {**out, "total": self.total / unit}

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:,.2f} MB" for k, v in self.as_dict(MB).items())


# ---------------------------------------------------------------------------------------------
# Measuring


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer):
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                yield value


@contextlib.contextmanager
def saved_activations(model: nn.Module):
    """Record the tensors autograd saves for backward (parameters and buffers excluded): yields a
    dict storage -> bytes, filled while the block runs."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def default_loss(model, batch):
    return model(**batch).loss


def measure(model: nn.Module, batch: dict, optimizer=None, loss_fn=default_loss) -> MemoryBreakdown:
    """One training step (forward, backward, ``optimizer.step()`` if given), with every term counted
    by walking tensors: exact on any device. The activation term is what autograd holds at the end of
    the forward pass, when saved tensors peak."""
    weights = storage_bytes([*model.parameters(), *model.buffers()])
    with saved_activations(model) as saved:
        loss = loss_fn(model, batch)
    activations = sum(saved.values())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    grads = storage_bytes(p.grad for p in model.parameters())
    state = storage_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0
    return MemoryBreakdown(weights, grads, state, activations)


def cuda_peak(step, device=None) -> dict:
    """Run ``step()`` on CUDA and return the allocator's counters in bytes: allocated before, peak
    during, allocated after. Raises on a machine without CUDA (the counters would read 0)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_peak needs a CUDA GPU; on the CPU use measure(), which walks the tensors")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return {"before": before, "peak": torch.cuda.max_memory_allocated(device),
            "after": torch.cuda.memory_allocated(device)}


def record_snapshot(step, path="memory_snapshot.pickle", max_entries: int = 100_000):
    """Run ``step()`` with CUDA's allocation history on and write a snapshot: drag the file onto
    https://pytorch.org/memory_viz to see every allocation over time, with its Python stack."""
    if not torch.cuda.is_available():
        raise RuntimeError("record_snapshot needs a CUDA GPU (the allocator history is CUDA's)")
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        step()
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return path


# ---------------------------------------------------------------------------------------------
# Predicting

LLAMA_SIZES = {   # hidden, intermediate, layers, heads (LLaMA, Touvron et al. 2023, Table 2); vocab 32,000
    "llama-7b": (4096, 11008, 32, 32), "llama-13b": (5120, 13824, 40, 40),
    "llama-33b": (6656, 17920, 60, 52), "llama-65b": (8192, 22016, 80, 64),
}


def meta_model(config_or_name, **overrides) -> nn.Module:
    """A ``transformers`` causal LM built on the meta device: every shape, no memory."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    if isinstance(config_or_name, str):
        h, f, n, a = LLAMA_SIZES[config_or_name]
        config_or_name = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=a,
                                     num_key_value_heads=a, vocab_size=32000, **overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config_or_name)


BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
OPTIMIZERS = ("adamw", "adamw-fp32", "adamw8bit")
_GROUPS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}


def _layer_activations(c, b, s, trained: set, adapted: set, grad_in: bool, r: int, dtype, lora_dtype):
    """Bytes one Llama decoder layer saves for backward (SDPA attention, no dropout), op by op.

    ``trained``: the layer's linear groups with trainable weights ('q' ... 'down', 'norm');
    ``adapted``: those with a LoRA; ``grad_in``: does the layer's input require a gradient?
    Returns (bytes, does the output require a gradient).
    """
    h, f, a = c.hidden_size, c.intermediate_size, c.num_attention_heads
    kv = h * c.num_key_value_heads // a
    e, le = BYTES[dtype], BYTES[lora_dtype]
    sb = s * b
    reads = lambda groups: trained & groups or adapted & groups  # noqa: E731

    def norm(grad):         # RMSNorm: the input upcast to fp32 and 1/rms (fp32); x̂ if the weight trains
        return (sb * h * 4 + sb * 4 if grad else 0) + (sb * h * e if "norm" in trained else 0)

    def inputs(groups, width, already_saved=False):
        """What the linear layers of a group save of their shared input (``width`` features): one
        copy if a weight trains or a LoRA reads it in the same dtype; with 16-bit activations each
        fp32 LoRA keeps its own upcast copy; every LoRA also keeps A x (r features)."""
        shared = not already_saved and (trained & groups or (adapted & groups and le == e))
        per_lora = sb * (width * le * (le != e) + r * le)
        return sb * width * e * bool(shared) + per_lora * len(adapted & groups)

    out = norm(grad_in) + inputs({"q", "k", "v"}, h)
    attn_grad = grad_in or bool(reads({"q", "k", "v"}))
    if attn_grad:           # SDPA keeps q, k, v (after RoPE), its output and the log-sum-exp
        out += sb * (2 * h + 2 * kv) * e + b * a * s * 4
    out += inputs({"o"}, h, already_saved=attn_grad)      # o_proj reads SDPA's output, kept already
    grad_mid = attn_grad or bool(reads({"o"}))
    out += norm(grad_mid) + inputs({"gate", "up"}, h)
    gate_grad = grad_mid or bool(reads({"gate"}))
    up_grad = grad_mid or bool(reads({"up"}))
    out += sb * f * e * (gate_grad + gate_grad + up_grad)   # SiLU input; up and SiLU(gate) for the product
    out += inputs({"down"}, f)
    return out, grad_mid or bool(reads({"gate", "up", "down"}))


def predict(model: nn.Module, *, method: str = "lora", batch_size: int = 1, seq_len: int = 512, r: int = 16,
            targets="all-linear", dtype=torch.bfloat16, optimizer: str = "adamw", checkpointing: bool = False,
            blocksize: int = 64, double_quant: bool = True, lora_dtype=torch.float32) -> MemoryBreakdown:
    """Predict the four terms of training memory for a Llama-style causal LM (real or on the meta device).

    method: ``"full"`` (every parameter trains, in ``dtype``), ``"lora"`` (frozen ``dtype`` base, LoRA of
    rank ``r`` in fp32 on ``targets``) or ``"qlora"`` (as LoRA, every linear layer but the heads in NF4).
    optimizer: ``"adamw"`` (state in the parameters' dtype, as torch's AdamW), ``"adamw-fp32"`` (fp32
    state, as mixed-precision trainers) or ``"adamw8bit"`` (bitsandbytes' blockwise 8-bit state).
    checkpointing: keep only each layer's input and recompute the rest (one layer's worth comes back
    during backward, counted here). ``lora_dtype``: pefttutor keeps LoRA factors in fp32 (the default);
    the QLoRA paper trains them in bf16.
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method={method!r}: choose 'full', 'lora' or 'qlora'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {OPTIMIZERS}")
    who = "predict "
    batch_size = checks.integer("batch_size", batch_size, low=1, who=who)
    seq_len = checks.integer("seq_len", seq_len, low=1, who=who)
    r = checks.integer("r", r, low=1, who=who)
    checks.boolean("checkpointing", checkpointing, who=who)
    for name, value in (("dtype", dtype), ("lora_dtype", lora_dtype)):
        if value not in BYTES:
            raise ValueError(f"{who}{name}={value!r}: choose one of {list(BYTES)}")
    c = model.config
    if not all(hasattr(c, k) for k in ("intermediate_size", "num_key_value_heads", "rms_norm_eps")):
        raise ValueError(f"predict models Llama-style decoders (RMSNorm, SwiGLU, RoPE); {type(c).__name__} "
                         f"is not one. Use measure() for this model.")
    names = set(find_targets(model, targets)) if method != "full" else set()
    weights = trainable = 0
    for name, p in model.named_parameters():
        weights += p.numel() * BYTES[dtype]
        trainable += p.numel() if method == "full" else 0
    for name in names:
        d, k = linear_shape(model.get_submodule(name))
        trainable += r * (d + k)
        weights += r * (d + k) * BYTES[lora_dtype]
    if method == "qlora":   # QLoRA stores every linear layer but the heads in NF4, adapted or not
        for name in find_targets(model, "all-linear"):
            d, k = linear_shape(model.get_submodule(name))
            weights += d * k * (bits_per_parameter(blocksize, double_quant) / 8 - BYTES[dtype])
    p_bytes = BYTES[dtype] if method == "full" else BYTES[lora_dtype]
    grads = trainable * p_bytes
    per_state = {"adamw": 2 * p_bytes, "adamw-fp32": 8, "adamw8bit": 2 + 2 * 4 / 256}[optimizer]
    state = trainable * per_state
    acts = _activations(model, c, names, method, batch_size, seq_len, r, dtype, lora_dtype, checkpointing)
    return MemoryBreakdown(weights, grads, state, acts)


def _activations(model, c, names, method, b, s, r, dtype, lora_dtype, checkpointing):
    e, layers = BYTES[dtype], c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    grad, per_layer = method == "full", []
    for i in range(layers):
        prefix = f"model.layers.{i}."
        adapted = {_GROUPS[n.split(".")[-1]] for n in names if n.startswith(prefix)}
        trained = set(_GROUPS.values()) | {"norm"} if method == "full" else set()
        saved, grad_out = _layer_activations(c, b, s, trained, adapted, grad, r, dtype, lora_dtype)
        per_layer.append((saved, grad))
        grad = grad_out
    if checkpointing:   # each layer keeps its input; one layer is recomputed at a time during backward
        total = sum(b * s * c.hidden_size * e for _, g in per_layer if g) + max(x for x, _ in per_layer)
    else:
        total = sum(x for x, _ in per_layer)
    total += 2 * s * head_dim * e                                  # RoPE cos and sin, shared by all layers
    total += b * s * c.hidden_size * 4 + b * s * 4                 # final RMSNorm: fp32 input and 1/rms
    if method == "full":
        total += b * s * c.hidden_size * e * 2                     # x̂ for its weight; the head's input
    total += b * s * c.vocab_size * 4                              # log-softmax of the fp32 logits
    return total
