"""The ``deepseek-vl2`` command line (also ``python inference.py``): ask a model about images.

Imports stay light until a model is really needed, so ``--help`` never needs a GPU or Gradio.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys
import time
from pathlib import Path

DEMO_NOTICE = (
    "DEMO: this runs the whole pipeline on a small checkpoint built on this machine with RANDOM weights; "
    "its answers are gibberish by design. Pass --model_path for a real model."
)
EPILOG = """examples:
  deepseek-vl2 --demo
  deepseek-vl2 plan --model deepseek-ai/deepseek-vl2-small --gpu-memory 40GiB --images 2   (memory planner)
  deepseek-vl2 --model_path deepseek-ai/deepseek-vl2-tiny --image images/street.png --prompt "Describe the image."
  deepseek-vl2 --model_path ./deepseek-vl2-small --chunk_size 512 --image a.png --image b.png \\
      --prompt "<image> and <image>: what differs?"
  deepseek-vl2 --model_path deepseek-ai/deepseek-vl2-tiny --image images/shapes.png \\
      --prompt "<|ref|>the red circle<|/ref|>." --save_vis out.png --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-vl2",
        description="Answer a prompt about images with a DeepSeek-VL2 model (tiny, small or base).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model_path", help="hub id or local folder of a DeepSeek-VL2 checkpoint")
    parser.add_argument("--demo", action="store_true", help="use a built-in tiny checkpoint with random weights")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument(
        "--prompt", help="the question; <image> marks where each image goes (default: all images first)"
    )
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--chunk_size", type=int, default=-1, help="prefill in chunks of N tokens to save memory (-1: one pass)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=512, help="answer length limit (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.4, help="0 decodes greedily (default: %(default)s)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default: %(default)s)")
    parser.add_argument("--repetition_penalty", type=float, default=1.1, help="1 for none (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--dtype", help="bf16 (default), fp16 or fp32")
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print tokens as they come (default: when stdout is a terminal and without --json)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object: prompt, answer, boxes, timings")
    parser.add_argument("--save_vis", metavar="PATH", help="save the grounding overlay (one file per image with boxes)")
    parser.add_argument("--quiet", action="store_true", help="no timings or notices")
    parser.add_argument("--verbose", action="store_true", help="tracebacks and library logs")
    return parser


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


def _default_demo_image():
    from .chat import default_image_dir

    sample = default_image_dir() / "street.png"
    if sample.exists():
        return str(sample)
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), "skyblue")
    ImageDraw.Draw(image).rectangle((0, 300, 640, 480), fill="gray")
    return image


def _check_save_vis(save_vis: str) -> None:
    """Refuse an unusable --save_vis path up front: found after generation, it would cost the answer."""
    from PIL import Image

    path = Path(save_vis)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise CliError(f"--save_vis {save_vis}: give a file name with an image extension Pillow can write (out.png)")
    if path.is_dir():
        raise CliError(f"--save_vis {save_vis} is a folder; give an image file name such as out.png")
    folder = path.parent
    if not folder.is_dir():
        raise CliError(f"--save_vis {save_vis}: folder {folder} does not exist")


def _check_placeholders(prompt: str, image_count: int) -> None:
    """The processor checks this too, but only once the model is loaded (minutes for the big ones)."""
    placeholders = prompt.count("<image>")
    if placeholders and placeholders != image_count:
        raise CliError(f"--prompt has {placeholders} <image> placeholder(s) but {image_count} image(s) were given")


def _vis_paths(save_vis: str, count: int) -> list[Path]:
    path = Path(save_vis)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from transformers.utils import CONFIG_NAME

    from .chat import DeepseekVL2Chat, GenerationSettings, pick_device, pick_dtype
    from .grounding import draw_on_images
    from .utils.checkpoint import check_checkpoint_location
    from .utils.io import load_image

    if args.demo and args.model_path:
        raise CliError("give either --demo or --model_path, not both")
    if not args.demo and not args.model_path:
        raise CliError(
            "no model given: pass --model_path <hub id or folder> (e.g. deepseek-ai/deepseek-vl2-tiny; downloading "
            "needs network access), or --demo to run the built-in tiny checkpoint with random weights"
        )
    if args.chunk_size == 0 or args.chunk_size < -1:
        raise CliError(f"--chunk_size must be a positive number of tokens, or -1 for one full pass; got {args.chunk_size}")
    if args.system and "<image>" in args.system:
        raise CliError("--system contains <image>; images belong in the prompt")
    if args.json and args.stream:
        raise CliError("--stream and --json cannot be combined: the JSON object must be all of stdout")
    if args.save_vis:
        _check_save_vis(args.save_vis)
    if args.save_vis and not args.image and not args.demo:
        raise CliError("--save_vis needs an --image to draw on")
    pick_device(args.device)  # a typo in --device or --dtype fails now, not after loading the images
    pick_dtype(args.dtype)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        seed=args.seed,
    )
    if not args.demo:
        check_checkpoint_location(args.model_path, CONFIG_NAME)
    images = [load_image(image) for image in args.image]  # bad files fail here, before any model loads
    if args.demo:
        from .testing.checkpoints import demo_checkpoint

        if not args.quiet:
            print(DEMO_NOTICE, file=sys.stderr)
        model_path = demo_checkpoint("tiny")
        images = images or [load_image(_default_demo_image())]
    else:
        model_path = args.model_path
    prompt = args.prompt if args.prompt is not None else ("Describe this image." if images else "Hello!")
    _check_placeholders(prompt, len(images))

    started = time.perf_counter()
    chat = DeepseekVL2Chat.from_pretrained(
        model_path, device=args.device, dtype=args.dtype, chunk_size=None if args.chunk_size == -1 else args.chunk_size
    )
    load_s = time.perf_counter() - started

    stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
    result, streamed = None, False
    try:
        for piece in chat.stream(prompt, images=images, system=args.system, settings=settings):
            if isinstance(piece, str):
                if stream:
                    print(piece, end="", flush=True)
                    streamed = True
            else:
                result = piece
    finally:
        if streamed:  # also after Ctrl-C, so that the shell prompt or the error starts on its own line
            print(flush=True)
    if not stream and not args.json:
        print(result.answer, flush=True)

    saved = []
    if args.save_vis and result.grounding.objects:
        annotated = draw_on_images(result.images, result.grounding)
        changed = [image for image, original in zip(annotated, result.images) if image is not original]
        for image, path in zip(changed, _vis_paths(args.save_vis, len(changed))):
            image.save(path)
            saved.append(str(path))

    timings = {"load_s": load_s, **result.timings}
    if args.json:
        boxes = []
        image = result.images[-1] if result.images else None
        for obj in result.grounding.objects:
            entry = {"label": obj.label, "boxes_0_999": [[b.x1, b.y1, b.x2, b.y2] for b in obj.boxes]}
            if image is not None:
                entry["boxes_pixels"] = [list(b) for b in obj.pixel_boxes(*image.size)]
            boxes.append(entry)
        print(
            json.dumps(
                {
                    "model": str(model_path),
                    "demo_random_weights": bool(args.demo),
                    "prompt": result.prompt,
                    "answer": result.answer,
                    "text": result.text,
                    "boxes": boxes,
                    "grounding_problems": list(result.grounding.problems),
                    "saved_visualisations": saved,
                    "prompt_tokens": result.prompt_tokens,
                    "new_tokens": result.new_tokens,
                    "timings": timings,
                },
                ensure_ascii=not _stdout_is_unicode(),
            )
        )
    elif not args.quiet:
        for path in saved:
            print(f"saved grounding overlay: {path}", file=sys.stderr)
        if args.save_vis and not saved:
            print(f"no grounding boxes in the answer: nothing saved to {args.save_vis}", file=sys.stderr)
        print(
            f"[load {timings['load_s']:.2f}s | prefill {timings['prefill_s']:.2f}s for {result.prompt_tokens} tokens"
            f" | decode {result.new_tokens} tokens at {timings['tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def _configure_output(args: argparse.Namespace) -> None:
    """Library logs and progress bars as asked; an answer the terminal cannot encode is escaped, not lost."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    _configure_hub_logging(args.verbose)
    if not args.verbose:
        hf_logging.set_verbosity_error()
        if args.quiet or args.json:
            hf_logging.disable_progress_bar()
    if not _stdout_is_unicode() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def _configure_hub_logging(verbose: bool) -> None:
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.disable_propagation()  # it has its own handler: through ours too, every line came twice
    if not verbose:
        hub_logging.set_verbosity_error()  # offline, a hub id logged each of its retries


def _stdout_is_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def _silence_stdout() -> None:
    """After a closed pipe (``| head``), so that Python's own flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured output in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        from .planner import main as plan_main

        try:
            _configure_hub_logging(verbose=False)
            return plan_main(argv[1:])
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    try:
        _configure_output(args)
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): generation stopped, nothing to report
        _silence_stdout()
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


if __name__ == "__main__":
    sys.exit(main())
