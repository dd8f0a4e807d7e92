"""Every CUDA check in one run, for the few minutes a GPU is lent: one JSON file and a short table.

1. Parity: the test checkpoints (tiny, small and base look-alikes, fp32) on CUDA against the CPU:
   logits of an image prompt and greedy tokens.
2. Kernels: what ``models.kernels.choose`` picks on this GPU, per op and size.
3. Speed and memory at the real dimensions (random weights), bf16: TTFT and decode tokens/s for one image
   and a text prompt at batch 1 and 4 (tiny; small too if the GPU holds it), with the memory planner's
   predicted peaks (for one request, so batch 1) beside ``torch.cuda.max_memory_allocated``.
4. Quantized weights (int8, int4), whose CUDA path dequantizes each weight for its product: parity of the
   tiny test checkpoint quantized on CUDA against the same on CPU, and tiny's speed and memory.

    python benchmarks/cuda_check.py                       # writes benchmarks/results-cuda-check.json
    python benchmarks/cuda_check.py --skip_small          # tiny only

Without a CUDA device it says so and exits 0, so that it can run anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench

from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.models.kernels import Op, choose
from deepseek_vl2.planner import plan_memory
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.config import SHORT_FORMS
from deepseek_vl2.quantization.selection import quantize_in_place
from deepseek_vl2.testing.checkpoints import build_checkpoint, checkpoint_quantization
from deepseek_vl2.testing.published import VARIANTS

CPU, GIB = torch.device("cpu"), 2**30
KERNEL_SIZES = (1, 2, 4, 16, 64, 1024)
SMALL_NEEDS = 48 * GIB  # small's 30 GiB of bf16 weights, activations at batch 4 and the runtime


@torch.no_grad()
def parity(variant: str, folder: Path, device: torch.device, new_tokens: int, setting: str | None = None) -> dict:
    """fp32 logits and greedy tokens of one image prompt on ``device`` against the CPU (``setting``: the
    weights quantized, "int8" or "int4", on each device's own path)."""
    path = folder / variant
    if not path.is_dir():
        build_checkpoint(path, variant, dtype=torch.float32)
    processor = DeepseekVLV2Processor.from_pretrained(path)
    inputs = processor(
        conversations=bench.chat("Describe the picture.", 1), images=[bench.picture(640, 480, 1)], force_batchify=True
    )
    outputs = {}
    for where in (CPU, device):
        model = DeepseekVLV2ForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map=str(where),
            quantization_config=setting and checkpoint_quantization(setting),
        ).eval()
        batch = inputs.to(where)
        image_inputs = {k: batch[k] for k in ("images", "images_seq_mask", "images_spatial_crop")}
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **image_inputs).logits
        tokens = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **image_inputs,
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
        outputs[where.type] = (logits.float().cpu(), tokens.cpu())
    (cpu_logits, cpu_tokens), (gpu_logits, gpu_tokens) = outputs["cpu"], outputs[device.type]
    difference = (gpu_logits - cpu_logits).abs().max().item()
    return {
        "variant": variant,
        "weights": setting or "fp32",
        "max_abs_logit_difference": difference,
        "relative_logit_difference": difference / cpu_logits.abs().max().item(),
        "same_greedy_tokens": torch.equal(cpu_tokens, gpu_tokens),
        "tokens": gpu_tokens.shape[-1] - inputs.input_ids.shape[-1],
    }


def kernels_chosen(device: torch.device, dtype: torch.dtype) -> dict[str, dict[int, str]]:
    return {op.value: {size: choose(op, device, dtype, size).value for size in KERNEL_SIZES} for op in Op}


def speed(variant: str, device: torch.device, new_tokens: int, setting: str | None = None) -> list[dict]:
    """bench.py's workloads at the real dimensions, with the planner's predicted peaks beside the measured
    (``setting``: the decoder quantized, "int8" or "int4")."""
    model = bench.build_model(variant, None, torch.bfloat16, device)
    if setting is not None:
        quantize_in_place(model, DeepseekVL2QuantizationConfig.from_short_form(setting))
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        processor = bench.build_processor(variant, folder)
    args = argparse.Namespace(new_tokens=new_tokens)
    warm_up = processor(conversations=bench.chat("Hello.", 1), images=[bench.picture(384, 384, 0)], force_batchify=True)
    bench.run(model, processor, warm_up, argparse.Namespace(new_tokens=2), device, None)
    gpu_memory = torch.cuda.get_device_properties(device).total_memory
    rows = []
    for name in ("one_image", "text"):
        for batch in (1, 4):
            inputs = bench.workload(processor, name, batch, 218)
            result, _ = bench.run(model, processor, inputs, args, device, None)
            predicted = None
            if batch == 1:  # the planner plans one request
                images = 1 if name == "one_image" else 0
                text_tokens = inputs.input_ids.shape[-1] - int(inputs.images_seq_mask.sum())
                plan = plan_memory(
                    model.config, gpu_memory, images=images, text_tokens=text_tokens, max_new_tokens=new_tokens,
                    quantization=setting,
                )  # fmt: skip
                predicted = (plan.weight_total + plan.activation_peak) / GIB
            weights = setting or "bf16"
            rows.append({"variant": variant, "weights": weights, "workload": name, **result})
            rows[-1]["planner_peak_gb"] = predicted
            print(f"  {variant} {weights} {name} x{batch}: TTFT {result['ttft_s']:.3f} s, "
                  f"decode {result['decode_tokens_per_s']:.1f} tok/s, peak {result['peak_gb']:.2f} GiB", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def table(report: dict) -> str:
    lines = ["| check | result |", "|---|---|"]
    for row in report["parity"]:
        lines.append(
            f"| {row['weights']} {row['variant']}: CUDA vs CPU | max logit diff {row['max_abs_logit_difference']:.2e} "
            f"(rel {row['relative_logit_difference']:.1e}), same {row['tokens']} greedy tokens: "
            f"{row['same_greedy_tokens']} |"
        )
    for row in report["speed"]:
        lines.append(
            f"| {row['weights']} {row['variant']} {row['workload']} x{row['batch']} | TTFT {row['ttft_s']:.3f} s, "
            f"decode {row['decode_tokens_per_s']:.1f} tok/s ({row['decode_over_roofline']:.0%} of roofline), "
            f"peak {row['peak_gb']:.2f} GiB"
            + (f", planner {row['planner_peak_gb']:.2f} GiB" if row["planner_peak_gb"] else "")
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per speed run")
    parser.add_argument("--skip_small", action="store_true", help="real dimensions of tiny only")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results-cuda-check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here, nothing checked")
        return 0
    device = torch.device("cuda")
    start = time.perf_counter()
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device),
        "cpu": bench.cpu_name(),
        "torch": torch.__version__,
        "kernels_bf16": kernels_chosen(device, torch.bfloat16),
        "kernels_fp32": kernels_chosen(device, torch.float32),
    }
    print(f"{report['gpu']}, torch {report['torch']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        report["parity"] = [parity(variant, Path(folder), device, 16) for variant in VARIANTS]
        report["parity"] += [parity("tiny", Path(folder), device, 16, setting) for setting in SHORT_FORMS]
    print("parity done", flush=True)
    report["speed"] = speed("tiny", device, args.new_tokens)
    for setting in SHORT_FORMS:
        report["speed"] += speed("tiny", device, args.new_tokens, setting)
    fits_small = torch.cuda.get_device_properties(device).total_memory >= SMALL_NEEDS
    if fits_small and not args.skip_small:
        report["speed"] += speed("small", device, args.new_tokens)
    report["seconds"] = time.perf_counter() - start
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\n{report['seconds']:.0f} s; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
