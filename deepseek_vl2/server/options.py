"""The options of ``deepseek-vl2 serve`` and ``deepseek-vl2 batch`` besides the model's loading options.

Only argparse here: the command line lists them without importing FastAPI, uvicorn or pydantic (the
``serve`` extra), which the commands import when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MAX_QUEUE = 32  # requests waiting for the model, the running one not counted


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own options (the model's loading options are added by the caller)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: no key)")
    parser.add_argument(
        "--served-model-name", help="the model's name in requests and /v1/models (default: hub id, folder name or demo)"
    )
    add_media_arguments(parser)
    parser.add_argument(
        "--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait for the model; more get 503"
    )


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allowed-local-media-path", metavar="DIR", type=Path, help="serve file:// image URLs from under DIR only"
    )
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public addresses only)"
    )


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch runner's own options (the model's loading options are added by the caller)."""
    parser.add_argument("input", type=Path, metavar="INPUT.jsonl", help="OpenAI batch file (made first with --images)")
    parser.add_argument("output", type=Path, metavar="OUTPUT.jsonl", help="results, appended; a re-run skips done ones")
    parser.add_argument(
        "--served-model-name", help="the model name requests must give (default: hub id, folder name or demo)"
    )
    add_media_arguments(parser)
    parser.add_argument("--images", type=Path, metavar="DIR", help="make INPUT.jsonl: one request per image in DIR")
    parser.add_argument("--prompt", help="with --images: the question asked about every image")
    parser.add_argument("--max-tokens", type=int, help="with --images: the answer length limit")
    parser.add_argument("--temperature", type=float, help="with --images: 0 for greedy answers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
