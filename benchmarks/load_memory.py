"""Resident memory after ``from_pretrained`` at a variant's real dimensions, against the weights' size.

Writes a random-weight checkpoint in the published layout once (``--folder``, kept for later runs), then
loads it in a fresh process per mode and reads /proc/self/status: resident memory, split into anonymous
and file-backed pages, and the peak. ``packed`` is what loading does (the decoder's weights packed for
oneDNN where this CPU has native bf16: ``models.packed``); ``owned`` leaves them in PyTorch's layout;
``mapped`` also skips the copy that gives the weights their own memory and the release of the pages
read, to show what they save (Linux only).

    python benchmarks/load_memory.py                     # tiny, bf16: writes ~6.7 GB once
    python benchmarks/load_memory.py --variant tiny --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench
import random_checkpoint

from deepseek_vl2.models.packed import PACKING_ENV
from deepseek_vl2.testing.published import VARIANTS

GIB = 2**30

LOAD = """
import json, sys, time
import torch
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, modeling
from deepseek_vl2.utils import checkpoint
if sys.argv[2] == "mapped":
    modeling.own_mapped_weights = lambda model: None
    checkpoint.release_checkpoint_pages = lambda: None
start = time.perf_counter()
model = DeepseekVLV2ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = {key: int(status[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": seconds, "weights": weights, **kib}))
"""


def measure(folder: Path, mode: str) -> dict:
    command = [sys.executable, "-c", LOAD, str(folder), mode]
    environment = {**os.environ, PACKING_ENV: "1" if mode == "packed" else "0"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return {"mode": mode, **json.loads(result.stdout.strip().splitlines()[-1])}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--folder", type=Path, default=None, help="checkpoint folder (default: under ~/.cache)")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        parser.error("reads /proc/self/status: Linux only")
    folder = random_checkpoint.write_published_checkpoint(
        args.variant, args.layers, args.folder or random_checkpoint.cache_folder(args.variant, args.layers, "bf16")
    )
    print(f"{bench.cpu_name()}, torch {torch.__version__}")
    rows = [measure(folder, mode) for mode in ("packed", "owned", "mapped")]
    print("| mode | weights GiB | RSS GiB | anonymous | file-backed | peak RSS | RSS / weights | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['weights'] / GIB:.2f} | {row['VmRSS'] / GIB:.2f} | {row['RssAnon'] / GIB:.2f} | "
              f"{row['RssFile'] / GIB:.2f} | {row['VmHWM'] / GIB:.2f} | {row['VmRSS'] / row['weights']:.2f} | "
              f"{row['load_s']:.1f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
