"""The model behind ``serve`` and ``batch``, loaded with the command line's shared loading options."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..chat import DeepseekVL2Chat
from ..options import loading_options, reuse_options

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"


def default_model_name(args: argparse.Namespace) -> str:
    """What /v1/models lists: the hub id as given, a local folder's name, or 'demo'."""
    if args.demo:
        return DEMO_MODEL_NAME
    folder = Path(args.model_path).expanduser()
    return folder.resolve().name if folder.is_dir() else args.model_path


def check_model_options(args: argparse.Namespace) -> dict:
    """``from_pretrained``'s loading and reuse arguments for the flags; ValueError, before anything loads, if
    they cannot work. Reuse keeps the prompt caches and image features of earlier requests, so a client's
    follow-up turn (or another question about the same image) prefills only what is new."""
    if args.demo == bool(args.model_path):
        raise ValueError("give --model_path <hub id or folder>, or --demo (random weights), not both")
    return {**loading_options(args), **reuse_options(args)}


def load_chat(args: argparse.Namespace, options: dict) -> DeepseekVL2Chat:
    """The chat for ``--model_path`` or ``--demo``, loaded with ``options`` from :func:`check_model_options`."""
    if args.demo:
        from ..testing.checkpoints import demo_checkpoint

        logger.warning("--demo: a small checkpoint with RANDOM weights; its answers are gibberish by design")
        return DeepseekVL2Chat.from_pretrained(demo_checkpoint("tiny"), **options)
    return DeepseekVL2Chat.from_pretrained(args.model_path, **options)
