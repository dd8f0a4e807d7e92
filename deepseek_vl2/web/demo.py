"""The web demo's command line: flags, the address check, loading the model, serving the page.

    python -m deepseek_vl2.web --model_name deepseek-ai/deepseek-vl2-tiny   (or python web_demo.py ...)
    python -m deepseek_vl2.web --demo            # a built-in tiny checkpoint with random weights, no download

The page is served on 127.0.0.1 only, and never through a public share link unless --share is given.
Gradio (the optional extra: pip install -e ".[gradio]") is imported only once the flags are checked.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from ..chat import DeepseekVL2Chat, default_image_dir
from ..options import add_loading_options, add_reuse_options, loading_options, reuse_options

DEMO_NOTICE = (
    "Demo mode: a small checkpoint built on this machine with RANDOM weights answers here, so its answers "
    "are gibberish by design. Start with --model_name for a real model."
)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {port}")
    return port


def check_address(host: str, port: int) -> None:
    """Raise OSError, naming the address, when the page could not be served there.

    Checked before the model loads: a busy port or a mistyped host should cost a second, not the
    minutes that loading the weights takes.
    """
    bare_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1] as in a URL
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare_host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will bind
            probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"cannot serve the page on {host}:{port}: {reason} (choose another --port or --host)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_vl2.web",
        description="Chat with a DeepSeek-VL2 model (tiny, small or base) in the browser.",
    )
    add_loading_options(parser, "--model_name")
    add_reuse_options(parser)
    parser.add_argument("--local_path", help="read the weights from this folder instead (--model_name stays the label)")
    parser.add_argument(
        "--host", "--ip", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=37913)
    parser.add_argument("--share", action="store_true", help="also open a PUBLIC Gradio share link (off by default)")
    parser.add_argument("--root_path", help="URL prefix when served behind a proxy")
    parser.add_argument(
        "--delete_cache", nargs=2, type=int, metavar=("EVERY_S", "AGE_S"),
        help="every EVERY_S seconds, delete uploads and overlays older than AGE_S seconds "
        "(default: 3600 86400, hourly, those older than a day)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo == bool(args.model_path or args.local_path):
        parser.error("give --model_name (or --local_path) for a real model, or --demo, not both")
    try:
        loading = {**loading_options(args), **reuse_options(args)}
    except ValueError as error:
        parser.error(str(error))
    if args.delete_cache and min(args.delete_cache) <= 0:
        every_s, age_s = args.delete_cache
        parser.error(f"--delete_cache takes two positive numbers of seconds; got {every_s} {age_s}")
    try:
        import gradio  # noqa: F401  (only to say clearly what is missing)
    except ImportError:
        print(
            'the web demo needs Gradio 6: pip install -e ".[gradio]"  (or: pip install "gradio>=6,<7")', file=sys.stderr
        )
        return 1

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    from .app import ChatApp, launch

    if args.demo:
        from ..testing.checkpoints import demo_checkpoint

        model_path, model_name, notice = demo_checkpoint("tiny"), "built-in tiny demo (random weights)", DEMO_NOTICE
    else:
        model_path, model_name, notice = args.local_path or args.model_path, args.model_path or args.local_path, None
    try:  # bad input (a busy port, a missing folder) is one line naming it, as in the CLI
        check_address(args.host, args.port)
        chat = DeepseekVL2Chat.from_pretrained(model_path, **loading)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.share:
        logging.warning("--share: anyone with the link can use this model and see what is uploaded")
    cache_policy = {"delete_cache": tuple(args.delete_cache)} if args.delete_cache else {}
    app = ChatApp(chat, model_name=model_name, notice=notice, examples_dir=default_image_dir(), **cache_policy)
    try:
        launch(app, host=args.host, port=args.port, share=args.share, root_path=args.root_path)
    except OSError as error:  # the port was taken since it was checked
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
