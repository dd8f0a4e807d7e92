"""Which modules of DeepSeek-VL2 are quantized, and swapping them for their quantized forms.

Quantized: every linear layer of the decoder layers (attention projections, dense and shared MLPs), the
stacked routed experts and the LM head; the vision tower's linear layers with ``quantize_vision``.
Kept in the model dtype: the projector, embeddings, norms, the routers' weights, image newline and view
separator, and MLA's ``kv_b_proj``, which a decode step folds into the attention as a matrix (read whole
per step, like the cache) rather than running it as a linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.language import DeepseekV2Experts
from ..models.packed import Packable
from .config import DeepseekVL2QuantizationConfig
from .modules import QuantizedExperts, QuantizedLinear, QuantizedWeights
from .packing import Int4Layout, int4_shape_problem, repack_int4

KEPT_LINEARS = ("kv_b_proj",)


def _decoder_targets(language) -> list[tuple[str, nn.Module]]:
    targets = []
    for name, module in language.model.layers.named_modules(prefix="language.model.layers"):
        if isinstance(module, DeepseekV2Experts) or (
            isinstance(module, nn.Linear) and name.rpartition(".")[2] not in KEPT_LINEARS
        ):
            targets.append((name, module))
    if not language.config.tie_word_embeddings:  # a tied head is the embedding table, kept in the model dtype
        targets.append(("language.lm_head", language.lm_head))
    return targets


def quantization_targets(model: nn.Module, config: DeepseekVL2QuantizationConfig) -> list[tuple[str, nn.Module]]:
    """(name, float module) of every module that ``config`` quantizes in a ``DeepseekVLV2ForCausalLM``."""
    targets = _decoder_targets(model.language)
    if config.quantize_vision:
        targets += [(n, m) for n, m in model.vision.named_modules(prefix="vision") if isinstance(m, nn.Linear)]
    return targets


def _weight_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(module, DeepseekV2Experts):
        return [(name, tuple(getattr(module, name).shape)) for name in QuantizedExperts.quantized_names]
    return [("weight", tuple(module.weight.shape))]


def check_shapes(targets: list[tuple[str, nn.Module]], config: DeepseekVL2QuantizationConfig) -> None:
    """ValueError naming the first weight the chosen kernel cannot take (int4 has shape rules; int8 none)."""
    if config.bits != 4:
        return
    for name, module in targets:
        for tensor_name, shape in _weight_shapes(module):
            problem = int4_shape_problem(shape, config.group_size)
            if problem:
                raise ValueError(f"cannot quantize {name}.{tensor_name} {shape} to int4: {problem}")


def _quantized_form(module: nn.Module, config: DeepseekVL2QuantizationConfig) -> QuantizedExperts | QuantizedLinear:
    """An empty quantized module shaped like ``module``, on its device."""
    if isinstance(module, DeepseekV2Experts):
        return QuantizedExperts(module.config, config.bits, config.group_size, like=module)
    return QuantizedLinear(module, config.bits, config.group_size)


def _swap(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, replacement)


def quantize_modules(model: nn.Module, config: DeepseekVL2QuantizationConfig) -> None:
    """Swap each target module of ``model`` (on the meta device, before loading) for an empty quantized form."""
    targets = quantization_targets(model, config)
    check_shapes(targets, config)
    for name, module in targets:
        _swap(model, name, _quantized_form(module, config))


@torch.no_grad()
def quantize_in_place(model: nn.Module, config: DeepseekVL2QuantizationConfig) -> None:
    """Quantize a model already in memory, module by module (benchmarks build random-weight models so).

    Loading a checkpoint with ``quantization=`` is the way that never holds the float model.
    """
    targets = quantization_targets(model, config)
    check_shapes(targets, config)
    for name, module in targets:
        quantize_target(model, name, module, config)
    model.config.quantization_config = config
    model.is_quantized = True


@torch.no_grad()
def quantize_target(model: nn.Module, name: str, module: nn.Module, config: DeepseekVL2QuantizationConfig) -> None:
    """Swap the float target ``module`` (called ``name`` in ``model``) for its quantized form, filled from it."""
    if isinstance(module, Packable):
        module.unpack()  # quantizing reads the dense weights
    replacement = _quantized_form(module, config)
    for tensor_name in replacement.quantized_names:
        for stored_name, tensor in replacement.quantize_tensor(tensor_name, getattr(module, tensor_name)).items():
            getattr(replacement, stored_name).copy_(tensor)
    _swap(model, name, replacement)


@torch.no_grad()
def repack_model(model: nn.Module, stored: Int4Layout) -> None:
    """Repack every int4 tensor of ``model`` from the ``stored`` layout into this machine's, in place."""
    for module in model.modules():
        if isinstance(module, QuantizedWeights) and module.bits == 4:
            for name in module.quantized_names:
                packed = getattr(module, name)
                packed.copy_(repack_int4(packed, stored))
