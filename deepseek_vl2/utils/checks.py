"""Checks of the settings every entry point takes (chat API, CLI, web demo, ``incremental_prefilling``).

Each setting has one check and one message, whoever passes it; ``name`` lets a command line say
``--chunk_size`` where the Python API says ``chunk_size``.
"""

from __future__ import annotations

import torch

from .dtypes import parse_dtype


def _token_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number of tokens, got {value!r}")
    return value


def check_chunk_size(chunk_size: int, name: str = "chunk_size") -> int:
    """The tokens of one prefill chunk; where one full pass is allowed, callers pass None past this check."""
    return _token_count(chunk_size, name)


def check_max_new_tokens(max_new_tokens: int, name: str = "max_new_tokens") -> int:
    """The answer's length limit in tokens (the context limit is checked once the prompt is known)."""
    return _token_count(max_new_tokens, name)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit device string is checked, not guessed."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU")
    return device


def pick_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bfloat16 unless told otherwise (the weights are published in bfloat16)."""
    return torch.bfloat16 if dtype is None else parse_dtype(dtype)


def pick_placement(
    device: str | torch.device | None,
    device_map: str | dict | None,
    max_memory: dict | None,
    offload_folder: str | None,
) -> torch.device | None:
    """The device to move the loaded model to, or None where ``device_map`` places it.

    ``max_memory`` and ``offload_folder`` only mean something to a device map; silently ignored,
    a model meant to be offloaded would be loaded whole.
    """
    if device_map is None:
        placing = {"max_memory": max_memory, "offload_folder": offload_folder}
        given = [name for name, value in placing.items() if value is not None]
        if given:
            raise ValueError(f"without a device_map, {' and '.join(given)} would be ignored: add one (e.g. 'auto')")
        return pick_device(device)
    if device is not None:
        raise ValueError(f"give a device or a device_map, not both (device_map {device_map!r} places the model)")
    return None


def check_reuse(reuse: bool, reuse_budget: int | None, name: str = "reuse_budget") -> int | None:
    """Whether to reuse across turns and the bytes it may keep (None: the default; 0: reuse off)."""
    if not isinstance(reuse, bool):
        raise TypeError(f"reuse must be True or False, got {reuse!r}")
    if reuse_budget is None:
        return None
    if isinstance(reuse_budget, bool) or not isinstance(reuse_budget, int) or reuse_budget < 0:
        raise ValueError(f"{name} must be a whole number of bytes >= 0 (0 turns reuse off), got {reuse_budget!r}")
    return reuse_budget
