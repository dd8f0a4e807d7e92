"""Early, plain-language checks on where a checkpoint is said to be, and what loading one leaves behind."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import torch

from .heap import LIBC, trim_heap

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


_MADV_DONTNEED = 4
_LIBC = LIBC
if _LIBC is not None:
    _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class PageReleaser:
    """After every ``every`` bytes read, releases the checkpoint pages read so far and the heap's freed blocks.

    Each release costs a walk of the process's page tables, so it is done per chunk of reading, not per
    tensor. Converting tensors (stacking, quantizing) frees temporaries between the tensors kept, which
    the heap would otherwise keep resident: gigabytes over a large model.
    """

    def __init__(self, every: int = 512 << 20):
        self.every, self.pending = every, 0

    def read(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            release_checkpoint_pages()
            trim_heap()
            self.pending = 0


def own_mapped_weights(model: torch.nn.Module) -> None:
    """Copy the CPU parameters and buffers that still view the checkpoint's memory-mapped files.

    transformers hands out zero-copy views of each safetensors file. While one view of a file lives, the
    whole mapping does, and every page of it read while loading stays resident: resident memory ends up
    well above the weights' size (containers count those pages against their limit). A view's storage is
    not resizable; owned memory is. The pages read are released as the copying goes, so that it does not
    add to the peak.
    """
    releaser = PageReleaser()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None and tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
                    tensor.data = tensor.data.clone()
                    releaser.read(tensor.numel() * tensor.element_size())
    release_checkpoint_pages()
    trim_heap()


def release_checkpoint_pages() -> None:
    """Let the kernel drop the resident pages of this process's mapped safetensors files (Linux only).

    Only mappings without privately modified pages are released: the kernel reads a released page back
    from the file when it is next used, so a clean page loses nothing, while a page that was read once
    (a per-expert tensor already stacked into new memory) stops counting against the process.
    """
    if _LIBC is None:
        return
    for start, end in _clean_safetensors_mappings():
        _LIBC.madvise(start, end - start, _MADV_DONTNEED)


def _clean_safetensors_mappings() -> list[tuple[int, int]]:
    """(start, end) of each mapping of a ``.safetensors`` file that holds no privately modified page."""
    mappings = []  # [start, end, is a safetensors file, modified] of every mapping
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: range, perms, offset, device, inode[, path]
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                mappings.append([start, end, fields[-1].endswith(".safetensors"), False])
            elif fields[0] in ("Private_Dirty:", "Anonymous:") and int(fields[1]):
                mappings[-1][3] = True
    return [(start, end) for start, end, checkpoint, modified in mappings if checkpoint and not modified]
