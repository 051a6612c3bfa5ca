"""Quantization from scratch: the NF4 code book and blockwise 4-bit quantization (QLoRA)."""
from .nf4 import NF4State, dequantize_nf4, nf4_code_book, quantize_nf4

__all__ = ["NF4State", "dequantize_nf4", "nf4_code_book", "quantize_nf4"]
