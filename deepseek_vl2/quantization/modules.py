"""Modules holding quantized weights: linear layers and a layer's stacked routed experts.

Each keeps its float layer's interface and parameter names; a weight ``w`` gains a ``w_scale``
companion (per output channel for int8, per group for int4, see ``packing``). The products run on
``kernels.weight_only_linear``, which reads the quantized bytes, or on the weights dequantized for the call:
on CPU for many rows where that was faster on the first call of that size, on CUDA always
(:func:`quantized_product`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.kernels import Kernel, Op, choose, quantized_kernel, weight_only_linear
from ..models.language import DeepseekV2Experts
from .packing import dequantize, empty_quantized, quantize

SCALE_SUFFIX = "_scale"


def quantized_product(x: torch.Tensor, weight, scale, bits: int, group_size: int | None) -> torch.Tensor:
    """``x [..., in] @ W.T`` for quantized ``W``, in ``x``'s dtype, on the kernel ``kernels`` chooses for its rows."""
    rows = x.numel() // x.shape[-1]
    size = 1 << max(rows.bit_length() - 1, 0)  # timed per power of two: prefill lengths vary

    def run(kernel: Kernel) -> torch.Tensor:
        if kernel is Kernel.WEIGHT_ONLY:
            kernel = quantized_kernel(x.device, bits)
        if kernel is Kernel.DEQUANTIZED:
            return F.linear(x, dequantize(weight, scale, bits, x.dtype))
        return weight_only_linear(x, kernel, weight, scale, group_size)

    return run(choose(Op.QUANTIZED_PRODUCT, x.device, x.dtype, size, [tuple(weight.shape), (bits,)], trial=run))


class QuantizedWeights:
    """What quantized modules share: which of their tensors are quantized, and how to fill them."""

    bits: int
    group_size: int | None
    quantized_names: tuple[str, ...]

    def _make_quantized(self, name: str, float_weight: torch.Tensor) -> None:
        """Replace parameter ``name`` by uninitialised quantized storage and its scale (same device)."""
        weight, scale = empty_quantized(
            float_weight.shape, self.bits, self.group_size, float_weight.dtype, float_weight.device
        )
        setattr(self, name, nn.Parameter(weight, requires_grad=False))
        setattr(self, name + SCALE_SUFFIX, nn.Parameter(scale, requires_grad=False))

    def quantize_tensor(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors (by parameter name) for a float ``value`` of parameter ``name``."""
        if name not in self.quantized_names:
            return {name: value}
        weight, scale = quantize(value, self.bits, self.group_size)
        return {name: weight, name + SCALE_SUFFIX: scale}

    def dequantized(self, name: str) -> torch.Tensor:
        """The float32 values that quantized parameter ``name`` stands for."""
        return dequantize(getattr(self, name), getattr(self, name + SCALE_SUFFIX), self.bits)


class QuantizedLinear(QuantizedWeights, nn.Module):
    """``nn.Linear`` with int8 or int4 weights; the bias stays in the model dtype."""

    quantized_names = ("weight",)

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        self._make_quantized("weight", linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = quantized_product(x, self.weight, self.weight_scale, self.bits, self.group_size)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


class QuantizedExperts(QuantizedWeights, DeepseekV2Experts):
    """Stacked routed experts with quantized ``gate_up_proj`` and ``down_proj``.

    The routing paths are the float experts' own: a decode step runs each (token, expert) pair on its
    expert's slice in place, a prefill runs each hit expert once on its sorted tokens; only the two
    products differ.
    """

    quantized_names = ("gate_up_proj", "down_proj")

    def __init__(self, config, bits: int, group_size: int | None, like: DeepseekV2Experts):
        with torch.device(like.gate_up_proj.device):
            super().__init__(config)
        self.bits, self.group_size = bits, group_size
        for name in self.quantized_names:
            self._make_quantized(name, getattr(like, name))

    def _gate_up(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        return quantized_product(
            tokens, self.gate_up_proj[expert], self.gate_up_proj_scale[expert], self.bits, self.group_size
        )

    def _down(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        return quantized_product(
            tokens, self.down_proj[expert], self.down_proj_scale[expert], self.bits, self.group_size
        )

    def _gathered_weights(self, expert_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' experts' weights, gathered quantized (a quarter to a half of the bytes), then dequantized."""
        weights = [(getattr(self, name), getattr(self, name + SCALE_SUFFIX)) for name in self.quantized_names]
        return tuple(dequantize(weight[expert_ids], scale[expert_ids], self.bits, dtype) for weight, scale in weights)
