"""Memory planner: will a DeepSeek-VL2 model fit on my GPUs, and how should I load it?

Everything is computed from ``config.json`` alone; weights are never read. The weights' size comes
from the model built on the meta device, image token counts from the processor's tiling rules, and
activation peaks from an account of the tensors our code allocates, block by block, in the order it
allocates them (``tests/test_planner.py`` checks that account against peaks measured on CPU). The
device map is the one ``from_pretrained(device_map="auto", max_memory=...)`` computes for the
recommended ``max_memory``.

    deepseek-vl2 plan --model deepseek-ai/deepseek-vl2-small --gpu-memory 40GiB --images 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .models.configuration import DeepseekV2Config, DeepseekVLV2Config
from .models.cache import cache_capacity
from .models.tiling import tiles_and_tokens
from .options import add_dtype_option, add_model_option, loading_flags
from .quantization.config import SHORT_FORMS, DeepseekVL2QuantizationConfig
from .utils.checkpoint import looks_like_hub_id
from .utils.checks import pick_dtype
from .utils.dtypes import parse_dtype
from .utils.sizes import parse_bytes

FLOAT32 = 4  # RMSNorm statistics, router scores and the expert mix are float32 whatever the model dtype
INT64 = 8
# Chunk sizes tried for incremental prefilling, largest (fastest) first.
CHUNK_SIZES = (4096, 2048, 1024, 512, 256, 128)
# Kept free on every GPU for the CUDA context, kernel workspaces and the caching allocator's slack.
RUNTIME_OVERHEAD = 1 << 30
# CPU's math SDPA kernel, used when the value head is narrower than the query head (MLA), holds scores and
# probabilities of every head in float32 plus a workspace: 2.4 x heads x queries x keys x 4 bytes (measured).
MATH_SDPA_SCORES = 2.4


# ---------------------------------------------------------------------------------------------- inputs


def load_config(model: str | os.PathLike) -> DeepseekVLV2Config:
    """The config of a checkpoint folder, a config.json file or a hub id (only config.json is downloaded)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if not looks_like_hub_id(model) or path.suffix == ".json":
            raise ValueError(f"no config.json at {str(model)!r}")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(model), "config.json"))
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    if not isinstance(config, dict) or config.get("model_type") != DeepseekVLV2Config.model_type:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{path} is not a DeepSeek-VL2 config.json (model_type {found!r}, expected 'deepseek_vl_v2')")
    return DeepseekVLV2Config.from_dict(config)


def parse_image_size(size: str | Sequence[int]) -> tuple[int, int]:
    """``"1024x768"`` (width x height) or a (width, height) pair."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"image size {size!r} must look like 1024x768 (width x height)")
        size = [int(part) for part in parts]
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width, height


def image_tiles_and_tokens(config: DeepseekVLV2Config, image_size: Sequence[int], images: int) -> tuple[int, int]:
    """(384-px tiles, image tokens) that ``images`` images of ``image_size`` become, by the processor's tiling rules."""
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    return tiles_and_tokens(
        [tuple(image_size)] * images,
        config.candidate_resolutions,
        patch_size=config.vision_config.patch_size,
        downsample_ratio=config.projector_config.downsample_ratio,
    )


# ---------------------------------------------------------------------------------------------- weights and cache


def meta_model(config: DeepseekVLV2Config, dtype: torch.dtype) -> torch.nn.Module:
    """The model without storage (meta device): parameter shapes and dtype, for sizes and device maps."""
    from .models.modeling import DeepseekVLV2ForCausalLM

    with torch.device("meta"):
        return DeepseekVLV2ForCausalLM(config).to(dtype)


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter bytes per part: vision (tower, projector, newline, separator), embeddings, decoder, lm_head."""
    parts = dict.fromkeys(("vision", "embeddings", "decoder", "lm_head"), 0)
    for name, parameter in model.named_parameters():
        if name.startswith("language.model.embed_tokens."):
            part = "embeddings"
        elif name.startswith("language.lm_head."):
            part = "lm_head"
        elif name.startswith("language."):
            part = "decoder"
        else:
            part = "vision"
        parts[part] += parameter.numel() * parameter.element_size()
    return parts


def kv_cache_bytes_per_token(config: DeepseekV2Config, dtype: torch.dtype) -> int:
    """KV cache per token, all layers: MLA keeps the normed latent and the roped key, MHA keys and values."""
    if config.use_mla:
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = 2 * config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers * per_layer * dtype.itemsize


# Whole contexts of KV cache that reuse across turns keeps by default (prompt caches and image features).
REUSE_CONTEXTS = 4


def default_reuse_budget(config: DeepseekV2Config, dtype: torch.dtype) -> int:
    """Bytes a chat keeps for reuse across turns unless told otherwise: ``REUSE_CONTEXTS`` full contexts' KV."""
    return REUSE_CONTEXTS * config.max_position_embeddings * kv_cache_bytes_per_token(config, dtype)


# ---------------------------------------------------------------------------------------------- activations
#
# Each function below follows the code op by op and adds up the tensors alive together at the block's
# largest moments. Kernel workspaces are left out, except for CPU's math SDPA kernel where they are large.


def _uses_math_sdpa(config: DeepseekV2Config, device: str) -> bool:
    """CPU SDPA has no fused kernel for a value head narrower than the query head (MLA's 128 vs 192)."""
    return device == "cpu" and config.use_mla and config.v_head_dim != config.q_head_dim


def _attention_peak(config: DeepseekV2Config, q: int, n: int, size: int, masked: bool, device: str) -> int:
    """One attention block, its normed input included and the KV cache not: q new tokens attending to n."""
    hidden = config.hidden_size
    normed = q * hidden * size
    bias = q * n * FLOAT32 if masked else 0  # SDPA turns the boolean mask into a float bias
    if config.use_mla:
        heads, nope, rope, value = (
            config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        )  # fmt: skip
        query = q * heads * (nope + rope) * size
        q_rope = q * heads * rope * size
        compressed = q * (config.kv_lora_rank + rope) * size
        latent = q * config.kv_lora_rank * size
        # q_rope is reordered and roped (two temporaries) while the query and compressed kv are alive
        roping = normed + query + compressed + latent + q_rope + 2 * q_rope
        # the cached latents of all n keys expanded to per-head keys and values, then the query and the
        # key concatenated from their nope and rope parts
        expanded = n * heads * (nope + value) * size
        sdpa_inputs = query + n * heads * (nope + rope) * size
        output = q * heads * value * size
        if _uses_math_sdpa(config, device):
            bias = int(MATH_SDPA_SCORES * heads * q * n * FLOAT32)  # scores and probabilities, mask included
        attending = normed + query + q_rope + expanded + sdpa_inputs + output + bias
        return max(roping, attending)
    kv_width = config.num_key_value_heads * config.head_dim
    # roping the key: the three projections, the roped query and two temporaries of the key's size
    roping = normed + q * (hidden + 2 * kv_width) * size + q * hidden * size + 2 * q * kv_width * size
    # SDPA reads the cached keys and values in place: the roped query and the output
    attending = normed + q * hidden * size + q * hidden * size + bias
    return max(roping, attending)


def _feed_forward_peak(config: DeepseekV2Config, layer: int, q: int, size: int, outputs_kept: bool) -> int:
    """One feed-forward block, its normed input included, and the experts' per-pair outputs unless kept."""
    hidden = config.hidden_size
    normed = q * hidden * size
    if not config.is_moe_layer(layer):
        return normed + 3 * q * config.intermediate_size * size  # act(gate), up and their product
    intermediate = config.moe_intermediate_size
    pairs = q * config.num_experts_per_tok  # (token, expert) pairs
    busiest = min(q, 2 * pairs // config.n_routed_experts + 1)  # pairs of the busiest expert: twice the mean
    # ``DeepseekV2Experts._run_sorted``: with the router's ids and weights alive, the pairs' order (int64)
    # and a float32 output per pair; each expert gathers its tokens and writes its weighted outputs. Per
    # token of the busiest expert, the most alive at once: gate and up with the gathered input, then with
    # act(gate) and the product, then with the output and its float32 weighted copy.
    routing = pairs * (INT64 + FLOAT32) + pairs * INT64 + (0 if outputs_kept else _pair_outputs_bytes(config, q))
    per_token = max(
        (hidden + 2 * intermediate) * size,
        4 * intermediate * size,
        (2 * intermediate + hidden) * size + (hidden + 1) * FLOAT32,
    )
    one_expert = routing + busiest * (2 * INT64 + per_token)
    # the weighted sum over each token's experts in float32, then its cast to the model dtype
    combine = routing + q * hidden * (FLOAT32 + size)
    router = 2 * q * config.n_routed_experts * FLOAT32
    shared = 0
    if config.n_shared_experts:
        shared = q * hidden * size + 3 * q * intermediate * config.n_shared_experts * size
    return normed + max(router, one_expert, combine, shared)


def _pair_outputs_bytes(config: DeepseekV2Config, q: int) -> int:
    """The routed experts' float32 output per (token, expert) pair: a pass keeps it from its first MoE layer on."""
    return q * config.num_experts_per_tok * config.hidden_size * FLOAT32 if config.n_routed_experts else 0


def _prefill_steps(prompt_tokens: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """(new tokens, keys) of the forward passes that can peak: the full pass, or the last two chunks."""
    if chunk_size is None:
        return [(prompt_tokens, prompt_tokens)]
    prefilled = prompt_tokens - 1  # incremental prefilling leaves the last token to generate()
    ends = sorted({min(end, prefilled) for end in range(chunk_size, prefilled + chunk_size, chunk_size)})[-2:]
    return [(end - (math.ceil(end / chunk_size) - 1) * chunk_size, end) for end in ends if end > 0]


def decoder_prefill_peak(
    config: DeepseekV2Config,
    prompt_tokens: int,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> int:
    """Bytes above the loaded model at the peak of prefilling ``prompt_tokens`` (batch of one, no padding).

    ``chunk_size=None`` is one forward pass over the prompt (what ``generate`` does, with logits for the
    last token only), otherwise ``incremental_prefilling(chunk_size=...)``. Counts the prompt's
    embeddings, its KV cache and the largest set of temporaries alive at once in any layer.
    ``device`` ("cuda" or "cpu") selects which attention kernels run.
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    size, hidden, layers = dtype.itemsize, config.hidden_size, config.num_hidden_layers
    cache_per_layer = kv_cache_bytes_per_token(config, dtype) // layers
    rope_dim = config.qk_rope_head_dim if config.use_mla else config.head_dim
    embeddings = prompt_tokens * hidden * size
    first_moe_layer = next((layer for layer in range(layers) if config.is_moe_layer(layer)), layers)
    peak = embeddings
    for q, n in _prefill_steps(prompt_tokens, chunk_size):
        masked = n > q  # one full causal pass needs no mask
        shared = embeddings + (q * n if masked else 0) + 2 * q * rope_dim * size  # boolean mask, cos, sin
        # this layer's cache and the earlier ones hold n tokens, the later ones n - q; only the last chunk
        # can be a one-token (decode-like) step, unless every chunk is
        held = cache_capacity(n, decoded=n if chunk_size == 1 else int(q == 1))
        held_before = cache_capacity(n - q, decoded=n - q if chunk_size == 1 else 0)
        for layer in range(layers):
            cached_tokens = (layer + 1) * held + (layers - layer - 1) * held_before
            cache = cached_tokens * cache_per_layer
            layer_input = q * hidden * size if layer else 0  # the first layer reads the embeddings
            kept = device == "cpu" and layer > first_moe_layer  # ``scratch`` keeps the per-pair outputs
            base = shared + cache + layer_input + (_pair_outputs_bytes(config, q) if kept else 0)
            attention = _attention_peak(config, q, n, size, masked, device)
            # + attention's output
            feed_forward = q * hidden * size + _feed_forward_peak(config, layer, q, size, kept)
            peak = max(peak, base + attention, base + feed_forward)
    return peak


def vision_peak(config: DeepseekVLV2Config, tiles: int, prompt_tokens: int, dtype: torch.dtype) -> int:
    """Bytes above the loaded model while the images are encoded (``prepare_inputs_embeds``).

    The prompt's token embeddings, the float32 pixels (the processor's and the model's gathered copy,
    cast to the model dtype) and the largest ViT block step: attention (input, normed input, q/k/v,
    its output, reshaped and projected) or the MLP (input, normed input, hidden activations with GELU
    in place, output).
    """
    if tiles == 0:
        return 0
    vision, size = config.vision_config, dtype.itemsize
    pixels = tiles * 3 * vision.image_size**2
    patches = tiles * vision.num_patches_per_side**2
    width_unit = patches * vision.width * size
    block = max(8 * width_unit, 3 * width_unit + patches * vision.mlp_hidden_dim * size)
    embeddings = prompt_tokens * config.language_config.hidden_size * size
    return embeddings + pixels * (FLOAT32 + size) + block


def decode_cache_positions(prompt_tokens: int, context_tokens: int) -> int:
    """Positions each cache layer holds, and a one-token step attends over, while the last token is generated.

    The last new token is never fed back. The prompt is prefilled in one pass, or in chunks that leave its
    last token to a decode step: the larger of the two.
    """
    written = max(context_tokens - 1, prompt_tokens)
    decoded = written - prompt_tokens
    return max(cache_capacity(written, decoded), cache_capacity(written, decoded + 1))


def decode_peak(config: DeepseekV2Config, prompt_tokens: int, context_tokens: int, dtype: torch.dtype) -> int:
    """Bytes above the loaded model while generating the last token: the prompt's embeddings, the whole KV
    cache, the logits (and their float32 copy) and, for MLA, one layer's keys in latent space, which an
    SDPA kernel without native grouped heads repeats for every head."""
    size = dtype.itemsize
    held = decode_cache_positions(prompt_tokens, context_tokens)
    cache = held * kv_cache_bytes_per_token(config, dtype)
    step = 0
    if config.use_mla:
        step = (2 * config.num_attention_heads + 1) * held * (config.kv_lora_rank + config.qk_rope_head_dim)
    logits = config.vocab_size * (size + FLOAT32)
    return prompt_tokens * config.hidden_size * size + cache + step * size + logits


def dequantized_peak(model: torch.nn.Module, config: DeepseekV2Config, dtype: torch.dtype) -> int:
    """Bytes of weights that a quantized model on CUDA holds dequantized at once (each product dequantizes
    its weight for the call): its largest quantized matrix, or one request's decode step's gathered experts."""
    from .quantization import QuantizedLinear

    linears = [m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)]
    gathered = (config.num_experts_per_tok or 0) * 3 * config.moe_intermediate_size * config.hidden_size
    return max([*linears, gathered]) * dtype.itemsize


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """What one request needs and how to load the model for it on the given GPUs (sizes in bytes)."""

    model: str
    dtype: str
    parameters: int
    weights: dict[str, int]  # per part: vision, embeddings, decoder, lm_head
    images: int
    image_size: tuple[int, int]
    image_tiles: int
    image_tokens: int
    prompt_tokens: int
    context_tokens: int
    kv_bytes_per_token: int
    kv_cache: int  # for the whole context
    reuse_budget: int  # kept across turns by a chat (default_reuse_budget), besides the peaks below
    vision_peak: int
    prefill_peak: int  # one pass over the prompt
    chunked_prefill_peaks: dict[int, int]  # per chunk size
    decode_peak: int
    gpus: int
    gpu_memory: int
    chunk_size: int | None  # recommended for incremental prefilling; None: one pass fits
    max_memory: dict[int | str, int]  # for from_pretrained(device_map="auto", max_memory=...)
    device_map: dict[str, int | str]  # what from_pretrained computes with that max_memory
    placed: dict[int | str, int]  # weight bytes per device under device_map
    quantization: str | None = None  # "int8", "int4": weights stored so (whole on one GPU: never offloaded)
    dequantized_peak: int = 0  # quantized weights dequantized at once for their products

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_peak(self) -> int:
        """The largest of image encoding, (chunked) prefill and decoding, for the recommended chunk size, with
        the weights a quantized model dequantizes for a product."""
        prefill = self.prefill_peak if self.chunk_size is None else self.chunked_prefill_peaks[self.chunk_size]
        return max(self.vision_peak, prefill, self.decode_peak) + self.dequantized_peak

    @property
    def offloaded(self) -> int:
        """Weight bytes the device map leaves in CPU RAM or on disk (streamed to a GPU at every forward)."""
        return self.placed.get("cpu", 0) + self.placed.get("disk", 0)

    def to_json(self) -> str:
        summary = {"weight_total": self.weight_total, "activation_peak": self.activation_peak}
        return json.dumps({**asdict(self), **summary}, indent=2)

    def report(self) -> str:
        return _report(self)


@dataclass(frozen=True)
class _Request:
    """What both plans read from their arguments, checked: the model's config and name, the dtype, the prompt
    and how the weights are stored."""

    config: DeepseekVLV2Config
    name: str
    dtype: torch.dtype
    image_size: tuple[int, int]
    tiles: int
    image_tokens: int
    prompt_tokens: int
    context_tokens: int
    quantization: DeepseekVL2QuantizationConfig | None

    @classmethod
    def read(
        cls, model, images: int, image_size, text_tokens: int, max_new_tokens: int, dtype, quantization
    ) -> _Request:
        config = model if isinstance(model, DeepseekVLV2Config) else load_config(model)
        name = (config.name_or_path or "model") if isinstance(model, DeepseekVLV2Config) else str(model)
        dtype = parse_dtype(dtype)
        image_size = parse_image_size(image_size)
        if min(text_tokens, max_new_tokens) < 0:
            raise ValueError(f"token counts must be >= 0, got {text_tokens} text and {max_new_tokens} new tokens")
        tiles, image_tokens = image_tiles_and_tokens(config, image_size, images)
        prompt_tokens = max(text_tokens + image_tokens, 1)
        if isinstance(quantization, str):
            quantization = DeepseekVL2QuantizationConfig.from_short_form(quantization)
        return cls(config, name, dtype, image_size, tiles, image_tokens, prompt_tokens,
                   prompt_tokens + max_new_tokens, quantization)  # fmt: skip

    @property
    def stored(self) -> str | None:
        """The quantized weights' name ("int8", "int4"), or None for the model dtype."""
        return None if self.quantization is None else f"int{self.quantization.bits}"

    def stored_model(self) -> torch.nn.Module:
        """The meta model with its weights as loading will store them (quantized where asked)."""
        from .quantization.selection import quantize_modules

        meta = meta_model(self.config, self.dtype)
        if self.quantization is not None:
            quantize_modules(meta, self.quantization)
        return meta


def plan_memory(
    model: str | os.PathLike | DeepseekVLV2Config,
    gpu_memory: int | str,
    *,
    gpus: int = 1,
    images: int = 0,
    image_size: str | Sequence[int] = (1024, 768),
    text_tokens: int = 256,
    max_new_tokens: int = 512,
    dtype: str | torch.dtype = "bf16",
    cpu_memory: int | str | None = None,
    quantization=None,
) -> MemoryPlan:
    """Plan one request: ``images`` images of ``image_size`` and ``text_tokens`` other prompt tokens (chat
    format included), answered in up to ``max_new_tokens``, on ``gpus`` GPUs of ``gpu_memory`` each.

    ``model`` is a hub id, a checkpoint folder, a config.json path or a config. ``cpu_memory`` bounds
    the weights offloaded to RAM (default: as much as needed); beyond it they go to disk. ``quantization``
    ("int8", "int4" or a ``DeepseekVL2QuantizationConfig``) plans the quantized weights whole on one GPU.
    """
    request = _Request.read(model, images, image_size, text_tokens, max_new_tokens, dtype, quantization)
    gpu_memory = parse_bytes(gpu_memory)
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if request.quantization is not None and (gpus != 1 or cpu_memory is not None):
        raise ValueError("a quantized model loads whole on one GPU: plan it for one GPU, without cpu_memory")
    config, dtype, tiles, prompt_tokens, context_tokens = (
        request.config, request.dtype, request.tiles, request.prompt_tokens, request.context_tokens
    )  # fmt: skip
    language = config.language_config

    meta = request.stored_model()
    transient = 0 if request.quantization is None else dequantized_peak(meta, language, dtype)
    weights = weight_bytes(meta)
    kv_per_token = kv_cache_bytes_per_token(language, dtype)
    full = decoder_prefill_peak(language, prompt_tokens, None, dtype)
    chunked = {c: decoder_prefill_peak(language, prompt_tokens, c, dtype) for c in CHUNK_SIZES if c < prompt_tokens}
    images_peak = vision_peak(config, tiles, prompt_tokens, dtype)
    decoding = decode_peak(language, prompt_tokens, context_tokens, dtype)

    # Each GPU keeps room for the whole activation peak and KV cache besides its weights (conservative
    # with several GPUs, which share the cache). Prefill in one pass if that fits, else in the largest
    # chunks that fit.
    total = sum(weights.values())
    options = [(None, full), *sorted(chunked.items(), reverse=True)]

    def reserve(prefill: int) -> int:
        return RUNTIME_OVERHEAD + max(images_peak, prefill, decoding) + transient

    fitting = [(c, peak) for c, peak in options if total + gpus * reserve(peak) <= gpus * gpu_memory]
    if not fitting:
        # Some weights are offloaded and every forward pass streams them to the GPU again: prefill in as few
        # passes as still leave half of each GPU to weights.
        fitting = [(c, peak) for c, peak in options if reserve(peak) <= gpu_memory // 2] or options[-1:]
    chunk_size, prefill = fitting[0]
    max_memory: dict[int | str, int] = dict.fromkeys(range(gpus), max(gpu_memory - reserve(prefill), 0))
    max_memory["cpu"] = total if cpu_memory is None else parse_bytes(cpu_memory)
    device_map = auto_device_map(meta, max_memory)
    return MemoryPlan(
        model=request.name,
        dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in meta.parameters()),
        weights=weights,
        images=images,
        image_size=request.image_size,
        image_tiles=tiles,
        image_tokens=request.image_tokens,
        prompt_tokens=prompt_tokens,
        context_tokens=context_tokens,
        kv_bytes_per_token=kv_per_token,
        kv_cache=kv_per_token * context_tokens,
        reuse_budget=default_reuse_budget(language, dtype),
        vision_peak=images_peak,
        prefill_peak=full,
        chunked_prefill_peaks=chunked,
        decode_peak=decoding,
        gpus=gpus,
        gpu_memory=gpu_memory,
        chunk_size=chunk_size,
        max_memory=max_memory,
        device_map=device_map,
        placed=bytes_per_device(meta, device_map),
        quantization=request.stored,
        dequantized_peak=transient,
    )



# Resident memory of the process besides weights and activations (Python, torch, allocator slack): RSS
# after loading tiny minus its weights, ``benchmarks/load_memory.py``, rounded up.
CPU_RUNTIME_OVERHEAD = 512 << 20


@dataclass
class CpuPlan:
    """What one request needs on CPU, in RAM, with the weights optionally quantized (sizes in bytes)."""

    model: str
    dtype: str
    quantization: str | None
    weights: dict[str, int]  # per part, as stored (quantized parts with their scales)
    prompt_tokens: int
    kv_cache: int
    activation_peak: int  # image encoding, one-pass prefill or decoding, the largest
    reuse_budget: int
    ram: int

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values())

    @property
    def needed(self) -> int:
        """Weights, the activation peak and the runtime; a chat's kept reuse state comes on top."""
        return self.weight_total + self.activation_peak + CPU_RUNTIME_OVERHEAD

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "weight_total": self.weight_total, "needed": self.needed}, indent=2)

    def report(self) -> str:
        weights = ", ".join(f"{part} {_size(size)}" for part, size in self.weights.items())
        stored = self.quantization or self.dtype
        lines = [
            f"{self.model} on CPU, {stored} weights ({self.dtype} activations)",
            f"  weights         {_size(self.weight_total)} ({weights})",
            f"  prompt          {self.prompt_tokens} tokens; KV cache {_size(self.kv_cache)} with the answer",
            f"  activation peak {_size(self.activation_peak)} (image encoding, prefill in one pass or decoding)",
            f"  runtime         about {_size(CPU_RUNTIME_OVERHEAD)} (Python, torch)",
            f"  reuse           up to {_size(self.reuse_budget)} kept between turns by a chat (--reuse_budget)",
            "",
        ]
        if self.needed <= self.ram:
            lines.append(f"Verdict: fits in {_size(self.ram)} of RAM (needs about {_size(self.needed)})")
        else:
            lines.append(f"Verdict: does not fit in {_size(self.ram)} of RAM: needs about {_size(self.needed)}")
        flags = " ".join(loading_flags(dtype=self.dtype, device="cpu", quantization=self.quantization))
        lines.append(f"Flags:   {flags}  (deepseek-vl2 and the web demo)")
        return "\n".join(lines)


def plan_cpu_memory(
    model: str | os.PathLike | DeepseekVLV2Config,
    ram: int | str,
    *,
    quantization=None,
    images: int = 0,
    image_size: str | Sequence[int] = (1024, 768),
    text_tokens: int = 256,
    max_new_tokens: int = 512,
    dtype: str | torch.dtype = "bf16",
) -> CpuPlan:
    """Plan one request on CPU with ``ram`` of memory, the weights as ``quantization`` stores them ("int8",
    "int4" or a ``DeepseekVL2QuantizationConfig``; None: the model dtype)."""
    request = _Request.read(model, images, image_size, text_tokens, max_new_tokens, dtype, quantization)
    language, dtype = request.config.language_config, request.dtype
    peak = max(
        vision_peak(request.config, request.tiles, request.prompt_tokens, dtype),
        decoder_prefill_peak(language, request.prompt_tokens, None, dtype, device="cpu"),
        decode_peak(language, request.prompt_tokens, request.context_tokens, dtype),
    )
    return CpuPlan(
        model=request.name,
        dtype=str(dtype).removeprefix("torch."),
        quantization=request.stored,
        weights=weight_bytes(request.stored_model()),
        prompt_tokens=request.prompt_tokens,
        kv_cache=kv_cache_bytes_per_token(language, dtype) * request.context_tokens,
        activation_peak=peak,
        reuse_budget=default_reuse_budget(language, dtype),
        ram=parse_bytes(ram),
    )


@contextmanager
def _quiet(logger_name: str):
    """Silence a logger (accelerate warns about each planned GPU this machine does not have)."""
    logger = logging.getLogger(logger_name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def auto_device_map(model: torch.nn.Module, max_memory: Mapping[int | str, int]) -> dict[str, int | str]:
    """The map ``from_pretrained(device_map="auto", max_memory=max_memory)`` computes for this model.

    The model may live on the meta device. Decoder layers and the whole vision tower are never split
    (``_no_split_modules``); the vision side comes first in the model, so it shares GPU 0 with the embeddings.
    """
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    no_split = model._no_split_modules
    with _quiet("accelerate.utils.modeling"):
        balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
        return dict(infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split))


def bytes_per_device(model: torch.nn.Module, device_map: Mapping[str, int | str]) -> dict[int | str, int]:
    """Parameter bytes that ``device_map`` places on each device."""
    placed: dict[int | str, int] = {}
    for name, parameter in model.named_parameters():
        key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        placed[device_map[key]] = placed.get(device_map[key], 0) + parameter.numel() * parameter.element_size()
    return placed


# ---------------------------------------------------------------------------------------------- report and CLI


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _device_name(device: int | str) -> str:
    return f"GPU {device}" if isinstance(device, int) else device


PART_LABELS = {
    "vision": "vision tower", "projector": "projector", "language.model.embed_tokens": "embeddings",
    "language.model.norm": "final norm", "language.lm_head": "lm_head", "": "the whole model",
}  # fmt: skip


def _describe_device_map(device_map: Mapping[str, int | str]) -> list[str]:
    """One line per device naming the parts it holds, consecutive decoder layers as a range."""
    held: dict[int | str, list[str | int]] = {}
    for key, device in device_map.items():
        if key.startswith("language.model.layers."):
            held.setdefault(device, []).append(int(key.split(".")[3]))
        elif key in PART_LABELS:
            held.setdefault(device, []).append(PART_LABELS[key])
    return [f"{_device_name(device)}: {', '.join(_with_layer_ranges(parts))}" for device, parts in held.items()]


def _with_layer_ranges(parts: list[str | int]) -> list[str]:
    described: list[str] = []
    run: list[int] = []
    for part in [*parts, None]:
        if isinstance(part, int) and (not run or part == run[-1] + 1):
            run.append(part)
            continue
        if run:
            described.append(f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}")
        run = [part] if isinstance(part, int) else []
        if isinstance(part, str):
            described.append(part)
    return described


def _gib_string(size: int) -> str:
    """A ``max_memory`` value for from_pretrained, rounded down to 0.1 GiB."""
    return f"{math.floor(size / (1 << 30) * 10) / 10}GiB"


def _report(plan: MemoryPlan) -> str:
    weights = ", ".join(f"{part} {_size(size)}" for part, size in plan.weights.items())
    prompt = f"{plan.prompt_tokens} tokens"
    if plan.images:
        width, height = plan.image_size
        prompt += f", {plan.image_tokens} of them for {plan.images} image(s) of {width}x{height}"
        prompt += f" ({plan.image_tiles} tiles)"
    chunked = ", ".join(f"{c} -> {_size(peak)}" for c, peak in plan.chunked_prefill_peaks.items())
    stored = f"{plan.quantization} weights, {plan.dtype} activations" if plan.quantization else plan.dtype
    lines = [
        f"{plan.model} in {stored}: {plan.parameters / 1e9:.2f} B parameters",
        f"  weights         {_size(plan.weight_total)} ({weights})",
        f"  prompt          {prompt}",
        f"  context         {plan.context_tokens} tokens with the answer",
        f"  KV cache        {_size(plan.kv_bytes_per_token)} per token, {_size(plan.kv_cache)} for the context",
        f"  reuse           {_size(plan.reuse_budget)} kept between turns, besides the peaks "
        f"(KV of {REUSE_CONTEXTS} full contexts)",
        "  peaks above the weights (with the prompt's embeddings and KV cache):",
        f"    prefill, one pass       {_size(plan.prefill_peak)}",
    ]
    if chunked:
        lines.append(f"    prefill, chunked        {chunked}")
    if plan.images:
        lines.append(f"    image encoding          {_size(plan.vision_peak)}")
    lines.append(f"    decoding, last token    {_size(plan.decode_peak)}")
    if plan.quantization:
        lines.append(f"    + weights dequantized for a product: {_size(plan.dequantized_peak)}")
    lines += [f"  CUDA context and allocator slack: about {_size(RUNTIME_OVERHEAD)} per GPU", ""]
    gpus = f"{plan.gpus} x {_size(plan.gpu_memory)} GPU" + ("s" if plan.gpus > 1 else "")
    needed = plan.weight_total + plan.activation_peak + RUNTIME_OVERHEAD  # on one GPU
    if plan.quantization and plan.offloaded:
        lines.append(
            f"Verdict: does not fit on {gpus}: needs about {_size(needed)}, and quantized weights are not offloaded "
            "(try int4, or plan for the CPU with --ram)"
        )
        return "\n".join(lines)
    if plan.offloaded:
        lines.append(f"Verdict: does not fit on {gpus}; {_size(plan.offloaded)} of weights must be offloaded")
    elif plan.gpus == 1:
        lines.append(f"Verdict: fits on {gpus} (needs about {_size(needed)})")
    else:
        lines.append(f"Verdict: fits on {gpus}")
    if set(plan.device_map.values()) == {0}:
        quantized = f', quantization="{plan.quantization}"' if plan.quantization else ""
        lines.append(f'Load:    from_pretrained(path, dtype=torch.{plan.dtype}, device_map="cuda"{quantized})')
        placement = {"device": "cuda", "quantization": plan.quantization}
    else:
        placement = {
            "device_map": "auto",
            "max_memory": {device: _gib_string(size) for device, size in plan.max_memory.items()},
            "offload_folder": "offload" if "disk" in plan.device_map.values() else None,
        }
        budgets = ", ".join(
            f"{json.dumps(device)}: {json.dumps(size)}" for device, size in placement["max_memory"].items()
        )
        offload = ', offload_folder="offload"' if placement["offload_folder"] else ""
        arguments = f'dtype=torch.{plan.dtype}, device_map="auto", max_memory={{{budgets}}}{offload}'
        lines.append(f"Load:    from_pretrained(path, {arguments})")
        lines += [f"         {line}" for line in _describe_device_map(plan.device_map)]
    if plan.chunk_size is None:
        lines.append("Prefill: in one pass (plain generate)")
    else:
        lines.append(f"Prefill: model.incremental_prefilling(**inputs, chunk_size={plan.chunk_size}), then generate")
    flags = " ".join(loading_flags(dtype=plan.dtype, chunk_size=plan.chunk_size, **placement))
    lines.append(f"Flags:   {flags}  (deepseek-vl2 and the web demo)")
    if plan.offloaded:
        fast, slow = plan.offloaded / 25e9, plan.offloaded / 10e9
        lines.append(
            f"Speed:   every forward pass copies the {_size(plan.offloaded)} offloaded to the GPU: roughly "
            f"{fast:.1f}-{slow:.1f} s per generated token from CPU RAM over PCIe (10-25 GB/s), much more from disk"
        )
    return "\n".join(lines)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``deepseek-vl2 plan``: its options, and ``run`` to answer it."""
    parser = subparsers.add_parser(
        "plan",
        help="will a model fit my GPUs, and how do I load it? (reads only config.json)",
        description="Will a DeepSeek-VL2 model fit on my GPUs? Reads only config.json; prints the weights' size, "
        "the KV cache, activation peaks, and how to load the model and prefill.",
        epilog="example: deepseek-vl2 plan --model deepseek-ai/deepseek-vl2-small --gpu-memory 40GiB --images 2",
    )
    add_model_option(parser, required=True, help="hub id, checkpoint folder or config.json")
    memory = parser.add_mutually_exclusive_group(required=True)
    memory.add_argument("--gpu-memory", help="memory of each GPU, e.g. 40GiB, 24GB")
    memory.add_argument("--ram", help="plan for the CPU instead, with this much RAM, e.g. 24GiB")
    parser.add_argument(
        "--quantize", choices=list(SHORT_FORMS), help="the weights quantized while loading (on a GPU: whole on one)"
    )
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    parser.add_argument("--cpu-memory", help="RAM for offloaded weights (default: as much as needed)")
    parser.add_argument("--images", type=int, default=0, help="images in the prompt (default 0)")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT of each image (default 1024x768)")
    parser.add_argument("--text-tokens", type=int, default=256, help="prompt tokens besides images (default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate (default 512)")
    add_dtype_option(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    request = {
        "images": args.images,
        "image_size": args.image_size,
        "text_tokens": args.text_tokens,
        "max_new_tokens": args.max_new_tokens,
    }
    try:
        dtype = pick_dtype(args.dtype)
        if args.ram:
            plan = plan_cpu_memory(args.model_path, args.ram, quantization=args.quantize, dtype=dtype, **request)
        else:
            plan = plan_memory(
                args.model_path, args.gpu_memory, gpus=args.gpus, cpu_memory=args.cpu_memory, dtype=dtype,
                quantization=args.quantize, **request,
            )  # fmt: skip
    except (ValueError, OSError) as error:
        print(f"deepseek-vl2 plan: error: {error}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan.report())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepseek_vl2.planner ...`` is ``deepseek-vl2 plan ...``."""
    from .cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
