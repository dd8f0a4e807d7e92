"""Minimal model-loading options for ``python -m deepseek_vl2.server``.

A stand-in: the ``deepseek-vl2`` command's shared loading options (``--model_path``/``--demo``,
``--device``, ``--dtype``, ``--chunk_size``, ``--device_map`` ...) replace it when ``serve`` and
``batch`` become subcommands there.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..chat import DeepseekVL2Chat, pick_device, pick_dtype

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", help="hub id or local folder of a DeepSeek-VL2 checkpoint")
    parser.add_argument("--demo", action="store_true", help="the built-in tiny checkpoint with random weights")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--dtype", help="bf16 (default), fp16 or fp32")


def check_loading_arguments(args: argparse.Namespace) -> None:
    """ValueError for options that cannot load a model, found before anything is loaded."""
    if args.demo == bool(args.model_path):
        raise ValueError("give --model_path <hub id or folder>, or --demo (random weights), not both")
    pick_device(args.device)
    pick_dtype(args.dtype)


def default_model_name(args: argparse.Namespace) -> str:
    """What /v1/models lists: the hub id as given, a local folder's name, or 'demo'."""
    if args.demo:
        return DEMO_MODEL_NAME
    folder = Path(args.model_path).expanduser()
    return folder.resolve().name if folder.is_dir() else args.model_path


def load_chat(args: argparse.Namespace) -> DeepseekVL2Chat:
    if args.demo:
        from ..testing.checkpoints import demo_checkpoint

        logger.warning("--demo: a small checkpoint with RANDOM weights; its answers are gibberish by design")
        return DeepseekVL2Chat.from_pretrained(demo_checkpoint("tiny"), device=args.device, dtype=args.dtype)
    return DeepseekVL2Chat.from_pretrained(args.model_path, device=args.device, dtype=args.dtype)
