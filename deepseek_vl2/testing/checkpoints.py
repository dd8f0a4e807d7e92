"""Small DeepSeek-VL2 checkpoints with random weights, written in the published on-disk format.

The real weights cannot be downloaded everywhere (tests, CI, offline demos), so we build look-alikes:
the same files (config.json with the published key set, sharded safetensors with an index, tokenizer
files, processor_config.json), the same parameter names and the same structure as each published
variant, only narrower and shallower. Their weights are random: they produce gibberish, by design.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.configuration import DeepseekVLV2Config
from ..models.modeling import DeepseekVLV2ForCausalLM
from ..models.processing import DeepseekVLV2Processor
from ..quantization.config import DeepseekVL2QuantizationConfig
from .published import VARIANTS, published_config
from .tokenizer import build_tokenizer

# The 23 tile grids of the published checkpoints (multiples of 384 px, at most 9 tiles).
CANDIDATE_RESOLUTIONS = published_config("tiny")["candidate_resolutions"]

EXPERT_WIDTH = 32  # every test checkpoint's moe_intermediate_size

# Language settings per variant, with the key set of the published config it imitates
# (the small and base files leave many fields to the config class's defaults).
_LANGUAGE = {
    "tiny": {
        "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 128, "kv_lora_rank": None,
        "lm_head": True, "max_position_embeddings": 4096, "moe_intermediate_size": EXPERT_WIDTH, "n_group": 1,
        "n_routed_experts": 8, "n_shared_experts": 2, "num_attention_heads": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 3, "num_key_value_heads": 4, "q_lora_rank": None, "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0, "rm_head": False, "topk_group": 1, "topk_method": "greedy", "use_mla": False,
        "v_head_dim": 0,
    },
    "small": {
        "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 128, "kv_lora_rank": 32,
        "max_position_embeddings": 4096, "moe_intermediate_size": EXPERT_WIDTH, "n_group": 1, "n_routed_experts": 8,
        "n_shared_experts": 2, "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "rm_head": False, "topk_group": 1, "topk_method": "greedy",
    },
    "base": {
        "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 128, "kv_lora_rank": 32,
        "lm_head": False, "max_position_embeddings": 4096, "moe_intermediate_size": EXPERT_WIDTH, "n_group": 1,
        "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": 3, "q_lora_rank": None, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "rm_head": False, "routed_scaling_factor": 2.0,
        "scoring_func": "sigmoid", "topk_group": 1, "topk_method": "noaux_tc",
    },
}  # fmt: skip

# small's published tokenizer is DeepSeek-V2's, with other special ids than tiny's and base's.
_TOKENIZER_FLAVOR = {"tiny": "tiny", "small": "small", "base": "tiny"}

_VISION = {
    "layers": 2, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
    "patch_size": 14, "width": 64,
}  # fmt: skip


def checkpoint_quantization(name: str) -> DeepseekVL2QuantizationConfig:
    """Quantization ``name`` ("int8", "int4") as the test checkpoints take it: int4 groups as wide as their experts."""
    bits = DeepseekVL2QuantizationConfig.from_short_form(name).bits
    return DeepseekVL2QuantizationConfig(bits=bits, group_size=EXPERT_WIDTH if bits == 4 else None)


def published_style_config(variant: str, vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    """The config.json content of a built checkpoint, shaped like the published file of ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    language = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "model_type": "deepseek_v2",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
        **_LANGUAGE[variant],
    }
    return {
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "language_config": dict(sorted(language.items())),
        "model_type": "deepseek_vl_v2",
        "projector_config": {"model_type": "mlp_projector", "n_embed": language["hidden_size"], "input_dim": 64},
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": dict(_VISION),
    }


def build_checkpoint(
    path: str | os.PathLike,
    variant: str = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "400KB",
) -> Path:
    """Write a random-weight ``variant``-like checkpoint to ``path`` and return the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, flavor=_TOKENIZER_FLAVOR.get(variant, "tiny"))
    processor = DeepseekVLV2Processor(tokenizer=tokenizer, candidate_resolutions=CANDIDATE_RESOLUTIONS)
    # like the published repos: the tokenizer files without the processor's added tokens
    processor.to_json_file(path / "processor_config.json")
    vocab_size = -(-len(processor.tokenizer) // 64) * 64
    config_dict = published_style_config(
        variant, vocab_size, processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config(**config_dict)).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (path / "generation_config.json").unlink(missing_ok=True)  # the published repos ship none
    return path


def demo_checkpoint(variant: str = "tiny") -> Path:
    """A built checkpoint in the user's cache folder, made on first use (a few seconds)."""
    root = os.environ.get("DEEPSEEK_VL2_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(root) / "deepseek_vl2" / f"demo-{variant}-random-weights"
    if not (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists():
        build_checkpoint(path, variant)
    return path
