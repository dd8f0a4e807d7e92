"""Chat with a DeepSeek-VL2 model in the browser (Gradio 6).

    python web_demo.py --model_name deepseek-ai/deepseek-vl2-tiny
    python web_demo.py --demo            # a built-in tiny checkpoint with random weights, no download

The page is served on 127.0.0.1 only, and never through a public share link unless --share is given.
Needs the optional Gradio extra: pip install -e ".[gradio]".
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

IMAGES_DIR = Path(__file__).resolve().parent / "images"  # the examples: next to this file, not the cwd
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
    parser = argparse.ArgumentParser(description="Chat with a DeepSeek-VL2 model (tiny, small or base) in the browser.")
    parser.add_argument("--model_name", help="hub id (e.g. deepseek-ai/deepseek-vl2-tiny) or local checkpoint folder")
    parser.add_argument("--local_path", help="read the weights from this folder instead (--model_name stays the label)")
    parser.add_argument("--demo", action="store_true", help="use a built-in tiny checkpoint with random weights")
    parser.add_argument(
        "--host", "--ip", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=37913)
    parser.add_argument("--share", action="store_true", help="also open a PUBLIC Gradio share link (off by default)")
    parser.add_argument("--root_path", help="URL prefix when served behind a proxy")
    parser.add_argument(
        "--chunk_size", type=int, default=-1, help="prefill in chunks of N tokens to save memory (-1: one pass)"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--dtype", help="bf16 (default), fp16 or fp32")
    parser.add_argument(
        "--delete_cache", nargs=2, type=int, metavar=("EVERY_S", "AGE_S"),
        help="every EVERY_S seconds, delete uploads and overlays older than AGE_S seconds "
        "(default: 3600 86400, hourly, those older than a day)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo == bool(args.model_name or args.local_path):
        parser.error("give --model_name (or --local_path) for a real model, or --demo, not both")
    if args.chunk_size == 0 or args.chunk_size < -1:
        parser.error(f"--chunk_size must be a positive number of tokens, or -1 for one pass; got {args.chunk_size}")
    if args.delete_cache and min(args.delete_cache) <= 0:
        every_s, age_s = args.delete_cache
        parser.error(f"--delete_cache takes two positive numbers of seconds; got {every_s} {age_s}")
    try:
        import gradio  # noqa: F401  (only to say clearly what is missing)
    except ImportError:
        print(
            'web_demo.py needs Gradio 6: pip install -e ".[gradio]"  (or: pip install "gradio>=6,<7")', file=sys.stderr
        )
        return 1

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    from deepseek_vl2.chat import DeepseekVL2Chat
    from deepseek_vl2.web.app import ChatApp, launch

    if args.demo:
        from deepseek_vl2.testing.checkpoints import demo_checkpoint

        model_path, model_name, notice = demo_checkpoint("tiny"), "built-in tiny demo (random weights)", DEMO_NOTICE
    else:
        model_path, model_name, notice = args.local_path or args.model_name, args.model_name or args.local_path, None
    chunk_size = None if args.chunk_size == -1 else args.chunk_size
    try:  # bad input (a busy port, a missing folder) is one line naming it, as in the CLI
        check_address(args.host, args.port)
        chat = DeepseekVL2Chat.from_pretrained(model_path, device=args.device, dtype=args.dtype, chunk_size=chunk_size)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.share:
        logging.warning("--share: anyone with the link can use this model and see what is uploaded")
    cache_policy = {"delete_cache": tuple(args.delete_cache)} if args.delete_cache else {}
    app = ChatApp(chat, model_name=model_name, notice=notice, examples_dir=IMAGES_DIR, **cache_policy)
    try:
        launch(app, host=args.host, port=args.port, share=args.share, root_path=args.root_path)
    except OSError as error:  # the port was taken since it was checked
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
