"""``python -m deepseek_vl2.server serve|batch ...``: the server and the batch runner on their own."""

from __future__ import annotations

import argparse
import sys

from .batch import add_batch_arguments, batch_main
from .loading import add_loading_arguments
from .serve import add_serve_arguments, serve_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_vl2.server", description="DeepSeek-VL2 behind OpenAI's chat-completions API."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="the OpenAI-compatible server")
    add_loading_arguments(serve)
    add_serve_arguments(serve)
    serve.set_defaults(main=serve_main)
    batch = commands.add_parser("batch", help="run an OpenAI batch file (as vLLM's run_batch)")
    add_loading_arguments(batch)
    add_batch_arguments(batch)
    batch.set_defaults(main=batch_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
