"""``serve``: the OpenAI-compatible server on uvicorn, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from .loading import check_model_options, default_model_name, load_chat
from .media import MediaPolicy

logger = logging.getLogger(__name__)


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
        options = check_model_options(args)
        if args.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
        media = media_policy(args)
        sock = bind(args.host, args.port)
        chat = load_chat(args, options)
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
