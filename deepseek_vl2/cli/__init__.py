"""The ``deepseek-vl2`` command: subcommands, each registered by one ``add_command(subparsers)`` in COMMANDS.

Without a subcommand the arguments are ``ask``'s, so ``deepseek-vl2 --model_path ... --prompt ...``
works as it always has. Gradio is never imported here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import planner
from . import ask, quantize
from .serve import add_batch_command, add_serve_command
from .common import CliError, configure_hub_logging, silence_stdout

# Each adds its parser to the subparsers and sets ``run`` (args -> exit status) as its default.
COMMANDS = (ask.add_command, planner.add_command, quantize.add_command, add_serve_command, add_batch_command)
DEFAULT_COMMAND = "ask"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-vl2",
        description="Run a DeepSeek-VL2 model (tiny, small or base). Without a command, the arguments are ask's "
        "(deepseek-vl2 ask --help).",
        epilog=ask.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(verbose=False)  # for commands without --verbose
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _with_command(argv: list[str]) -> list[str]:
    """``argv`` with ``ask`` first when it starts with one of ask's options (or is empty), not a command."""
    if argv[:1] in (["-h"], ["--help"]) or (argv and not argv[0].startswith("-")):
        return argv
    return [DEFAULT_COMMAND, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one ``error:`` line), 1 a bug, 130 Ctrl-C, 141 a closed pipe."""
    args = build_parser().parse_args(_with_command(sys.argv[1:] if argv is None else list(argv)))
    try:
        configure_hub_logging(args.verbose)
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): generation stopped, nothing to report
        silence_stdout()
        return 141
    except (CliError, ValueError, TypeError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug, not bad input: still one line unless --verbose
        if args.verbose:
            raise
        print(f"error: unexpected {type(error).__name__}: {error} (run with --verbose for details)", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "build_parser", "main"]
