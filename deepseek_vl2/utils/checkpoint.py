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


def check_checkpoint_location(name_or_path: str | os.PathLike, required_file: str, subfolder: str = "") -> None:
    """Raise FileNotFoundError for a local path that is not a checkpoint folder holding ``required_file``.

    Anything shaped like a hub id (``org/name``) that is not a local path is left to the hub client, which
    reports its own errors (no network, unknown repository). Without this check, an existing folder that
    holds no checkpoint gets transformers' advice to look for it on the hub under a mangled URL.
    """
    text = os.fspath(name_or_path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if looks_like_hub_id(text):
            return
        raise FileNotFoundError(f"checkpoint folder not found: {text} (and it is not a hub id like org/name)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{text} is a file; a checkpoint is a folder (config.json, weights, tokenizer)")
    if not (folder / subfolder / required_file).is_file():
        where = folder / subfolder if subfolder else text
        raise FileNotFoundError(f"{where} is not a DeepSeek-VL2 checkpoint folder: it has no {required_file}")
