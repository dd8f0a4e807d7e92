"""Which kernel runs each of the decoder's hot operations, on which device, in which dtype, at which size.

The model asks :func:`choose` ("which kernel for this op, device, dtype and size?"), or :func:`running` for
a block that runs the op, and runs the kernel it names; nothing else decides. On CPU in bf16/fp16 the
answers that differ between CPUs are measured (``kernel_timing``): a decode step's products, one-query
attention and experts' path inside decode steps (:func:`decode_step`), the original's call and the other
on interleaved steps, timing the blocks that run them; a prefill's products with quantized weights on
their first call of a size, which can run twice on its own operands. Fixed rules decide the rest, and
everything where nothing is timed (float32, CUDA, ``DEEPSEEK_VL2_KERNEL_TIMING=0``).
The generic kernels chosen between live here too (the experts' own loops are methods of their module).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from enum import Enum

import torch
import torch.nn.functional as F

from .kernel_timing import StepTuning, default_timer, time_candidates

TIMING_ENV = "DEEPSEEK_VL2_KERNEL_TIMING"  # "0": the fixed rules alone decide (no kernel is timed)

# Up to this many (token, expert) pairs the experts run as a decode step's (decoding a few sequences). On an
# accelerator they gather the selected experts' weights (no host sync); beyond this, copying weights costs
# more than one sync per layer. On CPU they read them in place, grouped by expert on the host, with one
# matrix-vector product for a lone pair's expert: faster than the sorted segments' path up to a batch of
# 16 rows at top-6 routing (benchmarks/README.md), beyond which a prefill's thousands of pairs want sorting.
MAX_GATHERED_EXPERTS = 16
MAX_PAIRS_IN_PLACE = 96
# From this many rows (a prefill) a product with quantized weights may run on the weights dequantized for the
# call: the dequantizing costs as much as a few rows' weight-only products, the matmul units then run at full
# rate. Fewer rows (decoding) always read the quantized bytes.
MIN_DEQUANTIZED_ROWS = 32


class Op(Enum):
    """A kind of operation with kernels to choose from; the comment says what ``size`` counts."""

    MATMUL = "matmul"  # the decoder's weight products (linear layers, LM head, one expert pair): rows
    ATTENTION = "attention"  # attention of the new positions over the cache: query positions
    ONE_QUERY_SCORES = "one_query_scores"  # q.K of one query position: query heads per key head
    ONE_QUERY_VALUES = "one_query_values"  # probabilities x values of one query position: likewise
    LATENT_QUERY = "latent_query"  # MLA's query taken into latent space (q_nope x W_k): query positions
    EXPERTS = "experts"  # the routed experts: (token, expert) pairs
    QUANTIZED_PRODUCT = "quantized_product"  # a product with quantized weights: rows (the power of two at or below)


class Kernel(Enum):
    """An implementation the model can run."""

    TORCH_DEFAULT = "torch_default"  # matrix products as PyTorch dispatches them, oneDNN as the process has it
    NATIVE_GEMV = "native_gemv"  # matrix products with oneDNN off: PyTorch's own GEMV for one row
    ONEDNN = "onednn"  # matrix products with oneDNN on
    SDPA = "sdpa"  # :func:`sdpa`
    ONE_QUERY = "one_query"  # :func:`attend_one_query`
    EACH_EXPERT = "each_expert"  # ``DeepseekV2Experts._run_each_expert``: grouped on the host, a lone pair on GEMV
    GATHERED = "gathered"  # ``DeepseekV2Experts._run_gathered``
    SORTED = "sorted"  # ``DeepseekV2Experts._run_sorted``
    INT8_WEIGHT_ONLY = "int8_weight_only"  # ``aten._weight_int8pack_mm``: int8 weights, a scale per output channel
    INT4_WEIGHT_ONLY = "int4_weight_only"  # ``aten._weight_int4pack_mm_for_cpu``: packed int4, grouped scales, zeros
    WEIGHT_ONLY = "weight_only"  # the device's kernel for the weights' bits (:func:`quantized_kernel`)
    DEQUANTIZED = "dequantized"  # quantized weights dequantized to the activations' dtype, then one matrix product


MATMUL_KERNELS = (Kernel.TORCH_DEFAULT, Kernel.NATIVE_GEMV, Kernel.ONEDNN)


def _matmul(device: torch.device, dtype: torch.dtype, rows: int) -> Kernel:
    """One row on CPU: PyTorch's GEMV (in float32 both are one BLAS call). It streams bf16 weights near the
    memory bandwidth on an AVX2 EPYC where oneDNN stays far below; on an AMX Xeon oneDNN reads faster in
    a loop over one shape, yet whole decode steps ran slower with it (benchmarks/README.md). Wider
    products: as PyTorch dispatches them (oneDNN, the faster one there)."""
    return Kernel.NATIVE_GEMV if device.type == "cpu" and rows == 1 else Kernel.TORCH_DEFAULT


def _attention(device: torch.device, dtype: torch.dtype, queries: int) -> Kernel:
    """One query position on CPU: two matmuls around a softmax. CPU SDPA kernels are tiled for many
    queries and run several times slower for a single one."""
    return Kernel.ONE_QUERY if device.type == "cpu" and queries == 1 else Kernel.SDPA


def _one_query_scores(device: torch.device, dtype: torch.dtype, group: int) -> Kernel:
    """PyTorch's GEMV scores one query row per key head faster than oneDNN on an AVX2 EPYC (a tie within
    whole decode steps on an AMX Xeon); oneDNN is the faster one for several rows."""
    return Kernel.ONEDNN if group > 1 else Kernel.NATIVE_GEMV


def _one_query_values(device: torch.device, dtype: torch.dtype, group: int) -> Kernel:
    """oneDNN multiplies the probabilities by the values several times faster than PyTorch's GEMV."""
    return Kernel.ONEDNN


def _latent_query(device: torch.device, dtype: torch.dtype, queries: int) -> Kernel:
    """A [1, n] x [n, r] product per head: oneDNN's strength on CPU, as for the values."""
    return Kernel.ONEDNN if device.type == "cpu" else Kernel.TORCH_DEFAULT


def _quantized_product(device: torch.device, dtype: torch.dtype, rows: int) -> Kernel:
    """Untimed: the device's kernel for the weights' bits (:func:`quantized_kernel`); on CPU the weight-only
    kernel, which reads the quantized bytes (dequantizing would read more)."""
    return Kernel.WEIGHT_ONLY


def _experts(device: torch.device, dtype: torch.dtype, pairs: int) -> Kernel:
    """Many pairs (prefill): expert by expert on the sorted pairs. Few pairs (decode) on an accelerator:
    gather their experts' weights, as a host sync would stall the queue; on CPU there is no queue to
    drain, while copying weights would triple a decode step's memory traffic: each expert in place."""
    if device.type == "cpu":
        return Kernel.EACH_EXPERT if pairs <= MAX_PAIRS_IN_PLACE else Kernel.SORTED
    return Kernel.GATHERED if pairs <= MAX_GATHERED_EXPERTS else Kernel.SORTED


_RULES: dict[Op, Callable[[torch.device, torch.dtype, int], Kernel]] = {
    Op.MATMUL: _matmul,
    Op.ATTENTION: _attention,
    Op.ONE_QUERY_SCORES: _one_query_scores,
    Op.ONE_QUERY_VALUES: _one_query_values,
    Op.LATENT_QUERY: _latent_query,
    Op.EXPERTS: _experts,
    Op.QUANTIZED_PRODUCT: _quantized_product,
}


# How a product with quantized weights runs, per (device type, bits). On CPU, PyTorch's weight-only kernels
# read the quantized bytes. On CUDA each product dequantizes its weight for the call and cuBLAS multiplies:
# the weights stay quantized in GPU memory (what lets small and base fit), at a cost in speed. PyTorch's
# CUDA int4 kernel (tinygemm) wants another packing, and no GPU has been at hand to measure either.
_QUANTIZED_KERNELS: dict[tuple[str, int], Kernel] = {
    ("cpu", 8): Kernel.INT8_WEIGHT_ONLY,
    ("cpu", 4): Kernel.INT4_WEIGHT_ONLY,
    ("cuda", 8): Kernel.DEQUANTIZED,
    ("cuda", 4): Kernel.DEQUANTIZED,
}


# Timed on the caller's own trial: the candidates, the rule's first (kept when the other is not clearly
# faster), and the smallest and largest sizes timed.
_TIMED: dict[Op, tuple[tuple[Kernel, ...], int, float]] = {
    Op.QUANTIZED_PRODUCT: ((Kernel.WEIGHT_ONLY, Kernel.DEQUANTIZED), MIN_DEQUANTIZED_ROWS, math.inf),
}
# Settled inside decode steps of up to MAX_STEP_ROWS tokens: the original's call first (oneDNN as PyTorch
# dispatches by default; the experts one expert at a time), kept unless the other is clearly faster, so that
# bf16 can match the original's bits; and the largest size asked within a step.
STEP_TIMED: dict[Op, tuple[Kernel, Kernel, float]] = {
    Op.MATMUL: (Kernel.TORCH_DEFAULT, Kernel.NATIVE_GEMV, math.inf),
    Op.ONE_QUERY_SCORES: (Kernel.ONEDNN, Kernel.NATIVE_GEMV, math.inf),
    Op.ONE_QUERY_VALUES: (Kernel.ONEDNN, Kernel.NATIVE_GEMV, math.inf),
    Op.LATENT_QUERY: (Kernel.ONEDNN, Kernel.NATIVE_GEMV, math.inf),
    Op.EXPERTS: (Kernel.SORTED, Kernel.EACH_EXPERT, MAX_PAIRS_IN_PLACE),
}
MAX_STEP_ROWS = 4
# One-query attention's kernels are settled per class of cache length, up to each bound: which reads the
# keys and values faster changes with their length (a GEMV that wins over a short prompt's cache can read
# a long image prompt's several times slower), and a short tuning run must not decide for long ones.
KEY_LENGTH_BOUNDS = (256, 1024, 4096, 16384)
TIMED_DTYPES = (torch.bfloat16, torch.float16)  # in float32 the candidates' products are the same BLAS calls
TIMER = default_timer()
_chosen: dict[tuple, Kernel] = {}  # by the question asked: choosing again costs one dict lookup
_timing = os.environ.get(TIMING_ENV, "1") != "0"
_tunings: dict[str, StepTuning] = {}  # by kind of decode step
_current_step: ContextVar[StepTuning | None] = ContextVar("current_step", default=None)


def time_kernels(enabled: bool) -> None:
    """Time the candidates (the default) or let the fixed rules decide everywhere (to compare the two)."""
    global _timing
    _timing = enabled
    _chosen.clear()
    _tunings.clear()


def measurements() -> list:
    """Every timing this process made (``kernel_timing.Measurement``): on calls, then inside steps."""
    return TIMER.measurements + [m for tuning in _tunings.values() for m in tuning.measurements]


def _timed_here(device: torch.device, dtype: torch.dtype) -> bool:
    return _timing and device.type == "cpu" and dtype in TIMED_DTYPES


def _kind(dtype: torch.dtype, what: str) -> str:
    return f"{what} {str(dtype).removeprefix('torch.')} {torch.get_num_threads()} threads"


@contextmanager
def decode_step(device: torch.device, dtype: torch.dtype, rows: int, model: str = "") -> Iterator[None]:
    """A forward of ``rows`` new tokens in ``dtype``: where timed, one of its kernel questions may be under test.

    ``model`` names what else the kernels' speed order depends on (its width, quantized weights): steps of
    different models settle apart.
    """
    if not _timed_here(device, dtype) or rows > MAX_STEP_ROWS:
        yield
        return
    prefix = _kind(dtype, f"decode step of {rows} rows" + (f" of {model}" if model else "")) + ": "
    tuning = _tunings.get(prefix) or _tunings.setdefault(prefix, StepTuning(TIMER, prefix))
    token = _current_step.set(tuning)
    tuning.step_started()
    try:
        yield
    finally:
        _current_step.reset(token)
    tuning.step_done()  # not after an error: its time says nothing


def key_length_class(keys: int) -> str:
    """The class of cache lengths that one-query attention over ``keys`` positions is settled for."""
    bound = next((b for b in KEY_LENGTH_BOUNDS if keys <= b), None)
    return f"keys<={bound}" if bound else f"keys>{KEY_LENGTH_BOUNDS[-1]}"


def choose(
    op: Op,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    shapes: Sequence[tuple[int, ...]] = (),
    trial: Callable[[Kernel], object] | None = None,
) -> Kernel:
    """The kernel to run ``op`` with, on ``device`` in ``dtype``, for ``size`` as :class:`Op` counts it.

    ``trial(kernel)`` runs the op on the caller's operands, whose ``shapes`` key the choice; otherwise the
    rule decides. The ops settled inside decode steps ask :func:`running` instead.
    """
    question = (op, device.type, dtype, size, tuple(shapes), torch.get_num_threads())
    kernel = _chosen.get(question)
    if kernel is None:
        kernel = _chosen[question] = _answer(op, device, dtype, size, tuple(shapes), trial)
    return kernel


@contextmanager
def running(op: Op, device: torch.device, dtype: torch.dtype, size: int, role: str = "") -> Iterator[Kernel]:
    """The kernel for a block that runs ``op`` (as :func:`choose` answers it outside decode steps).

    Inside a timed :func:`decode_step`, the block gets the step's answer for its ``role`` (which products:
    the layers', the LM head's, ...), and while that question is under test the block is timed.
    """
    step = _current_step.get()
    original, other, largest = STEP_TIMED.get(op, (None, None, 0))
    if step is None or original is None or size > largest:
        yield choose(op, device, dtype, size)
        return
    question = f"{op.value}{'/' + role if role else ''} size {size}"
    with step.answering(question, original.value, other.value) as answer:
        yield Kernel(answer)


@contextmanager
def matmuls_running(op: Op, device: torch.device, dtype: torch.dtype, size: int, role: str = "") -> Iterator[None]:
    """A block whose matrix products run on the kernel :func:`running` gives ``op`` (one of :data:`MATMUL_KERNELS`)."""
    with running(op, device, dtype, size, role) as kernel, matmuls_on(kernel):
        yield


def _answer(op, device, dtype, size, shapes, trial) -> Kernel:
    candidates, smallest, largest = _TIMED.get(op, ((), 0, 0))
    if not (candidates and _timed_here(device, dtype) and smallest <= size <= largest and trial is not None):
        return _RULES[op](device, dtype, size)
    key = _kind(dtype, f"{op.value} size {size} shapes {list(shapes)}")
    return TIMER.choose(key, candidates, lambda: time_candidates(candidates, trial))


def quantized_kernel(device: torch.device, bits: int) -> Kernel:
    """The kernel multiplying by ``bits``-bit weights on ``device``; ValueError where there is none.

    On CPU these kernels read the quantized bytes themselves: dequantizing whole matrices before a bf16
    product would read more bytes than bf16 alone.
    """
    kernel = _QUANTIZED_KERNELS.get((torch.device(device).type, bits))
    if kernel is None:
        supported = ", ".join(f"int{b} on {d}" for d, b in _QUANTIZED_KERNELS)
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
    length = key_length_class(value.shape[-2])
    scores = None
    with matmuls_running(Op.ONE_QUERY_SCORES, value.device, value.dtype, group, role=length):
        for query, key in zip(queries, keys):
            part = torch.matmul(query.reshape(batch, kv_heads, group, -1) * scale, key.transpose(-1, -2))
            scores = part if scores is None else scores + part
    scores = scores.view(batch, heads, 1, -1)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.float().softmax(dim=-1).to(value.dtype).view(batch, kv_heads, group, -1)
    with matmuls_running(Op.ONE_QUERY_VALUES, value.device, value.dtype, group, role=length):
        output = torch.matmul(probs, value)
    return output.view(batch, heads, 1, -1)
