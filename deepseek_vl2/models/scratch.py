"""Scratch tensors a forward pass reuses from layer to layer instead of making each layer its own.

A large tensor made fresh in every layer pays for its page faults in every layer: the C allocator hands
blocks that large back to the system when they are freed, and on a VM a fault costs microseconds a page.
The routed experts' per-pair float32 outputs are the largest such tensor of a prefill. Inside
``reusing_scratch()`` (the decoder's forward) ``scratch(role, ...)`` gives every layer the same memory,
uninitialised; outside it, a new tensor. Kept per thread, and dropped when the outermost use ends.
Only host memory is kept: on accelerators PyTorch's caching allocator already reuses freed blocks.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_local = threading.local()


@contextmanager
def reusing_scratch():
    """Within: ``scratch`` hands out one kept tensor per role (nested uses share the outer one's)."""
    outermost = getattr(_local, "kept", None) is None
    if outermost:
        _local.kept = {}
    try:
        yield
    finally:
        if outermost:
            _local.kept = None


def scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for ``role``: on the host inside a pass, the kept one where shape and dtype match."""
    kept = getattr(_local, "kept", None)
    if kept is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    tensor = kept.get(role)
    if tensor is None or tensor.shape != shape or tensor.dtype != dtype:
        kept.pop(role, None)  # freed before its replacement is made
        tensor = kept[role] = torch.empty(shape, dtype=dtype, device=device)
    return tensor
