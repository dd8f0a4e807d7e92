"""Early, plain-language checks on where a checkpoint is said to be."""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name, each of letters, digits, "_", "-" and "."; a leading "." (./, ../), "/" or "~" is a local path
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


def looks_like_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is shaped like a hub id (``org/name``) rather than a local path."""
    return HUB_ID.fullmatch(os.fspath(name_or_path)) is not None


def check_checkpoint_location(name_or_path: str | os.PathLike) -> None:
    """Raise FileNotFoundError for a local-looking path that does not exist.

    Anything shaped like a hub id (``org/name``) is left to the hub client, which reports its own
    errors (no network, unknown repository).
    """
    text = os.fspath(name_or_path)
    if Path(text).expanduser().exists():
        return
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"checkpoint folder not found: {text} (and it is not a hub id like org/name)")
