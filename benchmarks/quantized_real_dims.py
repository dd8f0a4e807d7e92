"""Small and base at their real dimensions on this machine, quantized: load, peak memory, one image prompt.

The checkpoint has random weights and is written once under ~/.cache/deepseek_vl2: in the published
bfloat16 layout, quantized while loading as a user would (``--source float``, the default), or already
quantized (``--source quantized``; base's bf16 checkpoint would take 55 GB of disk). A fresh process then
loads it with ``from_pretrained`` and answers bench.py's one-image prompt (1024x768, greedy), reporting
load time, resident memory after loading and its peak, the prompt's peak, TTFT and decode tokens/s.

    python benchmarks/quantized_real_dims.py --variant small --quantize int8                     # ~32 GB written once
    python benchmarks/quantized_real_dims.py --variant base --quantize int4 --source quantized   # ~15 GB written once
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench
import random_checkpoint

from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.config import SHORT_FORMS
from deepseek_vl2.testing.published import VARIANTS

GIB = 2**30
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    """This process's resident memory figures from /proc/self/status, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in STATUS_FIELDS}


def checkpoint_folder(args: argparse.Namespace) -> Path:
    if args.source == "float":
        folder = random_checkpoint.cache_folder(args.variant, args.layers, "bf16")
        return random_checkpoint.write_published_checkpoint(args.variant, args.layers, folder)
    folder = random_checkpoint.cache_folder(args.variant, args.layers, args.quantize)
    quantization = DeepseekVL2QuantizationConfig.from_short_form(args.quantize)
    return random_checkpoint.write_quantized_checkpoint(args.variant, args.layers, folder, quantization)


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """Run in the child process: load ``folder``, then answer the one-image prompt."""
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    quantization = args.quantize if args.source == "float" else None
    start = time.perf_counter()
    model = DeepseekVLV2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization=quantization)
    loaded = {"load_s": time.perf_counter() - start, **{f"loaded_{k}": v for k, v in status().items()}}
    loaded["stored_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    processor = DeepseekVLV2Processor.from_pretrained(folder)
    inputs = bench.workload(processor, "one_image", 1, 0)
    generation = argparse.Namespace(new_tokens=args.new_tokens)
    row, _ = bench.run(model, processor, inputs, generation, torch.device("cpu"), None)
    return {**loaded, **row}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="small")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--quantize", choices=tuple(SHORT_FORMS), default="int8")
    parser.add_argument("--source", choices=("float", "quantized"), default="float",
                        help="checkpoint written in bf16 and quantized on load, or written quantized")  # fmt: skip
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens generated (at least 2)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: benchmarks/results-...)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        parser.error("reads /proc/self/status: Linux only")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return {}
    folder = checkpoint_folder(args)
    command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", str(folder)]
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    result = {"cpu": bench.cpu_name(), "torch": torch.__version__, "variant": args.variant, "layers": args.layers,
              "quantize": args.quantize, "source": args.source, **measured}  # fmt: skip
    print(f"{result['cpu']}, torch {result['torch']}: {args.variant} {args.quantize} from a {args.source} checkpoint")
    print("| stored GiB | load s | RSS after load GiB | load peak GiB | prompt peak GiB | TTFT s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['stored_bytes'] / GIB:.2f} | {result['load_s']:.0f} | {result['loaded_VmRSS'] / GIB:.2f} | "
          f"{result['loaded_VmHWM'] / GIB:.2f} | {result['peak_gb']:.2f} | {result['ttft_s']:.1f} | "
          f"{result['decode_tokens_per_s']:.2f} |")  # fmt: skip
    output = args.output or Path(__file__).parent / f"results-{args.variant}-cpu-{args.quantize}-real-dims.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
