"""Weights kept in oneDNN's blocked layout, for CPUs whose bf16 products run on oneDNN.

On a CPU with native bf16 (AVX-512-BF16 or AMX), PyTorch sends a bf16 linear layer's product to oneDNN,
which first copies the weight into its blocked layout, on every call. Packing each weight once, at load,
skips that copy: the product is the same oneDNN computation, bit for bit (the original's call), and reads
the weights about as fast at a few rows as PyTorch's GEMV does at one (benchmarks/README.md).

A packed module's parameters stay in place on the meta device, with their names, shapes and dtype, so that
whatever sizes the model still can; ``state_dict`` gives their values, and moving the module to another
device or dtype unpacks it first.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

PACKING_ENV = "DEEPSEEK_VL2_PACKED_WEIGHTS"  # "0": keep every weight in PyTorch's own layout


def _from_environment() -> bool:
    return os.environ.get(PACKING_ENV, "1") != "0"


_enabled = _from_environment()


def pack_by_default(enabled: bool | None) -> None:
    """Let :func:`pack_weights` pack or leave every weight as it is (to compare the two); None: as the
    environment says (``DEEPSEEK_VL2_PACKED_WEIGHTS``, packing unless it is "0")."""
    global _enabled
    _enabled = _from_environment() if enabled is None else enabled


def packing_available() -> bool:
    """Whether this CPU and PyTorch build run bf16 products on oneDNN with native bf16 instructions."""
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return native_bf16 and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def can_pack(tensor: torch.Tensor) -> bool:
    """A bf16 CPU matrix (or stack of matrices) that :func:`pack_weights` would pack here."""
    cpu_bf16 = tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16 and tensor.dim() in (2, 3)
    return _enabled and cpu_bf16 and packing_available()


class PackedWeight:
    """One bf16 matrix [out, in] in oneDNN's layout for linear products (an opaque tensor, copied by value)."""

    __slots__ = ("tensor",)

    def __init__(self, dense: torch.Tensor):
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(dense.detach())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``, as ``F.linear`` computes it on oneDNN."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.tensor, bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        return self.tensor.to_dense()

    def __reduce__(self):  # an opaque tensor has no storage to copy or pickle: go through the dense values
        return PackedWeight, (self.dense(),)


class Packable:
    """Mixin for a module whose ``packed_names`` parameters (matrices, or stacks of them) can be packed."""

    packed_names: tuple[str, ...] = ("weight",)

    def packed(self, name: str) -> PackedWeight | list[PackedWeight] | None:
        return self.__dict__.get("_packed_weights", {}).get(name)

    @property
    def is_packed(self) -> bool:
        return bool(self.__dict__.get("_packed_weights"))

    def pack(self) -> None:
        """Pack the weights where packing applies (on CPU in bf16, not offloaded), freeing the dense ones."""
        tensors = [self._parameters.get(name) for name in self.packed_names]
        if self.is_packed or hasattr(self, "_hf_hook") or not all(t is not None and can_pack(t) for t in tensors):
            return
        packed = {}
        for name, dense in zip(self.packed_names, tensors):
            packed[name] = PackedWeight(dense) if dense.dim() == 2 else [PackedWeight(matrix) for matrix in dense]
            self._parameters[name] = nn.Parameter(dense.to("meta"), requires_grad=dense.requires_grad)
        self._packed_weights = packed

    def unpack(self) -> None:
        """Put the dense weights back (PyTorch's own layout)."""
        for name, packed in self.__dict__.pop("_packed_weights", {}).items():
            self._parameters[name] = nn.Parameter(dense_of(packed), requires_grad=self._parameters[name].requires_grad)

    def _apply(self, fn, recurse=True):
        if not (self.is_packed and _keeps_cpu_bf16(fn)):
            self.unpack()
            return super()._apply(fn, recurse)
        # .cpu(), .to(torch.bfloat16) and the like: the packed weights stay, the other tensors are converted
        order = list(self._parameters)
        placeholders = {name: self._parameters.pop(name) for name in self._packed_weights}
        try:
            return super()._apply(fn, recurse)
        finally:
            converted = {**self._parameters, **placeholders}
            self._parameters.clear()
            self._parameters.update((name, converted[name]) for name in order)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, packed in self.__dict__.get("_packed_weights", {}).items():
            destination[prefix + name] = dense_of(packed)

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()  # loading copies values into the dense parameters
        super()._load_from_state_dict(*args, **kwargs)


def dense_of(packed: PackedWeight | list[PackedWeight]) -> torch.Tensor:
    """The dense values of a packed matrix, or of a list of them stacked."""
    return packed.dense() if isinstance(packed, PackedWeight) else torch.stack([matrix.dense() for matrix in packed])


def _keeps_cpu_bf16(fn) -> bool:
    probe = fn(torch.zeros(1, dtype=torch.bfloat16))
    return probe.device.type == "cpu" and probe.dtype == torch.bfloat16


class Linear(Packable, nn.Linear):
    """``nn.Linear`` whose weight can be packed (:func:`pack_weights`), where it has no bias.

    PyTorch adds a bias after the product, in bf16, for an input that is not one contiguous matrix; the
    packed call would add it inside, in float32. No DeepSeek-VL2 variant has biases in its decoder.
    """

    def pack(self) -> None:
        if self.bias is None:
            super().pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed("weight")
        return F.linear(x, self.weight, self.bias) if packed is None else packed.linear(x, self.bias)


def pack_weights(model: nn.Module) -> int:
    """Pack every :class:`Packable` module's weights where packing applies; the number of packed modules.

    A weight shared with another module (a tied LM head) stays as it is.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if isinstance(module, Packable) and all(uses[id(module._parameters.get(n))] == 1 for n in module.packed_names):
            module.pack()
    return packed_modules(model)


def packed_modules(model: nn.Module) -> int:
    """How many of ``model``'s modules hold packed weights."""
    return sum(1 for module in model.modules() if isinstance(module, Packable) and module.is_packed)


def unpack_weights(model: nn.Module) -> None:
    """Every packed module of ``model`` back to PyTorch's own layout."""
    for module in model.modules():
        if isinstance(module, Packable):
            module.unpack()
