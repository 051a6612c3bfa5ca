"""pefttutor: parameter-efficient fine-tuning, derived and built from scratch.

The package behind the book: every layer here is derived in a chapter and tested against the
reference library (peft, bitsandbytes, adapters) on the same weights.
"""
import logging as _logging

# On a CPU with AVX-512 BF16, bitsandbytes tries to load an optional 4-bit kernel from the Hub package
# `kernels` and logs a warning when it is not installed; the book runs offline on bitsandbytes' own CPU
# kernels, and the warning would make a notebook's output depend on the CPU.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from .adalora import AdaLoRALinear, RankAllocator
from .adapters import (AdapterFusion, HoulsbyAdapter, ParallelAdapter, PfeifferAdapter, RobustAdapterDrop,
                       drop_adapters, fuse, prune_fusion)
from .bitfit import BitFit
from .fedpara import FedParaLinear, HadamardLinear
from .ia3 import IA3Linear, inject_ia3
from .inject import (AdapterLayer, AdapterModule, ParameterCount, adapter_layers, adapter_state, find_targets, inject,
                     linear_names, load_adapter, merge, save_adapter, trainable_parameters, unload,
                     unmerge)
from .krona import KronABlock, KronALinear
from .lora import LoRALinear
from .prompts import MultitaskPromptTuning, PrefixTuning, PromptTuning, PTuning

__version__ = "0.1.0"

__all__ = ["AdaLoRALinear", "AdapterFusion", "AdapterLayer", "AdapterModule", "BitFit", "FedParaLinear",
           "HadamardLinear", "HoulsbyAdapter", "IA3Linear", "KronABlock", "KronALinear", "LoRALinear",
           "MultitaskPromptTuning", "ParallelAdapter", "PrefixTuning", "PromptTuning", "PTuning", "ParameterCount",
           "PfeifferAdapter", "RankAllocator", "RobustAdapterDrop", "adapter_layers", "adapter_state",
           "drop_adapters", "find_targets", "fuse", "inject", "inject_ia3", "linear_names", "load_adapter",
           "merge", "prune_fusion", "save_adapter", "trainable_parameters", "unload", "unmerge"]
