"""How fast DeepSeek-VL2 runs here, against what this machine's memory and matmul units allow.

Builds a model with the real dimensions of a published variant and random weights (nothing is
downloaded), runs image and text prompts through the real processor and ``generate``, and reports
per workload: vision encode time, time to first token, decode tokens/s, peak memory, and two ratios
measured in the same run: decode speed against the memory-bandwidth roofline (the bytes one decode
step must read: activated weights and the KV cache, at the measured copy bandwidth) and vision/prefill
FLOP/s against a large matmul.

    python benchmarks/bench.py                                  # tiny, bf16, CPU, all workloads
    python benchmarks/bench.py --variant small --layers 4       # fewer decoder layers, for small RAM
    python benchmarks/bench.py --workloads one_image --batch_sizes 1 --chunk_size 512
    python benchmarks/bench.py --workloads chat_one_image chat_three_images   # three turns, reuse on and off
    python benchmarks/bench.py --quantize int8                  # int8 decoder weights (quantized after building)

The ``chat_`` workloads are three-turn chats through ``DeepseekVL2Chat`` about the same images: the
TTFT of each turn with reuse across turns and without, and the memory the kept state takes.
Results go to stdout as a table and to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from deepseek_vl2.chat import DeepseekVL2Chat
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor, kernels
from deepseek_vl2.models.language import DeepseekV2MoE
from deepseek_vl2.models.packed import pack_weights, packed_modules
from deepseek_vl2.models.tiling import num_tiles
from deepseek_vl2.quantization import DeepseekVL2QuantizationConfig
from deepseek_vl2.quantization.config import SHORT_FORMS
from deepseek_vl2.quantization.selection import quantize_in_place
from deepseek_vl2.testing.checkpoints import CANDIDATE_RESOLUTIONS
from deepseek_vl2.testing.published import VARIANTS, published_config
from deepseek_vl2.testing.tokenizer import build_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WORKLOADS = ("one_image", "three_images", "text")
CHAT_WORKLOADS = {"chat_one_image": "one_image", "chat_three_images": "three_images"}  # -> the images they show
CHAT_QUESTIONS = ("Describe the image in detail.", "What colours stand out?", "What is in the top left corner?")
GIB = 2**30
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None

_WORDS = (
    "Please read the document carefully and answer the questions that follow. The report describes the sales of "
    "three products over the last twelve months, the number of people who visited the store each week, the opening "
    "hours, the prices of coffee and tea, and the weather on the days the store was closed. Summarize the main points "
    "in a few sentences, then list every number that appears in the text together with what it counts, and finally "
    "explain which product sold best and why that might be so. Keep the answer short and use plain English."
).split()


# ---------------------------------------------------------------------------------------------- the machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: torch.device) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the roofline's memory speed."""
    numel = (2 * GIB if device.type == "cuda" else GIB // 2) // 2
    source = torch.ones(numel, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    seconds = best_time(lambda: target.copy_(source), device, repeats=10)
    return 2 * source.numel() * source.element_size() / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the model's dtype: the compute roofline for vision and prefill."""
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats=3)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OtherLoad:
    """Share of the machine's CPU time used by other processes between ``start`` and ``stop`` (Linux)."""

    def __init__(self):
        self.available = Path("/proc/stat").exists()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        total, idle = sum(fields), fields[3] + fields[4]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return total, total - idle, float(own[11]) + float(own[12])  # utime + stime of all our threads

    def start(self) -> None:
        self.begin = self._sample() if self.available else None

    def stop(self) -> float | None:
        if not self.begin:
            return None
        total, busy, own = (end - begin for end, begin in zip(self._sample(), self.begin))
        return max(busy - own, 0.0) / total if total else None


class PeakMemory:
    """Peak memory since the last ``reset``: process RSS high-water mark on CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.can_reset = device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK)

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset:
            if _LIBC is not None:
                _LIBC.malloc_trim(0)  # hand freed heap back, so that the next peak starts from live memory
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kib("VmHWM") * 1024

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")


def peak_tensor_bytes(fn, device: torch.device) -> int:
    """Peak bytes of tensors that ``fn`` allocates and holds at once (exact, unlike RSS, which keeps freed heap).

    On CPU from the profiler's allocation records, op by op; on CUDA from the caching allocator's peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    live = peak = 0
    for event in sorted((e for e in profiler.events() if e.cpu_parent is None), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


@torch.no_grad()
def prefill_memory(model, embeds: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int, device) -> dict:
    """Peak tensor memory of the decoder prefill, KV cache included, whole vs in chunks (an untimed pass)."""
    result = {}
    for label, chunk in (("whole", embeds.shape[1]), ("chunked", chunk_size)):

        def prefill(chunk=chunk):
            model.incremental_prefilling(inputs_embeds=embeds, attention_mask=attention_mask, chunk_size=chunk)

        result[f"{label}_gb"] = peak_tensor_bytes(prefill, device) / GIB
    result["reduction"] = 1 - result["chunked_gb"] / result["whole_gb"]
    return result


# ---------------------------------------------------------------------------------------------- the model


def build_model(
    variant: str, layers: int | None, dtype: torch.dtype, device: torch.device, seed: int = 0, pack: bool = True
):
    """The variant's real dimensions with random weights: built on the meta device, then filled in place, then
    packed where ``from_pretrained`` would pack them (``pack=False``: left in PyTorch's layout)."""
    settings = published_config(variant)
    if layers:
        settings["language_config"]["num_hidden_layers"] = layers
    config = DeepseekVLV2Config(**settings)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DeepseekVLV2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    fill_random(model, seed)
    if pack:
        pack_weights(model)  # as from_pretrained does
    return model.eval()


def build_processor(variant: str, folder: str | Path) -> DeepseekVLV2Processor:
    """The variant's processor, its tokenizer files written to ``folder`` (small has its own tokenizer)."""
    flavor = "small" if variant == "small" else "tiny"
    return DeepseekVLV2Processor(build_tokenizer(folder, flavor), candidate_resolutions=CANDIDATE_RESOLUTIONS)


def random_pool(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """The generator and the pool of Gaussian values that :func:`fill_random_tensor` draws from."""
    generator = torch.Generator().manual_seed(seed)
    return generator, torch.randn(1 << 22, generator=generator)


@torch.no_grad()
def fill_random_tensor(name: str, tensor: torch.Tensor, generator: torch.Generator, pool: torch.Tensor) -> None:
    """Weights of std 1/sqrt(fan_in) copied from the random pool (fast); norms one; routers truly random.

    Real routers spread tokens over the experts, which is what decode reads; a pool-made router might not.
    The rule reads the tensor's name and shape only, so it fills the model's stacked experts and the
    published per-expert tensors alike.
    """
    if "norm" in name:
        tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        return
    fan_in = tensor.shape[-1] if tensor.ndim in (2, 3) else max(tensor.shape[1:].numel(), 1)
    if name.endswith("gate.weight"):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * fan_in**-0.5)
        return
    scale = 0.02 if tensor.ndim == 1 else fan_in**-0.5
    span = pool.numel() - 4096
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), span):
        offset = int(torch.randint(0, 4096, (1,), generator=generator))
        count = min(span, flat.numel() - start)
        flat[start : start + count].copy_(pool[offset : offset + count] * scale)


def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Every parameter of ``model`` filled by :func:`fill_random_tensor`, in place."""
    generator, pool = random_pool(seed)
    pool = pool.to(next(model.parameters()).device)
    for name, param in model.named_parameters():
        fill_random_tensor(name, param, generator, pool)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear_parameters(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


# ---------------------------------------------------------------------------------------------- FLOPs and bytes


def vision_flops_per_tile(model: DeepseekVLV2ForCausalLM) -> float:
    vision, config = model.vision, model.config.vision_config
    patches = config.num_patches_per_side**2
    blocks = sum(linear_parameters(block) for block in vision.blocks)
    attention = 2 * 2 * patches**2 * config.width * len(vision.blocks)  # QK^T and PV
    patch_embed = vision.patch_embed.proj.weight.numel()
    ratio = model.config.projector_config.downsample_ratio
    projected = math.ceil(config.num_patches_per_side / ratio) ** 2  # the projector pads the grid up
    return 2 * patches * (blocks + patch_embed) + attention + 2 * projected * linear_parameters(model.projector)


def layer_parameters(layer: torch.nn.Module, experts: float) -> int:
    """Weights of one decoder layer that its tokens use, with ``experts`` distinct routed experts."""
    size = parameter_count(layer.self_attn) + parameter_count(layer.input_layernorm) * 2
    mlp = layer.mlp
    if not isinstance(mlp, DeepseekV2MoE):
        return size + parameter_count(mlp)
    per_expert = mlp.experts.gate_up_proj[0].numel() + mlp.experts.down_proj[0].numel()
    shared = parameter_count(mlp.shared_experts) if mlp.shared_experts is not None else 0
    return size + mlp.gate.weight.numel() + shared + experts * per_expert


def attention_widths(config) -> tuple[int, int, int]:
    """(query/key width, value width, cached values per token) summed over heads, for one layer."""
    heads = config.num_attention_heads
    if config.use_mla:
        return heads * config.q_head_dim, heads * config.v_head_dim, config.kv_lora_rank + config.qk_rope_head_dim
    return heads * config.head_dim, heads * config.head_dim, 2 * config.num_key_value_heads * config.head_dim


def prefill_flops(model: DeepseekVLV2ForCausalLM, row_lengths: list[int]) -> float:
    """Matmul FLOPs of a prefill: every real token through its top-k experts, causal attention, one LM-head row."""
    config = model.config.language_config
    layers = model.language.model.layers
    per_token = 2 * sum(layer_parameters(layer, config.num_experts_per_tok) for layer in layers)
    qk, v, _ = attention_widths(config)
    attention = len(layers) * sum(2 * (qk + v) * n * (n + 1) / 2 for n in row_lengths)
    lm_head = 2 * model.language.lm_head.weight.numel() * len(row_lengths)
    return per_token * sum(row_lengths) + attention + lm_head


def decode_bytes_per_step(model, batch: int, kv_length: float, experts_per_layer: dict[int, float]) -> float:
    """Bytes one decode step must read: the weights its tokens use (once per batch) and every row's KV cache.

    ``experts_per_layer`` gives the distinct routed experts a step used per MoE layer (top-k at batch 1).
    """
    config = model.config.language_config
    layers = model.language.model.layers
    weights = sum(layer_parameters(layer, experts_per_layer.get(i, 0)) for i, layer in enumerate(layers))
    weights += parameter_count(model.language.lm_head) + parameter_count(model.language.model.norm)
    weights += batch * config.hidden_size  # embedding rows
    _, _, cached_per_token = attention_widths(config)
    kv = batch * kv_length * cached_per_token * len(layers)
    return (weights + kv) * model.language.lm_head.weight.element_size()


# ---------------------------------------------------------------------------------------------- workloads


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def long_text(processor: DeepseekVLV2Processor, tokens: int, offset: int) -> str:
    """English text of about ``tokens`` prompt tokens (with the chat format around it)."""
    words = []
    while True:
        words.append(_WORDS[(offset + len(words)) % len(_WORDS)])
        text = " ".join(words)
        if processor.count_tokens(chat(text)) >= tokens:
            return text


def chat(text: str, images: int = 0) -> list[dict]:
    return [{"role": "<|User|>", "content": "<image>\n" * images + text}, {"role": "<|Assistant|>", "content": ""}]


def workload_images(name: str, row: int) -> list[Image.Image]:
    """The pictures of one row of an image workload."""
    if name == "one_image":
        return [picture(1024, 768, seed=row)]
    return [
        picture(1024, 768, seed=10 * row),
        picture(768, 1024, seed=10 * row + 1),
        picture(640, 480, seed=10 * row + 2),
    ]


def workload(processor: DeepseekVLV2Processor, name: str, batch: int, text_tokens: int):
    """``batch`` different conversations of the kind ``name`` (rows differ, as in real batched serving)."""
    rows = []
    for row in range(batch):
        if name == "one_image":
            images = workload_images(name, row)
            text = ["Describe this image in detail.", "What is in the picture?", "Read the text in the image.",
                    "Count the objects in the image."][row % 4]  # fmt: skip
        elif name == "three_images":
            images = workload_images(name, row)
            text = "Compare these three images."
        elif name == "text":
            images, text = [], long_text(processor, text_tokens + 3 * row, offset=7 * row)
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        rows.append(processor(conversations=chat(text, len(images)), images=images, force_batchify=False))
    return processor.batchify(rows)


# ---------------------------------------------------------------------------------------------- one run


class StepClock(LogitsProcessor):
    """Timestamps each generation step (called once the step's logits exist) and marks the end of prefill."""

    def __init__(self, device: torch.device, on_first_step):
        self.device, self.on_first_step, self.times = device, on_first_step, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.on_first_step()
        return scores


@dataclass
class Probe:
    """Hooks that time the vision tower, track peak memory per phase and record the experts each decode step used."""

    device: torch.device
    memory: PeakMemory
    vision_start: float = 0.0
    vision_end: float = 0.0
    vision_peak: int = 0
    prefill_start: int = 0
    prefill_peak: int = 0
    decoding: bool = False
    routes: list = field(default_factory=list)
    embeds: torch.Tensor | None = None

    def attach(self, model: DeepseekVLV2ForCausalLM) -> list:
        handles = [
            model.vision.register_forward_pre_hook(self._vision_starts),
            model.projector.register_forward_hook(self._vision_ends),
        ]
        for i, layer in enumerate(model.language.model.layers):
            if isinstance(layer.mlp, DeepseekV2MoE):
                handles.append(layer.mlp.gate.register_forward_hook(self._route_recorder(i)))
        return handles

    def _vision_starts(self, module, args):
        sync(self.device)
        self.vision_start = time.perf_counter()

    def _vision_ends(self, module, args, output):
        sync(self.device)
        self.vision_end = time.perf_counter()
        self.vision_peak = self.memory.peak()
        self.memory.reset()
        self.prefill_start = self.memory.current()

    def _route_recorder(self, layer_index: int):
        def record(module, args, output):
            if self.decoding:
                self.routes.append((layer_index, output[0]))

        return record

    def prefill_done(self):
        self.prefill_peak = self.memory.peak()
        self.memory.reset()
        self.decoding = True

    def experts_per_layer(self) -> dict[int, float]:
        per_layer: dict[int, list[int]] = {}
        for layer, indices in self.routes:
            per_layer.setdefault(layer, []).append(indices.unique().numel())
        return {layer: sum(counts) / len(counts) for layer, counts in per_layer.items()}


@torch.no_grad()
def image_inputs(inputs) -> dict:
    """The processor output's image arguments for the model, none for a prompt without images."""
    if not inputs.images_spatial_crop.any():
        return {}
    return {k: inputs[k] for k in ("images", "images_seq_mask", "images_spatial_crop")}


def run(model, processor, inputs, args, device, chunk_size: int | None):
    """Generate ``args.new_tokens`` tokens for ``inputs``: (figures, prompt embeddings of a chunked run or None)."""
    memory, load = PeakMemory(device), OtherLoad()
    probe = Probe(device, memory)
    handles = probe.attach(model)
    clock = StepClock(device, probe.prefill_done)
    inputs = inputs.to(device)
    tokenizer = processor.tokenizer
    generation = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([clock]),
    )  # fmt: skip
    images = image_inputs(inputs)
    # Shared hosts drift: each run's ratios use the bandwidth and matmul rate measured right around it.
    bandwidth_before, matmul_before = memory_bandwidth(device), matmul_rate(device, model.dtype)
    sync(device)
    memory.reset()
    baseline = probe.prefill_start = memory.current()
    load.start()
    start = time.perf_counter()
    try:
        if chunk_size:
            embeds, cache = model.incremental_prefilling(
                input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, chunk_size=chunk_size, **images
            )
            probe.embeds = embeds
            model.generate(
                input_ids=inputs.input_ids, inputs_embeds=embeds, attention_mask=inputs.attention_mask, cache=cache,
                **generation,
            )  # fmt: skip
        else:
            model.generate(
                input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **images, **generation
            )
    finally:
        for handle in handles:
            handle.remove()
    others = load.stop()
    decode_peak = memory.peak()
    bandwidth = (bandwidth_before + memory_bandwidth(device)) / 2
    matmul = (matmul_before + matmul_rate(device, model.dtype)) / 2

    batch, prompt = inputs.input_ids.shape
    tiles = sum(num_tiles(grid) for row in inputs.images_spatial_crop.tolist() for grid in row if all(grid))
    times = clock.times
    ttft = times[0] - start
    vision = probe.vision_end - probe.vision_start if tiles else 0.0
    steps = len(times) - 1
    step_seconds = (times[-1] - times[0]) / steps
    experts = probe.experts_per_layer()
    step_bytes = decode_bytes_per_step(model, batch, prompt + (steps + 1) / 2, experts)
    roofline = batch * bandwidth / step_bytes
    vision_flops = tiles * vision_flops_per_tile(model)
    language_flops = prefill_flops(model, inputs.attention_mask.sum(-1).tolist())
    return {
        "batch": batch,
        "chunk_size": chunk_size,
        "prompt_tokens": prompt,
        "tiles": tiles,
        "vision_s": vision,
        "prefill_s": ttft - vision,
        "ttft_s": ttft,
        "vision_flops_fraction": vision_flops / vision / matmul if tiles else None,
        "prefill_flops_fraction": language_flops / (ttft - vision) / matmul,
        "ttft_over_flop_bound": ttft / ((vision_flops + language_flops) / matmul),
        "decode_steps": steps,
        "decode_tokens_per_s": batch / step_seconds,
        "decode_step_gb": step_bytes / 1e9,
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "matmul_gflop_per_s": matmul / 1e9,
        "routed_experts_per_step": sum(experts.values()) / len(experts) if experts else None,
        "roofline_tokens_per_s": roofline,
        "decode_over_roofline": batch / step_seconds / roofline,
        "baseline_memory_gb": baseline / GIB,
        "vision_peak_gb": probe.vision_peak / GIB if tiles else None,
        "prefill_peak_gb": probe.prefill_peak / GIB,
        "prefill_extra_gb": (probe.prefill_peak - probe.prefill_start) / GIB,
        "decode_peak_gb": decode_peak / GIB,
        "peak_gb": max(probe.vision_peak, probe.prefill_peak, decode_peak) / GIB,
        "other_processes_cpu": others,
    }, probe.embeds


def chat_turns(model, processor, name: str, new_tokens: int) -> list[dict]:
    """TTFT of each turn of a three-turn chat about the images of ``name``, without reuse and with it."""
    images, rows = workload_images(CHAT_WORKLOADS[name], 0), []
    for reuse in (False, True):
        chat_api, result = DeepseekVL2Chat(model, processor, reuse=reuse), None
        for turn, question in enumerate(CHAT_QUESTIONS, start=1):
            result = chat_api.chat(
                question,
                images=images if result is None else (),
                history=None if result is None else result.history,
                greedy=True,
                max_new_tokens=new_tokens,
            )
            rows.append({
                "workload": name, "reuse": reuse, "turn": turn, "prompt_tokens": result.prompt_tokens,
                "reused_tokens": result.reused_tokens, "ttft_s": result.timings["prefill_s"],
                "kept_gb": chat_api.reuse.nbytes / GIB if reuse else 0.0,
            })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- report


COLUMNS = [
    ("workload", "{}", "workload"),
    ("batch", "{}", "batch"),
    ("chunk_size", "{}", "chunk"),
    ("prompt_tokens", "{}", "tokens"),
    ("tiles", "{}", "tiles"),
    ("vision_s", "{:.2f}", "vision s"),
    ("vision_flops_fraction", "{:.0%}", "vis FLOP%"),
    ("prefill_s", "{:.2f}", "prefill s"),
    ("prefill_flops_fraction", "{:.0%}", "pre FLOP%"),
    ("ttft_s", "{:.2f}", "TTFT s"),
    ("ttft_over_flop_bound", "{:.2f}", "TTFT/bound"),
    ("decode_tokens_per_s", "{:.1f}", "decode tok/s"),
    ("bandwidth_gb_per_s", "{:.1f}", "copy GB/s"),
    ("roofline_tokens_per_s", "{:.1f}", "roofline"),
    ("decode_over_roofline", "{:.0%}", "of roofline"),
    ("prefill_extra_gb", "{:.2f}", "prefill +GB"),
    ("peak_gb", "{:.2f}", "peak GB"),
    ("other_processes_cpu", "{:.0%}", "others' CPU"),
]


CHAT_COLUMNS = [
    ("workload", "{}", "workload"),
    ("reuse", "{}", "reuse"),
    ("turn", "{}", "turn"),
    ("prompt_tokens", "{}", "tokens"),
    ("reused_tokens", "{}", "reused"),
    ("ttft_s", "{:.2f}", "TTFT s"),
    ("kept_gb", "{:.3f}", "kept GB"),
]


def table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    cells = [[header for _, _, header in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, fmt, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to build: which variant's real dimensions, how many decoder layers, dtype and device."""
    parser.add_argument("--variant", choices=VARIANTS, default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    workloads = [*WORKLOADS, *CHAT_WORKLOADS]
    parser.add_argument("--workloads", nargs="+", choices=workloads, default=workloads)
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--chunk_size", type=int, default=None, help="also run incremental prefilling in chunks of this size"
    )
    parser.add_argument(
        "--quantize", choices=tuple(SHORT_FORMS), help="quantize the decoder's weights (in place, after building)"
    )
    parser.add_argument("--quantize_vision", action="store_true", help="with --quantize: the vision tower's too")
    parser.add_argument(
        "--kernel_choice", choices=["timed", "rules"], default="timed",
        help="kernels measured on first use and on the first decode steps (the default), or the fixed rules alone",
    )  # fmt: skip
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per run (at least 2)")
    parser.add_argument("--text_tokens", type=int, default=218, help="prompt length of the text workload")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results-<variant>-<device>-<dtype>[-<quantize>].json)",
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (one prefill step and one decode step)")
    if args.quantize_vision and not args.quantize:
        parser.error("--quantize_vision needs --quantize int8|int4")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    kernels.time_kernels(args.kernel_choice == "timed")

    machine = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bandwidth_bytes_per_s": memory_bandwidth(device),
        "matmul_flop_per_s": matmul_rate(device, dtype),
    }
    print(f"{machine['cpu']} ({machine['cpu_threads']} threads){', ' + machine['gpu'] if machine['gpu'] else ''}, "
          f"torch {machine['torch']}: copy {machine['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{args.dtype} matmul {machine['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s", flush=True)  # fmt: skip

    start = time.perf_counter()
    model = build_model(args.variant, args.layers, dtype, device, pack=not args.quantize)
    packed = packed_modules(model)
    if args.quantize:
        config = DeepseekVL2QuantizationConfig.from_short_form(args.quantize, args.quantize_vision)
        quantize_in_place(model, config)
    sync(device)
    load_seconds = time.perf_counter() - start
    decoder = model.config.language_config
    print(f"{args.variant}: {parameter_count(model) / 1e9:.2f} B parameters ({parameter_bytes(model) / 1e9:.1f} GB "
          f"{args.dtype}), {decoder.num_hidden_layers} decoder layers, built with random weights in "
          f"{load_seconds:.1f} s; {packed} modules' weights packed for oneDNN", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as folder:
        processor = build_processor(args.variant, folder)

    # One untimed pass through vision, prefill and decode first: one-time allocations and kernel set-up
    # would otherwise land in the first workload's figures.
    small = processor(conversations=chat("Hello.", 1), images=[picture(384, 384, seed=0)], force_batchify=True)
    run(model, processor, small, argparse.Namespace(**{**vars(args), "new_tokens": 2}), device, None)

    rows, memory_passes, chat_rows = [], [], []
    for name in args.workloads:
        if name in CHAT_WORKLOADS:
            chat_rows += chat_turns(model, processor, name, args.new_tokens)
            print(table(chat_rows[-2 * len(CHAT_QUESTIONS) :], CHAT_COLUMNS), flush=True)
            continue
        for batch in args.batch_sizes:
            inputs = workload(processor, name, batch, args.text_tokens)
            for chunk in [None] + ([args.chunk_size] if args.chunk_size else []):
                result, embeds = run(model, processor, inputs, args, device, chunk)
                rows.append({"workload": name, **result})
                print(table([rows[-1]]).split("\n", 2)[-1], flush=True)
                if embeds is not None:
                    memory_passes.append((name, batch, embeds, inputs.attention_mask.to(device)))

    prefill_memory_rows = []
    for name, batch, embeds, mask in memory_passes:
        prefill_memory_rows.append(
            {"workload": name, "batch": batch, "chunk_size": args.chunk_size,
             **prefill_memory(model, embeds, mask, args.chunk_size, device)}
        )  # fmt: skip

    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "model": {
            "variant": args.variant,
            "parameters": parameter_count(model),
            "decoder_layers": decoder.num_hidden_layers,
            "experts_implementation": decoder._experts_implementation,
            "load_s": load_seconds,
            "packed_modules": packed,
        },
        "kernels": kernels.TIMER.choices() if args.kernel_choice == "timed" else "rules",
        "kernel_timings": [dataclasses.asdict(m) for m in kernels.measurements()],
        "results": rows,
        "prefill_memory": prefill_memory_rows,
        "chat_turns": chat_rows,
    }
    print()
    print(table(rows))
    if chat_rows:
        print(table(chat_rows, CHAT_COLUMNS))
    if args.kernel_choice == "timed":
        print("\nkernels chosen (timed on first use, or kept from an earlier run on this machine):")
        for key, kernel in sorted(kernels.TIMER.choices().items()):
            print(f"  {key}: {kernel}")
    for row in prefill_memory_rows:
        print(f"decoder prefill tensor peak, {row['workload']} x{row['batch']}: whole {row['whole_gb'] * 1024:.0f} MB, "
              f"chunks of {row['chunk_size']} {row['chunked_gb'] * 1024:.0f} MB ({-row['reduction']:+.0%})")  # fmt: skip
    weights = args.dtype + (f"-{args.quantize}" if args.quantize else "") + ("-vision" if args.quantize_vision else "")
    output = args.output or Path(__file__).parent / f"results-{args.variant}-{args.device}-{weights}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {output}")
    return report


if __name__ == "__main__":
    main()
