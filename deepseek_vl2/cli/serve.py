"""``deepseek-vl2 serve`` (an OpenAI-compatible server) and ``deepseek-vl2 batch`` (OpenAI batch files).

Their code needs the ``serve`` extra (FastAPI, uvicorn); it is imported only when one of them runs.
"""

from __future__ import annotations

import argparse

from ..options import add_loading_options, add_reuse_options
from ..server.options import add_batch_arguments, add_serve_arguments


def add_serve_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible server (POST /v1/chat/completions)",
        description="Serve the model behind OpenAI's chat-completions API on 127.0.0.1 (needs the [serve] extra).",
    )
    add_loading_options(parser)
    add_reuse_options(parser)
    add_serve_arguments(parser)
    parser.set_defaults(run=_serve)


def add_batch_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="answer an OpenAI batch file (the format vLLM's run_batch reads)",
        description="Answer every request of an OpenAI batch file, appending results; a re-run skips those done.",
    )
    add_loading_options(parser)
    add_reuse_options(parser)
    add_batch_arguments(parser)
    parser.set_defaults(run=_batch)


def _serve(args: argparse.Namespace) -> int:
    from ..server.serve import serve_main

    return serve_main(args)


def _batch(args: argparse.Namespace) -> int:
    from ..server.batch import batch_main

    return batch_main(args)
