"""Decode speed of int8 / int4 weights against bf16, on one random-weight model at a variant's real dimensions.

The same model (``bench.build_model``) is timed in bf16, then quantized in place to int8 and int4: a text
prompt is prefilled, then one-token steps are timed, the three dtypes taking turns so that other load on
the machine hits them alike. Fewer decoder layers (``--layers``) keep it short; the LM head and
embeddings are the variant's. Also prints each one's error against bf16 on the prompt's logits (random
weights: not the error on the real ones).

    python benchmarks/quantized_decode.py --layers 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext

import torch
from bench import build_model, cpu_name

from deepseek_vl2.models.cache import DeepseekV2Cache
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.selection import quantize_in_place

CPU = torch.device("cpu")
SETTINGS = {"int8": DeepseekVL2QuantizationConfig(bits=8), "int4": DeepseekVL2QuantizationConfig(bits=4)}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.language.state_dict().values())


@torch.no_grad()
def step_times(language, prompt: torch.Tensor, steps: int, batch: int, around_steps=nullcontext) -> list[float]:
    """Seconds of each of ``steps`` one-token decode steps after prefilling ``prompt`` for ``batch`` rows.

    ``around_steps()`` is entered around the steps alone (a profiler, say), not the prefill.
    """
    cache = DeepseekV2Cache(config=language.config)
    ids = prompt.expand(batch, -1)
    logits = language(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    times = []
    with around_steps():
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = language(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def logit_error(reference, model, prompt: torch.Tensor) -> tuple[float, float]:
    """(relative RMS of the prompt's logits against ``reference``'s, share of positions with the same top token)."""
    expected = reference.language(input_ids=prompt, use_cache=False).logits.float()
    got = model.language(input_ids=prompt, use_cache=False).logits.float()
    relative_rms = ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()
    return relative_rms, (got.argmax(-1) == expected.argmax(-1)).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    models = {"bf16": build_model(args.variant, args.layers, torch.bfloat16, CPU)}
    for name, config in SETTINGS.items():
        models[name] = copy.deepcopy(models["bf16"])
        quantize_in_place(models[name], config)
    prompt = torch.randint(0, models["bf16"].config.language_config.vocab_size, (1, 64))
    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times = step_times(model.language, prompt, args.steps, args.batch)
            best[name] = min(best[name], sorted(times)[len(times) // 2])  # the median step of the best round

    print(
        f"{cpu_name()}, {args.threads} threads, {args.variant} dims, {args.layers} decoder layers, batch {args.batch}"
    )
    for name, model in models.items():
        error, same_top = logit_error(models["bf16"], model, prompt)
        print(
            f"{name:5s} decoder weights {weight_bytes(model) / 2**30:5.2f} GiB   step {best[name] * 1e3:6.1f} ms   "
            f"{args.batch / best[name]:6.1f} tok/s   x{best['bf16'] / best[name]:.2f} bf16   "
            f"logits' relative RMS error {error:.4f}, same top token {same_top:.0%}"
        )


if __name__ == "__main__":
    main()
