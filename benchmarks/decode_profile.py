"""Where a decode step's time goes: PyTorch's profiler over one-token steps at a variant's real dimensions.

The model is bench.py's (real dimensions, random weights). Each row's prompt is its own random tokens,
so rows route to different experts as real prompts do. Steps run first until the kernel choice has
settled (or is read from the choices file), then ``--steps`` steps are profiled: the ops by self time,
the matrix products by shape, how many ops a step runs, and the median step against the time its
weight and cache bytes take at the copy bandwidth.

    python benchmarks/decode_profile.py --batch 1 4 --prompt_tokens 218
    python benchmarks/decode_profile.py --quantize int8
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch
from bench import PeakMemory, Probe, build_model, cpu_name, decode_bytes_per_step, memory_bandwidth
from quantized_decode import step_times

from deepseek_vl2.models import kernels
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.config import SHORT_FORMS
from deepseek_vl2.quantization.selection import quantize_in_place

CPU = torch.device("cpu")
SETTLING_STEPS = 48  # enough for every step question (six interleaved steps each) to settle


def profiled_steps(model, prompt: torch.Tensor, steps: int):
    """(the profiler, each step's seconds, distinct experts per MoE layer) for ``steps`` steps after a prefill."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    probe = Probe(CPU, PeakMemory(CPU))
    handles = probe.attach(model)

    @contextmanager
    def decoding():
        probe.decoding = True
        with profiler:
            yield

    try:
        times = step_times(model.language, prompt, steps, prompt.shape[0], around_steps=decoding)
    finally:
        for handle in handles:
            handle.remove()
    return profiler, times, probe.experts_per_layer()


def top_level_ops(profiler) -> int:
    return sum(1 for event in profiler.events() if event.cpu_parent is None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--prompt_tokens", type=int, default=218)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quantize", choices=tuple(SHORT_FORMS), help="quantize the decoder's weights first")
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.variant, args.layers, torch.bfloat16, CPU)
    if args.quantize:
        quantize_in_place(model, DeepseekVL2QuantizationConfig.from_short_form(args.quantize))
    language, vocab = model.language, model.config.language_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, {args.variant} dims, "
          f"{args.quantize or 'bf16'} weights, {args.prompt_tokens}-token prompts")  # fmt: skip
    for batch in args.batch:
        prompt = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=generator)
        settled = step_times(language, prompt, SETTLING_STEPS, batch)[-16:]  # after the kernel choice settled
        profiler, times, experts = profiled_steps(model, prompt, args.steps)
        bandwidth = memory_bandwidth(CPU)
        step = statistics.median(settled)
        step_bytes = decode_bytes_per_step(model, batch, args.prompt_tokens + args.steps / 2, experts)
        print(f"\nbatch {batch}: median step {step * 1e3:.1f} ms ({batch / step:.1f} tok/s; "
              f"{statistics.median(times) * 1e3:.1f} ms under the profiler), "
              f"{top_level_ops(profiler) / args.steps:.0f} top-level ops per step; {step_bytes / 1e9:.2f} GB "
              f"read per step take {step_bytes / bandwidth * 1e3:.1f} ms at the copy bandwidth "
              f"({bandwidth / 1e9:.1f} GB/s): {step_bytes / bandwidth / step:.0%} of the roofline")  # fmt: skip
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        shapes = profiler.key_averages(group_by_input_shape=True)
        products = [event for event in shapes if event.key in ("aten::mm", "aten::bmm", "aten::_weight_int8pack_mm",
                                                               "aten::_weight_int4pack_mm_for_cpu")]  # fmt: skip
        print(f"matrix products by shape (self ms over {args.steps} steps, calls):")
        for event in sorted(products, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"  {event.key:34s} {str(event.input_shapes):60.60s} {event.self_cpu_time_total / 1e3:8.1f} "
                  f"{event.count:6d}")  # fmt: skip
    kernels_chosen = {k: v for k, v in kernels.TIMER.choices().items() if k.startswith("decode step")}
    print("\nkernels chosen for decode steps:")
    for key, kernel in sorted(kernels_chosen.items()):
        print(f"  {key}: {kernel}")


if __name__ == "__main__":
    main()
