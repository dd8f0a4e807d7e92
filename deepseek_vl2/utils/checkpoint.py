"""Early, plain-language checks on where a checkpoint is said to be."""

from __future__ import annotations

import os
from pathlib import Path


def check_checkpoint_location(name_or_path: str | os.PathLike) -> None:
    """Raise FileNotFoundError for a local-looking path that does not exist.

    Anything shaped like a hub id (``org/name``) is left to the hub client, which reports its own
    errors (no network, unknown repository).
    """
    text = os.fspath(name_or_path)
    if Path(text).expanduser().exists():
        return
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not looks_like_hub_id:
        raise FileNotFoundError(f"checkpoint folder not found: {text} (and it is not a hub id like org/name)")
