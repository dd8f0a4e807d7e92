"""The model settings of the three published DeepSeek-VL2 checkpoints, as their config.json files give them.

Only the fields that shape the computation are kept; whatever a published file leaves out falls back to
the config classes' defaults, exactly as when the real checkpoint is loaded. The tile grids are the
published 23 candidate resolutions.
"""

from deepseek_vl2.testing.checkpoints import CANDIDATE_RESOLUTIONS

_VISION = {
    "layers": 27,
    "mlp_ratio": 3.7362,
    "model_name": "siglip_so400m_patch14_384",
    "patch_size": 14,
    "width": 1152,
}

_LANGUAGE = {
    "tiny": {
        "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
        "intermediate_size": 6848, "kv_lora_rank": None, "max_position_embeddings": 4096,
        "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12, "num_key_value_heads": 10,
        "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "topk_group": 1,
        "topk_method": "greedy", "use_mla": False, "v_head_dim": 0, "vocab_size": 129280,
    },
    "small": {
        "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 10944,
        "max_position_embeddings": 4096, "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "q_lora_rank": None, "topk_group": 1, "topk_method": "greedy",
    },
    "base": {
        "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 2560,
        "intermediate_size": 12288, "max_position_embeddings": 4096, "moe_intermediate_size": 1536, "n_group": 1,
        "n_routed_experts": 72, "n_shared_experts": 2, "norm_topk_prob": True, "num_experts_per_tok": 6,
        "q_lora_rank": None, "routed_scaling_factor": 2.0, "scoring_func": "sigmoid", "topk_group": 1,
        "topk_method": "noaux_tc", "vocab_size": 129280,
    },
}  # fmt: skip

VARIANTS = tuple(_LANGUAGE)


def published_config(variant: str) -> dict:
    """Keyword arguments for ``DeepseekVLV2Config`` that build ``variant`` with its published dimensions."""
    if variant not in _LANGUAGE:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return {
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "tile_tag": "2D",
        "language_config": dict(_LANGUAGE[variant]),
        "projector_config": {"n_embed": _LANGUAGE[variant]["hidden_size"]},
        "vision_config": dict(_VISION),
    }
