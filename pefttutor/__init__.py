"""pefttutor: parameter-efficient fine-tuning, derived and built from scratch.

The package behind the book: every layer here is derived in a chapter and tested against the
reference library (peft, bitsandbytes, adapters) on the same weights.
"""
from .fedpara import FedParaLinear, HadamardLinear
from .inject import (AdapterLayer, AdapterModule, ParameterCount, adapter_layers, adapter_state, find_targets, inject,
                     linear_names, load_adapter, merge, save_adapter, trainable_parameters, unload,
                     unmerge)
from .krona import KronABlock, KronALinear
from .lora import LoRALinear

__version__ = "0.1.0"

__all__ = ["AdapterLayer", "AdapterModule", "FedParaLinear", "HadamardLinear", "KronABlock", "KronALinear",
           "LoRALinear", "ParameterCount", "adapter_layers", "adapter_state",
           "find_targets", "inject", "linear_names", "load_adapter", "merge", "save_adapter",
           "trainable_parameters", "unload", "unmerge"]
