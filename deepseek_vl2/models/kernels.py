"""Which kernel runs each of the decoder's hot operations, on which device, in which dtype, at which size.

The model asks :func:`choose` ("which kernel for this op, device, dtype and size, on operands of these
shapes?") and runs the kernel it names; nothing else decides. Where the fastest kernel differs between
CPUs (one-token and few-token products, one-query attention, the experts' path for a decode step), the
candidates are timed on first use on operands of those shapes (``kernel_timing``); elsewhere, and where
timing would take too long, fixed rules read the device and the size. The generic kernels chosen
between live here too (the experts' own loops are methods of their module).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import Enum

import torch
import torch.nn.functional as F

from .kernel_timing import default_timer, time_candidates

# Up to this many (token, expert) pairs the experts run pair by pair (decoding a few sequences). On an
# accelerator they gather the selected experts' weights (no host sync); beyond this, copying weights costs
# more than one sync per layer. On CPU they read them in place, with one matrix-vector product per pair,
# which beats one small matrix product per expert up to a few rows per expert.
MAX_GATHERED_EXPERTS = 16
MAX_PAIRS_IN_PLACE = 32
# Products of up to this many rows are timed; wider ones run on oneDNN's tiled product (PyTorch's GEMV
# would re-read the weights for every row).
MAX_TIMED_ROWS = 4
# Timing copies of an operand up to this many bytes, so that they are read from memory, as a decode step
# reads weights, not from the cache where one copy would stay.
PROBE_BYTES = 256 * 2**20
MAX_PROBE_COPIES = 64


class Op(Enum):
    """A kind of operation with kernels to choose from; the comment says what ``size`` counts."""

    MATMUL = "matmul"  # the decoder's weight products (linear layers, LM head, one expert pair): rows
    ATTENTION = "attention"  # attention of the new positions over the cache: query positions
    ONE_QUERY_SCORES = "one_query_scores"  # q.K of one query position: query heads per key head
    ONE_QUERY_VALUES = "one_query_values"  # probabilities x values of one query position: likewise
    LATENT_QUERY = "latent_query"  # MLA's query taken into latent space (q_nope x W_k): query positions
    EXPERTS = "experts"  # the routed experts: (token, expert) pairs


class Kernel(Enum):
    """An implementation the model can run."""

    TORCH_DEFAULT = "torch_default"  # matrix products as PyTorch dispatches them, oneDNN as the process has it
    NATIVE_GEMV = "native_gemv"  # matrix products with oneDNN off: PyTorch's own GEMV for one row
    ONEDNN = "onednn"  # matrix products with oneDNN on
    SDPA = "sdpa"  # :func:`sdpa`
    ONE_QUERY = "one_query"  # :func:`attend_one_query`
    EACH_PAIR = "each_pair"  # ``DeepseekV2Experts._run_each``
    GATHERED = "gathered"  # ``DeepseekV2Experts._run_gathered``
    SORTED = "sorted"  # ``DeepseekV2Experts._run_sorted``
    INT8_WEIGHT_ONLY = "int8_weight_only"  # ``aten._weight_int8pack_mm``: int8 weights, a scale per output channel
    INT4_WEIGHT_ONLY = "int4_weight_only"  # ``aten._weight_int4pack_mm_for_cpu``: packed int4, grouped scales, zeros


MATMUL_KERNELS = (Kernel.TORCH_DEFAULT, Kernel.NATIVE_GEMV, Kernel.ONEDNN)


def _matmul(device: torch.device, dtype: torch.dtype, rows: int) -> Kernel:
    """Untimed, one row on CPU: PyTorch's GEMV, which on CPUs without AMX streams the weights near the
    memory bandwidth where oneDNN's bf16 matmul stays below it (and in float32 both are one BLAS call).
    Wider products: as PyTorch dispatches them (oneDNN, the faster one there)."""
    return Kernel.NATIVE_GEMV if device.type == "cpu" and rows == 1 else Kernel.TORCH_DEFAULT


def _attention(device: torch.device, dtype: torch.dtype, queries: int) -> Kernel:
    """One query position on CPU: two matmuls around a softmax. CPU SDPA kernels are tiled for many
    queries and run several times slower for a single one."""
    return Kernel.ONE_QUERY if device.type == "cpu" and queries == 1 else Kernel.SDPA


def _one_query_scores(device: torch.device, dtype: torch.dtype, group: int) -> Kernel:
    """Untimed: PyTorch's GEMV for one query row per key head (faster than oneDNN on CPUs without AMX),
    oneDNN for several rows."""
    return Kernel.ONEDNN if group > 1 else Kernel.NATIVE_GEMV


def _one_query_values(device: torch.device, dtype: torch.dtype, group: int) -> Kernel:
    """oneDNN multiplies the probabilities by the values several times faster than PyTorch's GEMV."""
    return Kernel.ONEDNN


def _latent_query(device: torch.device, dtype: torch.dtype, queries: int) -> Kernel:
    """A [1, n] x [n, r] product per head: oneDNN's strength on CPU, as for the values."""
    return Kernel.ONEDNN if device.type == "cpu" else Kernel.TORCH_DEFAULT


def _experts(device: torch.device, dtype: torch.dtype, pairs: int) -> Kernel:
    """Many pairs (prefill): expert by expert on the sorted pairs. Few pairs (decode) on an accelerator:
    gather their experts' weights, as a host sync would stall the queue; on CPU there is no queue to
    drain, while copying weights would triple a decode step's memory traffic: each pair in place."""
    if device.type == "cpu":
        return Kernel.EACH_PAIR if pairs <= MAX_PAIRS_IN_PLACE else Kernel.SORTED
    return Kernel.GATHERED if pairs <= MAX_GATHERED_EXPERTS else Kernel.SORTED


_RULES: dict[Op, Callable[[torch.device, torch.dtype, int], Kernel]] = {
    Op.MATMUL: _matmul,
    Op.ATTENTION: _attention,
    Op.ONE_QUERY_SCORES: _one_query_scores,
    Op.ONE_QUERY_VALUES: _one_query_values,
    Op.LATENT_QUERY: _latent_query,
    Op.EXPERTS: _experts,
}


# The weight-only kernels per (device type, bits). PyTorch's CUDA int4 op (tinygemm) wants another packing,
# and no GPU has been at hand to measure it: quantized models run on CPU only for now.
_WEIGHT_ONLY: dict[tuple[str, int], Kernel] = {("cpu", 8): Kernel.INT8_WEIGHT_ONLY, ("cpu", 4): Kernel.INT4_WEIGHT_ONLY}


# Where kernels are timed: the candidates, the original's own call first (kept when the others are not
# clearly faster), and the largest size timed. float32 is never timed: both matmul kernels are one BLAS call.
_TIMED: dict[Op, tuple[tuple[Kernel, ...], int]] = {
    Op.MATMUL: ((Kernel.TORCH_DEFAULT, Kernel.NATIVE_GEMV), MAX_TIMED_ROWS),
    Op.ONE_QUERY_SCORES: ((Kernel.ONEDNN, Kernel.NATIVE_GEMV), math.inf),
    Op.ONE_QUERY_VALUES: ((Kernel.ONEDNN, Kernel.NATIVE_GEMV), math.inf),
    Op.LATENT_QUERY: ((Kernel.ONEDNN, Kernel.NATIVE_GEMV), 1),
    Op.EXPERTS: ((Kernel.SORTED, Kernel.EACH_PAIR), MAX_PAIRS_IN_PLACE),
}
TIMED_DTYPES = (torch.bfloat16, torch.float16)
TIMER = default_timer()
_chosen: dict[tuple, Kernel] = {}  # by the question asked: choosing again costs one dict lookup
_timing = True


def time_kernels(enabled: bool) -> None:
    """Time the candidates (the default) or let the fixed rules decide everywhere (to compare the two)."""
    global _timing
    _timing = enabled
    _chosen.clear()


def choose(
    op: Op,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    shapes: Sequence[tuple[int, ...]] = (),
    trial: Callable[[Kernel], object] | None = None,
) -> Kernel:
    """The kernel to run ``op`` with, on ``device`` in ``dtype``, for ``size`` as :class:`Op` counts it.

    ``shapes`` are the operands' (see :func:`product_trial`; repeated as often as a step runs them), or
    the key of a ``trial`` that runs the op itself with a given kernel; without either, the rule decides.
    """
    question = (op, device.type, dtype, size, tuple(shapes), torch.get_num_threads())
    kernel = _chosen.get(question)
    if kernel is None:
        kernel = _chosen[question] = _answer(op, device, dtype, size, tuple(shapes), trial)
    return kernel


def _answer(op, device, dtype, size, shapes, trial) -> Kernel:
    candidates, largest = _TIMED.get(op, ((), 0))
    timed = _timing and candidates and device.type == "cpu" and dtype in TIMED_DTYPES and size <= largest
    if not timed or not shapes:
        return _RULES[op](device, dtype, size)
    counts = sorted(Counter(shapes).items())
    dtype_name, threads = str(dtype).removeprefix("torch."), torch.get_num_threads()
    key = f"{op.value} {dtype_name} size {size} shapes {counts} {threads} threads"

    def measure() -> dict[Kernel, float]:
        if trial is not None:
            return time_candidates(candidates, trial)
        totals = dict.fromkeys(candidates, 0.0)
        for shape, count in counts:
            for kernel, seconds in time_candidates(candidates, product_trial(op, dtype, size, shape)).items():
                totals[kernel] += count * seconds
        return totals

    return TIMER.choose(key, candidates, measure)


def product_trial(op: Op, dtype: torch.dtype, size: int, shape: tuple[int, ...]) -> Callable[[Kernel], None]:
    """A trial of ``op``'s product on copies of its operand of ``shape``, with filler values.

    MATMUL: a weight ``(out, in)`` times ``size`` rows. ONE_QUERY_SCORES / VALUES: keys or values
    ``(batch x kv heads, positions, dim)`` against ``size`` query heads per key head. LATENT_QUERY:
    ``(batch, heads, nope, rank)``, one query position per head times its ``[nope, rank]`` matrix.
    """
    if op is Op.LATENT_QUERY:
        batch, *shape = shape
    copies = max(1, min(MAX_PROBE_COPIES, PROBE_BYTES // (math.prod(shape) * dtype.itemsize)))
    operands = [torch.full(shape, 0.01, dtype=dtype) for _ in range(copies)]
    if op is Op.MATMUL:
        left, product = torch.full((size, shape[1]), 0.01, dtype=dtype), F.linear
    elif op is Op.ONE_QUERY_SCORES:
        left, product = torch.full((shape[0], size, shape[2]), 0.01, dtype=dtype), _scores
    elif op is Op.ONE_QUERY_VALUES:
        left, product = torch.full((shape[0], size, shape[1]), 0.01, dtype=dtype), torch.matmul
    elif op is Op.LATENT_QUERY:
        left, product = torch.full((batch, shape[0], size, shape[1]), 0.01, dtype=dtype), torch.matmul
    else:
        raise ValueError(f"{op} has no product to time on its own")

    def run(kernel: Kernel) -> None:
        with matmuls_on(kernel):
            for operand in operands:
                product(left, operand)

    return run


def _scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.matmul(queries, keys.transpose(-1, -2))


def positions_bucket(positions: int) -> int:
    """The cache length one-query attention is timed at: the next power of two, at least 256."""
    return max(256, 1 << (positions - 1).bit_length())


def choose_weight_only(device: torch.device, bits: int) -> Kernel:
    """The kernel multiplying by ``bits``-bit weights on ``device``; ValueError where there is none.

    These kernels read the quantized bytes themselves: dequantizing whole matrices before a bf16 product
    would read more bytes than bf16 alone.
    """
    kernel = _WEIGHT_ONLY.get((torch.device(device).type, bits))
    if kernel is None:
        supported = ", ".join(f"int{b} on {d}" for d, b in _WEIGHT_ONLY)
        raise ValueError(f"no kernel for int{bits} weights on {torch.device(device).type}: supported are {supported}")
    return kernel


def weight_only_linear(x: torch.Tensor, kernel: Kernel, weight, scale, group_size: int) -> torch.Tensor:
    """``x [..., in] @ W.T`` for quantized ``W`` (as ``quantization.packing`` lays it out), in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if kernel is Kernel.INT8_WEIGHT_ONLY:
        output = torch.ops.aten._weight_int8pack_mm(rows, weight, scale)
    elif kernel is Kernel.INT4_WEIGHT_ONLY:
        output = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scale)
    else:
        raise ValueError(f"{kernel} is not a weight-only kernel")
    return output.view(*x.shape[:-1], output.shape[-1])


@contextmanager
def onednn_matmuls(enabled: bool) -> Iterator[None]:
    """Turn oneDNN (MKL-DNN) matmuls on or off for a block, process-wide, restoring the setting after.

    It cannot be scoped more narrowly: in PyTorch 2.13 every matrix-product op (linear, addmm and mm
    through ``cpublas::gemm``'s ``mkldnn_bf16_gemm``; mv, addmv, dot, bmm and baddbmm through
    ``use_mkldnn_matmul``) sends bf16 products to oneDNN whenever the global ``userEnabledMkldnn`` flag
    is set and the CPU has AVX-512 or AMX, with no per-call or per-thread override and a size cut-off
    (16^3 multiply-adds) far below ours; only CPUs without AVX-512-BF16 get the GEMV for one row anyway.
    A forward running meanwhile in another thread stays correct; only its wider products run slower.
    ``torch.backends.mkldnn.flags`` would also reset the deterministic, TF32 and fp32-precision settings.
    """
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def matmuls_on(kernel: Kernel) -> AbstractContextManager[None]:
    """A block whose matrix products run on ``kernel``, one of :data:`MATMUL_KERNELS`."""
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"{kernel} is not a matrix-product kernel; expected one of {MATMUL_KERNELS}")
    return nullcontext() if kernel is Kernel.TORCH_DEFAULT else onednn_matmuls(kernel is Kernel.ONEDNN)


def sdpa(query, key, value, attention_mask, scale, dropout_p=0.0) -> torch.Tensor:
    """SDPA with a boolean/additive mask, or causal when no mask was needed.

    Key and value may have fewer heads than the query (grouped heads, MLA's single latent head): SDPA
    shares them across query heads itself instead of us copying the cache once per head.
    """
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout_p,
        is_causal=attention_mask is None and query.shape[2] > 1,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )


def attend_one_query(queries, keys, value, attention_mask, scale) -> torch.Tensor:
    """Attention of one query position as two matmuls around a float32 softmax (the original's eager math).

    ``queries`` ([b, heads, 1, d_i]) and ``keys`` ([b, kv_heads, n, d_i]) are matching parts of the query and
    key features whose dot products add up, so that MLA's latent and roped parts need no concatenated copy
    of the cache (which stays in place); query heads sharing a key/value head attend as rows of one matmul.
    """
    batch, heads = queries[0].shape[:2]
    kv_heads = keys[0].shape[1]
    group = heads // kv_heads
    rows, positions = batch * kv_heads, positions_bucket(value.shape[-2])
    score_shapes = [(rows, positions, key.shape[-1]) for key in keys]
    scores = None
    with matmuls_on(choose(Op.ONE_QUERY_SCORES, value.device, value.dtype, group, score_shapes)):
        for query, key in zip(queries, keys):
            part = _scores(query.reshape(batch, kv_heads, group, -1) * scale, key)
            scores = part if scores is None else scores + part
    scores = scores.view(batch, heads, 1, -1)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.float().softmax(dim=-1).to(value.dtype).view(batch, kv_heads, group, -1)
    value_shapes = [(rows, positions, value.shape[-1])]
    with matmuls_on(choose(Op.ONE_QUERY_VALUES, value.device, value.dtype, group, value_shapes)):
        output = torch.matmul(probs, value)
    return output.view(batch, heads, 1, -1)
