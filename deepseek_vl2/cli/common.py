"""What the subcommands share: the one-line error, library logging, and how stdout is written."""

from __future__ import annotations

import codecs
import logging
import os
import sys


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


def configure_logging(verbose: bool, progress_bars: bool = True) -> None:
    """Library logs as asked: transformers' warnings and progress bars only with ``verbose`` or if wanted."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.set_verbosity_error()
        if not progress_bars:
            hf_logging.disable_progress_bar()


def configure_hub_logging(verbose: bool) -> None:
    """For every subcommand: offline, a hub id logged each of its retries."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.disable_propagation()  # it has its own handler: through ours too, every line came twice
    if not verbose:
        hub_logging.set_verbosity_error()


def escape_unencodable_output() -> None:
    """An answer the terminal cannot encode is escaped, not lost."""
    if not stdout_is_unicode() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def stdout_is_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def silence_stdout() -> None:
    """After a closed pipe (``| head``), so that Python's own flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured output in tests)
        pass
