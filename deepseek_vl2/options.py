"""The command-line options of every command that loads a model: ``deepseek-vl2``, its subcommands, the web demo.

The loading flags are named as ``DeepseekVL2Chat.from_pretrained``'s keyword arguments, so that
``loading_options`` turns parsed flags into those arguments and ``loading_flags`` turns arguments
(the planner's advice) back into flags.
"""

from __future__ import annotations

import argparse

from .quantization.config import SHORT_FORMS
from .utils.checks import check_chunk_size, check_reuse, pick_dtype, pick_placement
from .utils.sizes import MAX_MEMORY_EXAMPLE, format_max_memory, parse_bytes, parse_max_memory

ONE_PASS = -1  # --chunk_size for one full prefill (None in Python)
# from_pretrained's keyword arguments, each set by the flag of the same name
LOADING_OPTIONS = ("device", "dtype", "chunk_size", "device_map", "max_memory", "offload_folder", "quantization")
MODEL_HELP = "hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or local folder of a DeepSeek-VL2 checkpoint"


def add_model_option(parser: argparse.ArgumentParser, *aliases: str, required: bool = False, help: str = MODEL_HELP):
    """``--model_path`` (also ``--model``, and any ``aliases``), read as ``args.model_path``."""
    parser.add_argument(
        "--model_path", "--model", *aliases, dest="model_path", metavar="PATH", required=required, help=help
    )


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", help="bf16 (default), fp16 or fp32")


def add_loading_options(parser: argparse.ArgumentParser, *model_aliases: str) -> None:
    """The model (``--model_path`` or ``--demo``) and how to load it, in a group of their own."""
    group = parser.add_argument_group("model and loading")
    add_model_option(group, *model_aliases)
    group.add_argument("--demo", action="store_true", help="use a built-in tiny checkpoint with random weights")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    add_dtype_option(group)
    group.add_argument(
        "--chunk_size", type=int, default=ONE_PASS, help="prefill in chunks of N tokens to save memory (-1: one pass)"
    )
    group.add_argument(
        "--device_map",
        help="auto: spread the model over the GPUs, then CPU RAM, then --offload_folder (or a device, e.g. cuda:1); "
        "see deepseek-vl2 plan",
    )
    group.add_argument(
        "--max_memory",
        metavar="DEVICE=SIZE,...",
        help=f"with --device_map: memory per device, e.g. {MAX_MEMORY_EXAMPLE} (GPU indexes, cpu, disk)",
    )
    group.add_argument("--offload_folder", metavar="DIR", help="with --device_map: folder for weights that fit nowhere")
    group.add_argument(
        "--quantization",
        "--quantize",
        choices=tuple(SHORT_FORMS),
        help="quantize the decoder's weights while loading: int8 (half of bf16) or int4 (a quarter); "
        "on CUDA an unmeasured fallback",
    )


def loading_options(args: argparse.Namespace) -> dict:
    """``from_pretrained``'s loading arguments for the parsed flags, checked now, before anything loads."""
    options = {name: getattr(args, name) for name in LOADING_OPTIONS}
    options["chunk_size"] = None if args.chunk_size == ONE_PASS else check_chunk_size(args.chunk_size, "--chunk_size")
    options["max_memory"] = None if args.max_memory is None else parse_max_memory(args.max_memory)
    pick_dtype(args.dtype)
    pick_placement(args.device, args.device_map, options["max_memory"], args.offload_folder)
    return options


def loading_flags(**options) -> list[str]:
    """The flags that give ``from_pretrained`` these loading arguments (None: left out), as a user types them."""
    unknown = sorted(options.keys() - set(LOADING_OPTIONS))
    if unknown:
        raise TypeError(f"not a loading option: {', '.join(unknown)} (they are {', '.join(LOADING_OPTIONS)})")
    flags = []
    for name, value in options.items():
        if value is not None:
            flags += [f"--{name}", format_max_memory(value) if name == "max_memory" else str(value)]
    return flags


def add_reuse_options(parser: argparse.ArgumentParser) -> None:
    """``--no-reuse`` and ``--reuse_budget``: what a multi-turn chat keeps between turns (``DeepseekVL2Chat``'s
    ``reuse`` and ``reuse_budget``)."""
    group = parser.add_argument_group("reuse across turns")
    group.add_argument(
        "--no-reuse", dest="reuse", action="store_false",
        help="prefill every turn's whole conversation and encode its images again (no kept caches)",
    )  # fmt: skip
    group.add_argument(
        "--reuse_budget", metavar="SIZE",
        help="memory for the prompt caches and image features kept between turns, e.g. 2GiB "
        "(default: the reuse line of deepseek-vl2 plan; 0: no reuse)",
    )  # fmt: skip


def reuse_options(args: argparse.Namespace) -> dict:
    """``from_pretrained``'s ``reuse`` and ``reuse_budget`` for the parsed flags, checked."""
    budget = args.reuse_budget
    if budget is not None:
        budget = 0 if budget.strip() == "0" else parse_bytes(budget)
    return {"reuse": args.reuse, "reuse_budget": check_reuse(args.reuse, budget, "--reuse_budget")}
