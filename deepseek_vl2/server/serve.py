"""``serve``: the OpenAI-compatible server on uvicorn, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from .engine import MAX_QUEUE
from .loading import check_loading_arguments, default_model_name, load_chat
from .media import MediaPolicy

logger = logging.getLogger(__name__)


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


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    return MediaPolicy(local_root=args.allowed_local_media_path, allow_remote=args.allow_remote_images)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so a busy port or a bad host fails before the model loads."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ValueError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve_main(args: argparse.Namespace) -> int:
    """Bind, load the model, serve until Ctrl-C; 2 (with one error line) for bad options."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_loading_arguments(args)
        if args.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
        media = media_policy(args)
        sock = bind(args.host, args.port)
        chat = load_chat(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.served_model_name or default_model_name(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach it can use the model", args.host)
    app = create_app(chat, name, args.api_key, media=media, max_queue=args.max_queue)
    logger.info("serving %r on http://%s:%d/v1", name, args.host, sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False)).run(sockets=[sock])
    return 0
