"""transformers' quantizer for :class:`DeepseekVL2QuantizationConfig`: quantize while loading, reload saved.

``from_pretrained`` builds the model on the meta device; ``_process_model_before_weight_loading`` swaps
the target modules for quantized ones (so their shapes are checked before any weight is read), and
transformers' loader then reads one tensor group at a time, in the model dtype: a weight goes through
:class:`QuantizeOnLoad`, a layer's per-expert tensors through :class:`QuantizeExperts` (in place of
the float load's stacking converter), before they are stored. The float model is never whole in memory.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..models.kernels import quantized_kernel
from ..models.language import StackExperts
from .config import QUANT_METHOD, DeepseekVL2QuantizationConfig
from .modules import SCALE_SUFFIX, QuantizedExperts, QuantizedWeights
from .packing import empty_quantized, quantize
from .selection import quantize_modules, repack_model

# The converters that stack the published per-expert tensors (``models.language.expert_weight_conversions``).
EXPERT_TARGETS = {(f"mlp.experts.{name}",) for name in QuantizedExperts.quantized_names}


class QuantizeOnLoad(ConversionOps):
    """A loaded float tensor -> its quantized tensor and scale, by the module that holds it."""

    def __init__(self, hf_quantizer: DeepseekVL2Quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, **kwargs):
        stored = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            if not value.is_floating_point() or key.endswith(SCALE_SUFFIX):  # quantized already, by QuantizeExperts
                stored[key] = value
                continue
            module, tensor_name = get_module_from_name(model, key)
            prefix = key.removesuffix(tensor_name)
            for name, tensor in module.quantize_tensor(tensor_name, value).items():
                stored[prefix + name] = tensor
            StackExperts.releaser.read(value.numel() * value.element_size())  # the float pages are done with
        return stored


class QuantizeExperts(ConversionOps):
    """Stack a layer's per-expert checkpoint tensors into the quantized stacked tensor and its scale.

    Replaces the float load's merge (stack, then concatenate gate and up): each expert is quantized as it
    is placed, so that no float copy of the whole layer's experts is made beside the tensors read, and
    the checkpoint pages read are released as ``StackExperts`` does.
    """

    def __init__(self, hf_quantizer: DeepseekVL2Quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        config = self.hf_quantizer.quantization_config
        parts = [input_dict.pop(pattern) for pattern in source_patterns]  # per pattern: one tensor per expert
        first = torch.cat([part[0] for part in parts])
        quantized, scale = empty_quantized(
            (len(parts[0]), *first.shape), config.bits, config.group_size, first.dtype, first.device
        )
        for expert in range(len(parts[0])):
            matrix = torch.cat([part[expert] for part in parts])
            for part in parts:
                part[expert] = None  # free each expert's float tensors once placed
            quantized[expert], scale[expert] = quantize(matrix, config.bits, config.group_size)
            StackExperts.releaser.read(matrix.numel() * matrix.element_size())
        return {target_patterns[0]: quantized, target_patterns[0] + SCALE_SUFFIX: scale}


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
            quantized_kernel(torch.device(place), self.quantization_config.bits)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            self.quantization_config.int4_layout = None  # what quantizing here packs in
        quantize_modules(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Loaded int4 bytes packed on a machine of another layout are repacked in this machine's."""
        config = self.quantization_config
        if config.bits == 4 and config.int4_layout is not None:
            repack_model(model, config.int4_layout)
            config.int4_layout = None

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return not self.pre_quantized and isinstance(module, QuantizedWeights) and tensor_name in module.quantized_names

    def update_weight_conversions(self, weight_conversions, model):
        """When quantizing on load, the routed experts' merges quantize expert by expert (``QuantizeExperts``)."""
        if self.pre_quantized:
            return super().update_weight_conversions(weight_conversions, model)
        updated = []
        for converter in weight_conversions:
            targets = getattr(converter, "_original_target_patterns", ())
            if isinstance(converter, WeightConverter) and tuple(targets) in EXPERT_TARGETS:
                sources = converter._original_source_patterns
                converter = converter.copy(sources, targets, operations=[QuantizeExperts(self)])
            updated.append(converter)
        return updated

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeOnLoad(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
