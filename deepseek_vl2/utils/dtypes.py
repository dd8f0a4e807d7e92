"""The dtypes the models run in, by the names people type (bf16, float16, half, ...)."""

from __future__ import annotations

import torch

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named by ``dtype`` (a key of DTYPES, any case), or ``dtype`` if it is one of them."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use bfloat16, float16 or float32")
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype.lower()]
