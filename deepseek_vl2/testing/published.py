"""What the three published checkpoints hold (config, processor settings, tensor names and shapes).

The facts ship with the package (``layouts/``, see its README) so that tests and benchmarks build the
published architectures on any machine, with nothing downloaded.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

LAYOUT_DIR = Path(__file__).resolve().parent / "layouts"
VARIANTS = ("tiny", "small", "base")


@cache
def _read(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    with gzip.open(LAYOUT_DIR / f"{variant}.json.gz", "rt", encoding="utf-8") as file:
        return file.read()


def published_layout(variant: str) -> dict:
    """``{"model", "config", "processor_config", "tokenizer_facts", "tensors"}`` of a published variant (a fresh copy)."""
    return json.loads(_read(variant))


def published_config(variant: str) -> dict:
    """The published ``config.json`` of ``variant``, as a dict (a fresh copy)."""
    return published_layout(variant)["config"]
