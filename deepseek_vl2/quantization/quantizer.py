"""transformers' quantizer for :class:`DeepseekVL2QuantizationConfig`: quantize while loading, reload saved.

``from_pretrained`` builds the model on the meta device; ``_process_model_before_weight_loading`` swaps
the target modules for quantized ones (so their shapes are checked before any weight is read), and
transformers' loader then reads one tensor group at a time (one weight, or one layer's experts once
their converter has stacked them), in the model dtype, and hands it to :class:`QuantizeOnLoad` before
it is stored: the float model is never whole in memory.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..models.kernels import choose_weight_only
from .config import QUANT_METHOD, DeepseekVL2QuantizationConfig
from .modules import QuantizedWeights
from .selection import quantize_modules


class QuantizeOnLoad(ConversionOps):
    """A loaded float tensor -> its quantized tensor and scale, by the module that holds it."""

    def __init__(self, hf_quantizer: DeepseekVL2Quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, **kwargs):
        stored = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, tensor_name = get_module_from_name(model, key)
            prefix = key.removesuffix(tensor_name)
            for name, tensor in module.quantize_tensor(tensor_name, value).items():
                stored[prefix + name] = tensor
        return stored


@register_quantizer(QUANT_METHOD)
class DeepseekVL2Quantizer(HfQuantizer):
    """Weight-only int8/int4 for DeepSeek-VL2, quantized on load or loaded quantized."""

    quantization_config: DeepseekVL2QuantizationConfig
    requires_calibration = False

    def validate_environment(self, device_map=None, **kwargs):
        """Every device of the placement needs a kernel for the chosen bits (checked before loading)."""
        places = set(device_map.values()) if isinstance(device_map, dict) else {device_map or "cpu"}
        for place in places:
            if place in ("disk", "auto"):
                raise ValueError(f"quantized models do not support device_map placement {place!r}: load them whole")
            choose_weight_only(torch.device(place), self.quantization_config.bits)

    def _process_model_before_weight_loading(self, model, **kwargs):
        quantize_modules(model, self.quantization_config)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return not self.pre_quantized and isinstance(module, QuantizedWeights) and tensor_name in module.quantized_names

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeOnLoad(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
