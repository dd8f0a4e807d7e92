"""Handing the heap's freed memory back to the system (glibc only).

glibc keeps freed blocks below its mmap threshold (which rises as large blocks are freed) for reuse; after
a burst of large temporaries between long-lived allocations, the resident set stays gigabytes above the
live tensors until it is told to trim.
"""

from __future__ import annotations

import ctypes
import sys

LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def trim_heap() -> None:
    """Return the heap's free pages to the system, where the C library can (a no-op elsewhere)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)
