"""``deepseek-vl2 ask`` (also the bare ``deepseek-vl2`` and ``python inference.py``): ask a model about images."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transformers.utils import CONFIG_NAME

from ..chat import DeepseekVL2Chat, GenerationSettings, default_image_dir
from ..models.conversation import IMAGE_TOKEN
from ..options import add_loading_options, loading_options
from ..utils.checkpoint import check_checkpoint_location
from ..utils.io import load_image
from .common import CliError, configure_logging, escape_unencodable_output, stdout_is_unicode

DEMO_NOTICE = (
    "DEMO: this runs the whole pipeline on a small checkpoint built on this machine with RANDOM weights; "
    "its answers are gibberish by design. Pass --model_path for a real model."
)
EPILOG = """examples:
  deepseek-vl2 --demo
  deepseek-vl2 plan --model deepseek-ai/deepseek-vl2-small --gpu-memory 40GiB --images 2   (memory planner)
  deepseek-vl2 --model_path deepseek-ai/deepseek-vl2-tiny --image images/street.png --prompt "Describe the image."
  deepseek-vl2 ask --model_path ./deepseek-vl2-small --chunk_size 512 --image a.png --image b.png \\
      --prompt "<image> and <image>: what differs?"
  deepseek-vl2 --model_path deepseek-ai/deepseek-vl2-tiny --image images/shapes.png \\
      --prompt "<|ref|>the red circle<|/ref|>." --save_vis out.png --json
  deepseek-vl2 --model_path ./deepseek-vl2-small --device_map auto --max_memory 0=22GiB,cpu=48GiB \\
      --offload_folder offload --image a.png   (a GPU smaller than the model: as deepseek-vl2 plan advises)
"""


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``deepseek-vl2 ask``, the default command: one prompt, one answer."""
    parser = subparsers.add_parser(
        "ask",
        help="answer a prompt about images (the default command)",
        description="Answer a prompt about images with a DeepSeek-VL2 model (tiny, small or base).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loading_options(parser)
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument(
        "--prompt", help="the question; <image> marks where each image goes (default: all images first)"
    )
    parser.add_argument("--system", help="system prompt")
    defaults = GenerationSettings()
    parser.add_argument(
        "--max_new_tokens", type=int, default=defaults.max_new_tokens, help="answer length limit (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="0 decodes greedily (default: %(default)s)"
    )
    parser.add_argument(
        "--top_p", type=float, default=defaults.top_p, help="nucleus sampling, in (0, 1] (default: %(default)s)"
    )
    parser.add_argument(
        "--repetition_penalty",
        type=float,
        default=defaults.repetition_penalty,
        help="1 for none (default: %(default)s)",
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
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
    parser.set_defaults(run=run)


def _default_demo_image():
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
    placeholders = prompt.count(IMAGE_TOKEN)
    if placeholders and placeholders != image_count:
        raise CliError(f"--prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {image_count} image(s) were given")


def _vis_paths(save_vis: str, count: int) -> list[Path]:
    path = Path(save_vis)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose, progress_bars=not (args.quiet or args.json))
    escape_unencodable_output()
    if args.demo and args.model_path:
        raise CliError("give either --demo or --model_path, not both")
    if not args.demo and not args.model_path:
        raise CliError(
            "no model given: pass --model_path <hub id or folder> (e.g. deepseek-ai/deepseek-vl2-tiny; downloading "
            "needs network access), or --demo to run the built-in tiny checkpoint with random weights"
        )
    if args.system and IMAGE_TOKEN in args.system:
        raise CliError(f"--system contains {IMAGE_TOKEN}; images belong in the prompt")
    if args.json and args.stream:
        raise CliError("--stream and --json cannot be combined: the JSON object must be all of stdout")
    if args.save_vis:
        _check_save_vis(args.save_vis)
    if args.save_vis and not args.image and not args.demo:
        raise CliError("--save_vis needs an --image to draw on")
    loading = loading_options(args)  # a typo in --device, --dtype or --max_memory fails now, before the images load
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
        from ..testing.checkpoints import demo_checkpoint

        if not args.quiet:
            print(DEMO_NOTICE, file=sys.stderr)
        model_path = demo_checkpoint("tiny")
        images = images or [load_image(_default_demo_image())]
    else:
        model_path = args.model_path
    prompt = args.prompt if args.prompt is not None else ("Describe this image." if images else "Hello!")
    _check_placeholders(prompt, len(images))

    started = time.perf_counter()
    chat = DeepseekVL2Chat.from_pretrained(model_path, **loading, reuse=False)  # one prompt: nothing to reuse
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
    if args.save_vis:
        overlays = result.grounding_overlays()
        for image, path in zip(overlays, _vis_paths(args.save_vis, len(overlays))):
            image.save(path)
            saved.append(str(path))

    timings = {"load_s": load_s, **result.timings}
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(model_path),
                    "demo_random_weights": bool(args.demo),
                    "prompt": result.prompt,
                    "answer": result.answer,
                    "text": result.text,
                    **result.grounding_json(),
                    "saved_visualisations": saved,
                    "prompt_tokens": result.prompt_tokens,
                    "new_tokens": result.new_tokens,
                    "timings": timings,
                },
                ensure_ascii=not stdout_is_unicode(),
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
