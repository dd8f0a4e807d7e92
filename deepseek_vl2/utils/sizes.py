"""Memory sizes as people type them (``40GiB``, ``24GB``), and ``max_memory`` budgets per device."""

from __future__ import annotations

from collections.abc import Mapping

MAX_MEMORY_EXAMPLE = "0=20GiB,1=22GiB,cpu=48GiB"
NAMED_DEVICES = ("cpu", "disk")  # besides GPU indexes, the devices a max_memory budget is given for


def parse_bytes(size: str | int) -> int:
    """``"40GiB"``, ``"40GB"`` (10^9 bytes), ``"512MiB"`` or a number of bytes."""
    from accelerate.utils import convert_file_size_to_int

    try:
        if isinstance(size, str) and size.strip().isdigit():
            size = int(size)
        value = size if isinstance(size, int) else convert_file_size_to_int(size.strip())
    except (ValueError, AttributeError):
        value = -1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"cannot read {size!r} as a memory size; write it like 40GiB, 24GB or 512MiB")
    return value


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"0=20GiB,cpu=48GiB"`` as ``from_pretrained``'s ``max_memory``: GPU indexes as ints, then "cpu", "disk"."""
    budgets: dict[int | str, int] = {}
    for entry in text.split(","):
        device, equals, size = (part.strip() for part in entry.partition("="))
        if not equals or not device:
            raise ValueError(
                f"max_memory: cannot read {entry.strip()!r}; write DEVICE=SIZE,..., e.g. {MAX_MEMORY_EXAMPLE}"
            )
        key = int(device) if device.isdigit() else device.lower()
        if not isinstance(key, int) and key not in NAMED_DEVICES:
            raise ValueError(f"max_memory: unknown device {device!r}; use a GPU index (0, 1, ...), cpu or disk")
        if key in budgets:
            raise ValueError(f"max_memory: device {device!r} is given twice")
        try:
            budgets[key] = parse_bytes(size)
        except ValueError as error:
            raise ValueError(f"max_memory for {device}: {error}") from None
    return budgets


def format_max_memory(max_memory: Mapping[int | str, int | str]) -> str:
    """The ``DEVICE=SIZE,...`` text that ``parse_max_memory`` reads back."""
    return ",".join(f"{device}={size}" for device, size in max_memory.items())
