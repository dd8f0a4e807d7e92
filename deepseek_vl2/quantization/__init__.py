"""Weight-only int8 / int4 quantization of DeepSeek-VL2, registered with transformers on import."""

from .config import QUANT_METHOD, DeepseekVL2QuantizationConfig
from .modules import QuantizedExperts, QuantizedLinear
from .quantizer import DeepseekVL2Quantizer

__all__ = [
    "QUANT_METHOD",
    "DeepseekVL2QuantizationConfig",
    "DeepseekVL2Quantizer",
    "QuantizedExperts",
    "QuantizedLinear",
]
