"""How the server and the batch runner do, end to end, at a published variant's real dimensions.

Writes a checkpoint with the variant's real dimensions and random weights (nothing is downloaded),
then measures, each in its own process as a user runs it:

- ``serve``: time to first token (TTFT) and aggregate tokens/s with 1 and with 4 concurrent
  streaming clients (the official ``openai`` client, from the ``test`` extra), one image each;
- ``batch``: 16 requests through the batch runner, against 16 sequential runs of the CLI (each
  loading the model again), loading included.

    python benchmarks/serve_bench.py                                        # tiny, bf16, CPU (~8 GB RAM, ~7 GB disk)
    python benchmarks/serve_bench.py --dtype fp32 --layers 1 --requests 2 --new_tokens 4 --clients 1 2 \\
        --image_size 384x384                                                # a quick check that it runs

Results go to stdout and to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DTYPES, add_model_arguments, cpu_name, picture  # noqa: E402
from random_checkpoint import write_published_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"
PROMPTS = ("Describe this image in detail.", "What is in the picture?", "Read the text in the image.",
           "Count the objects in the image.")  # fmt: skip


def write_checkpoint(args: argparse.Namespace, folder: Path) -> None:
    """The random real-dims model written as a checkpoint folder (weights, config, tokenizer, processor)."""
    write_published_checkpoint(args.variant, args.layers, folder, DTYPES[args.dtype])


def write_images(args: argparse.Namespace, folder: Path) -> list[Path]:
    width, height = args.image_size
    paths = []
    for index in range(args.requests):
        path = folder / f"image-{index:02d}.png"
        picture(width, height, seed=index).save(path)
        paths.append(path)
    return paths


def run_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def loading_options(args: argparse.Namespace, checkpoint: Path) -> list[str]:
    return ["--model_path", str(checkpoint), "--dtype", args.dtype, "--device", args.device]


# ---------------------------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, checkpoint: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "deepseek_vl2.cli", "serve", *loading_options(args, checkpoint),
               "--port", str(port), "--served-model-name", MODEL]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env=run_env(), stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server ended with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def stream_one(client, image: Path, prompt: str, new_tokens: int) -> dict:
    """One streaming request: seconds to the first token and to the end, and the tokens generated."""
    started = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, max_tokens=new_tokens, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": prompt}]}],
    )  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        usage = chunk.usage or usage
    finished = time.perf_counter()
    return {"ttft_s": (first or finished) - started, "total_s": finished - started, "tokens": usage.completion_tokens}


def concurrent_clients(url: str, images: list[Path], clients: int, new_tokens: int) -> dict:
    """``clients`` streaming requests at once: their TTFTs, and all their tokens over the wall time."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        runs = list(pool.map(lambda i: stream_one(client, images[i % len(images)], PROMPTS[i % len(PROMPTS)],
                                                  new_tokens), range(clients)))  # fmt: skip
    wall = time.perf_counter() - started
    ttfts = [run["ttft_s"] for run in runs]
    tokens = sum(run["tokens"] for run in runs)
    return {"clients": clients, "ttft_mean_s": sum(ttfts) / clients, "ttft_max_s": max(ttfts), "tokens": tokens,
            "wall_s": wall, "aggregate_tokens_per_s": tokens / wall}  # fmt: skip


def serve_figures(args: argparse.Namespace, checkpoint: Path, images: list[Path]) -> list[dict]:
    """Each measured request shows an image the server has not seen, so that reuse across requests does not
    make a run look faster than a fresh request is."""
    server, url = start_server(args, checkpoint)
    try:
        concurrent_clients(url, images[-1:], 1, 2)  # untimed: first-call set-up, on an image no run shows
        rows, first = [], 0
        for clients in args.clients:
            rows.append(concurrent_clients(url, images[first : first + clients], clients, args.new_tokens))
            first += clients
        return rows
    finally:
        server.terminate()
        server.wait()


# ---------------------------------------------------------------------------------------------- batch


def batch_figures(args: argparse.Namespace, checkpoint: Path, images: list[Path], folder: Path) -> dict:
    """The batch runner on all requests, against the CLI once per request; wall time from the command line."""
    requests, results = folder / "requests.jsonl", folder / "results.jsonl"
    command = [sys.executable, "-m", "deepseek_vl2.cli", "batch", *loading_options(args, checkpoint),
               "--served-model-name", MODEL, "--images", str(folder / "images"), "--prompt", PROMPTS[0],
               "--max-tokens", str(args.new_tokens), "--temperature", "0", "--no-progress",
               str(requests), str(results)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=run_env(), check=True, stderr=subprocess.DEVNULL)
    batch_s = time.perf_counter() - started
    answered = [json.loads(line) for line in results.read_text().splitlines()]
    batch_tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in answered)

    started, cli_tokens = time.perf_counter(), 0
    for image in images:
        command = [sys.executable, str(ROOT / "inference.py"), *loading_options(args, checkpoint), "--image",
                   str(image), "--prompt", PROMPTS[0], "--max_new_tokens", str(args.new_tokens), "--greedy",
                   "--json"]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, env=run_env(), check=True, capture_output=True, text=True)
        cli_tokens += json.loads(done.stdout)["new_tokens"]
    cli_s = time.perf_counter() - started
    return {"requests": len(images), "batch_s": batch_s, "batch_tokens": batch_tokens, "cli_s": cli_s,
            "cli_tokens": cli_tokens, "speedup": cli_s / batch_s}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give WIDTHxHEIGHT, e.g. 1024x768, not {text!r}") from None
    return width, height


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=16, help="requests of the batch comparison")
    parser.add_argument("--new_tokens", type=int, default=32, help="max tokens per answer")
    parser.add_argument("--image_size", type=image_size, default=(1024, 768), help="WIDTHxHEIGHT of each image")
    parser.add_argument("--parts", nargs="+", choices=["serve", "batch"], default=["serve", "batch"])
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: a temp folder)")
    parser.add_argument(
        "--output", type=Path, default=None,
        help="JSON file (default: benchmarks/results-serve-<variant>-<device>-<dtype>.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.requests, args.new_tokens, *args.clients) < 1:
        parser.error("--clients, --requests and --new_tokens must be at least 1")
    if args.requests < sum(args.clients) + 1:
        parser.error("--requests must be at least the sum of --clients plus one: each served request shows its own image")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = Path(work)
        checkpoint = folder / "checkpoint"
        started = time.perf_counter()
        write_checkpoint(args, checkpoint)
        print(f"{args.variant} ({args.layers or 'all'} layers, {args.dtype}) written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        (folder / "images").mkdir()
        images = write_images(args, folder / "images")
        serve = serve_figures(args, checkpoint, images) if "serve" in args.parts else []
        for row in serve:
            print(f"serve, {row['clients']} client(s): TTFT mean {row['ttft_mean_s']:.2f} s, max "
                  f"{row['ttft_max_s']:.2f} s; {row['aggregate_tokens_per_s']:.2f} tokens/s in all", flush=True)
        batch = batch_figures(args, checkpoint, images, folder) if "batch" in args.parts else None
        if batch:
            print(f"{batch['requests']} requests: batch runner {batch['batch_s']:.1f} s, {batch['requests']} CLI "
                  f"runs {batch['cli_s']:.1f} s ({batch['speedup']:.1f}x)", flush=True)  # fmt: skip
    report = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "serve": serve,
        "batch": batch,
    }  # fmt: skip
    output = args.output or Path(__file__).parent / f"results-serve-{args.variant}-{args.device}-{args.dtype}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {output}")
    return report


if __name__ == "__main__":
    main()
