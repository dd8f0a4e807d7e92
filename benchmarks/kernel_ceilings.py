"""The kernel ceilings behind bench.py's CPU figures: how fast PyTorch's own kernels read weights and attend.

Decode is weight streaming: a one-row product runs on PyTorch's GEMV or oneDNN, a few-row one (batch > 1)
on oneDNN, on weights packed for it where this CPU has native bf16. This prints the rate at which each
reads bf16 weights of the tiny model's shapes (many distinct matrices, so that caches do not help), the
attention kernels of a one-token step over a 1.4k-token cache, and the vision tower's SDPA (head dim 72)
against a large matmul.

    python benchmarks/kernel_ceilings.py            # 2 threads, bf16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench import best_time, matmul_rate, memory_bandwidth

from deepseek_vl2.models.kernels import quantized_kernel, onednn_matmuls, weight_only_linear
from deepseek_vl2.models.packed import PackedWeight, packing_available
from deepseek_vl2.quantization.config import DEFAULT_INT4_GROUP_SIZE
from deepseek_vl2.quantization.packing import quantize

GB = 1e9
CPU = torch.device("cpu")
# The tiny model's weight shapes that a decode step reads: an expert's gate+up, an attention projection, the LM head.
DECODE_SHAPES = {"expert gate+up": (1792, 1280), "attention proj": (1280, 1280), "LM head": (129280, 1280)}


def weight_streaming(shape: tuple[int, int], rows: int, total_bytes: float = 400e6) -> tuple[float, ...]:
    """GB/s of weights read by (GEMV per row, one oneDNN product, one product of the weight packed for
    oneDNN: ``models.packed``, 0 where packing is not available) for ``rows`` rows, over cold matrices."""
    count = max(4, int(total_bytes / (shape[0] * shape[1] * 2)))
    weights = [torch.randn(shape).to(torch.bfloat16) for _ in range(count)]
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)
    size = count * shape[0] * shape[1] * 2

    def gemv_per_row():
        with onednn_matmuls(False):
            for weight in weights:
                for row in x:
                    F.linear(row, weight)

    def onednn():
        with onednn_matmuls(True):
            for weight in weights:
                F.linear(x, weight)

    rates = size / best_time(gemv_per_row, CPU, 5) / GB, size / best_time(onednn, CPU, 5) / GB
    if not packing_available():
        return (*rates, 0.0)
    packed = [PackedWeight(weight) for weight in weights]
    return (*rates, size / best_time(lambda: [weight.linear(x) for weight in packed], CPU, 5) / GB)


def weight_only_streaming(shape: tuple[int, int], rows: int, bits: int, total_bytes: float = 400e6) -> float:
    """GB/s of quantized weights read by the weight-only kernel for ``rows`` bf16 rows, over cold matrices."""
    group_size = DEFAULT_INT4_GROUP_SIZE if bits == 4 else None
    stored_bytes = shape[0] * shape[1] * bits / 8
    count = max(4, int(total_bytes / stored_bytes))
    matrix = torch.randn(shape).to(torch.bfloat16)
    weights = [quantize(matrix, bits, group_size) for _ in range(count)]
    weights = [(w.clone(), s.clone()) for w, s in weights]  # distinct storage: no cache reuse across matrices
    kernel = quantized_kernel(CPU, bits)
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)

    def run():
        for weight, scale in weights:
            weight_only_linear(x, kernel, weight, scale, group_size)

    return count * stored_bytes / best_time(run, CPU, 5) / GB


def int8_activations_streaming(shape: tuple[int, int], rows: int, total_bytes: float = 400e6) -> float:
    """GB/s of int8 weights read by ``torch._int_mm`` on rows quantized to int8 on the fly (a scale per row),
    rescaled to bf16: what an int8 weights-and-activations setting would run. This library quantizes weights
    only (activations stay bf16), so this is a ceiling to compare, not one of its paths."""
    count = max(4, int(total_bytes / (shape[0] * shape[1])))
    weights = [torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(count)]
    weight_scale = torch.rand(shape[0])
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)

    def run():
        for weight in weights:
            row_scale = x.abs().amax(-1, keepdim=True).float() / 127
            rows_int8 = (x / row_scale).round_().to(torch.int8)
            (torch._int_mm(rows_int8, weight.t()) * (row_scale * weight_scale)).to(torch.bfloat16)

    return count * shape[0] * shape[1] / best_time(run, CPU, 5) / GB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"copy: {memory_bandwidth(CPU) / GB:.1f} GB/s (read + write), the same measure as bench.py")
    matmul = matmul_rate(CPU, torch.bfloat16)
    print(f"bf16 matmul 4096^3: {matmul / 1e9:.0f} GFLOP/s\n")

    print("weights read, GB/s        rows   GEMV per row   oneDNN product   packed for oneDNN")
    for name, shape in DECODE_SHAPES.items():
        for rows in (1, 2, 4):
            gemv, onednn, packed = weight_streaming(shape, rows)
            print(f"{name:16s} {str(shape):>13s}  {rows:4d}   {gemv:12.1f}   {onednn:14.1f}   {packed:17.1f}")

    print("\nquantized weights read, GB/s (bf16 rows; tokens/s scale with weights per second: x2 for int8, x4 int4)")
    print("and int8 weights by int8 rows (`torch._int_mm`, rows quantized per call: not a path of this library)")
    print("                                rows   int8 (bytes/s)   int4 (bytes/s)   bf16-equivalent int8 / int4"
          "   int8 x int8 (bytes/s)")  # fmt: skip
    for name, shape in DECODE_SHAPES.items():
        for rows in (1, 4):
            int8, int4 = weight_only_streaming(shape, rows, 8), weight_only_streaming(shape, rows, 4)
            equivalent = f"{2 * int8:10.1f} / {4 * int4:.1f}"
            int8_int8 = int8_activations_streaming(shape, rows)
            print(f"{name:16s} {shape!s:>13s}  {rows:4d}   {int8:14.1f}   {int4:14.1f}   {equivalent:>27s}"
                  f"   {int8_int8:21.1f}")  # fmt: skip

    print("\none-token attention over 1,686 cached positions, 10 heads x 128 (12 layers' caches, cold)")
    for batch in (1, 4):
        keys = [torch.randn(batch, 10, 1686, 128).to(torch.bfloat16) for _ in range(12)]
        query = torch.randn(batch, 10, 1, 128).to(torch.bfloat16)
        probs = torch.rand(batch, 10, 1, 1686).to(torch.bfloat16)
        size = 12 * keys[0].numel() * 2
        for label, enabled in (("GEMV", False), ("oneDNN", True)):
            with onednn_matmuls(enabled):
                scores = size / best_time(lambda: [torch.matmul(query, k.transpose(-1, -2)) for k in keys], CPU, 5) / GB
                mixed = size / best_time(lambda: [torch.matmul(probs, k) for k in keys], CPU, 5) / GB
            print(f"batch {batch} {label:6s}: q.K^T {scores:5.1f} GB/s   p.V {mixed:5.1f} GB/s")

    q = torch.randn(7, 16, 729, 72).to(torch.bfloat16)
    attention_flops = 4 * 7 * 16 * 729**2 * 72
    sdpa = attention_flops / best_time(lambda: F.scaled_dot_product_attention(q, q, q), CPU, 3)
    print(f"\nvision SDPA, 7 tiles x 16 heads x 729 x 72: {sdpa / 1e9:.0f} GFLOP/s ({sdpa / matmul:.0%} of the matmul)")


if __name__ == "__main__":
    main()
