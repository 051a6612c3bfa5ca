"""Quantization from scratch: NF4 and double quantization (bit for bit with bitsandbytes), a 4-bit
linear layer for QLoRA, and an optimizer whose state lives in CPU memory."""
from .linear4bit import NF4Linear, dequantize_model, quantize_model
from .nf4 import (NF4State, bits_per_parameter, dequantize_blockwise_8bit, dequantize_nf4,
                  dynamic_code_book, fake_quantize, fp4_code_book, int4_code_book, nf4_code_book,
                  quantize_blockwise_8bit, quantize_nf4)
from .paged import OffloadedAdamW

__all__ = ["NF4Linear", "NF4State", "OffloadedAdamW", "bits_per_parameter", "dequantize_blockwise_8bit",
           "dequantize_model", "dequantize_nf4", "dynamic_code_book", "fake_quantize", "fp4_code_book",
           "int4_code_book", "nf4_code_book", "quantize_blockwise_8bit", "quantize_model", "quantize_nf4"]
