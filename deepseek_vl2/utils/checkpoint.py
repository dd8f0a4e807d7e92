"""Early, plain-language checks on where a checkpoint is said to be, and what loading one leaves behind."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import sys
from pathlib import Path

import torch

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



def own_mapped_weights(model: torch.nn.Module) -> None:
    """Copy the CPU parameters and buffers that still view the checkpoint's memory-mapped files.

    transformers hands out zero-copy views of each safetensors file. While one view of a file lives, the
    whole mapping does, and every page of it read while loading stays resident, the per-expert tensors
    that were stacked into new memory among them: resident memory ends up well above the weights' size
    (containers count those pages against their limit). A view's storage is not resizable; owned memory is.
    On Linux the mapping's pages are released before and while copying (see :class:`_MappedPages`), so the
    copies do not add to the peak.
    """
    views = [
        (tensors, key)
        for module in model.modules()
        for tensors in (module._parameters, module._buffers)
        for key, tensor in tensors.items()
        if tensor is not None and tensor.device.type == "cpu" and not tensor.untyped_storage().resizable()
    ]
    pages = _MappedPages([tensors[key] for tensors, key in views])
    pages.release_all()
    for tensors, key in views:
        source = tensors[key].data
        tensors[key].data = source.clone()
        pages.release(source)


class _MappedPages:
    """The resident pages of the file mappings behind some tensors, released on request (Linux, else nothing).

    Only mappings without privately modified pages are touched: the kernel reads a released page back from
    the file when it is next used, so a clean page loses nothing.
    """

    MADV_DONTNEED = 4

    def __init__(self, tensors: list[torch.Tensor]):
        self.clean: list[tuple[int, int]] = []
        if sys.platform != "linux" or not tensors:
            return
        self.madvise = ctypes.CDLL(None, use_errno=True).madvise
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        pointers = [tensor.untyped_storage().data_ptr() for tensor in tensors]
        for start, end, dirty in self._file_mappings():
            if not dirty and any(start <= pointer < end for pointer in pointers):
                self.clean.append((start, end))

    @staticmethod
    def _file_mappings() -> list[tuple[int, int, bool]]:
        """(start, end, has privately modified pages) of each file-backed mapping of this process."""
        mappings = []  # [start, end, file-backed, modified] of every mapping
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if not fields[0].endswith(":"):  # a mapping's header: range, perms, offset, device, inode[, path]
                    start, end = (int(bound, 16) for bound in fields[0].split("-"))
                    mappings.append([start, end, len(fields) > 5 and fields[5].startswith("/"), False])
                elif fields[0] in ("Private_Dirty:", "Anonymous:") and int(fields[1]):
                    mappings[-1][3] = True
        return [(start, end, modified) for start, end, file_backed, modified in mappings if file_backed]

    def _release(self, start: int, end: int) -> None:
        page = mmap.PAGESIZE
        start, end = -(-start // page) * page, end // page * page
        if end > start:
            self.madvise(start, end - start, self.MADV_DONTNEED)

    def release_all(self) -> None:
        for start, end in self.clean:
            self._release(start, end)

    def release(self, tensor: torch.Tensor) -> None:
        """Release the whole pages under ``tensor``'s bytes, if they lie in a clean mapping."""
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        if any(start <= begin < stop for start, stop in self.clean):
            self._release(begin, end)
