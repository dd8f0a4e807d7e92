"""Configuration classes that read the published DeepSeek-VL2 ``config.json`` files as they are.

The published small and base configs leave many language fields out and rely on the original
``DeepseekV2Config`` defaults, so every default below is the original's: a different default would
silently build a different model.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.configuration_utils import SubConfigSpec


class VisionEncoderConfig(PretrainedConfig):
    """SigLIP ViT settings (the published files give only width, layers, mlp_ratio and patch size)."""

    model_type = "vision"

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    layer_norm_eps: float = 1e-6

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class MlpProjectorConfig(PretrainedConfig):
    """Vision-to-language projector settings (the published files give only ``n_embed``)."""

    model_type = "mlp_projector"

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2


class DeepseekV2Config(PretrainedConfig):
    """DeepSeekMoE decoder settings with the original class's defaults (MLA on, 30 layers, ...)."""

    model_type = "deepseek_v2"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rms_norm_eps = float(self.rms_norm_eps)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head width of plain multi-head attention (tiny)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """Per-head query/key width of multi-head latent attention (small, base)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekVLV2Config(PretrainedConfig):
    """The whole vision-language model: vision tower, projector, decoder and the tiling settings."""

    model_type = "deepseek_vl_v2"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=VisionEncoderConfig),
        "projector_config": SubConfigSpec(config_class=MlpProjectorConfig),
        "language_config": SubConfigSpec(config_class=DeepseekV2Config),
    }

    vision_config: dict | VisionEncoderConfig | None = None
    projector_config: dict | MlpProjectorConfig | None = None
    language_config: dict | DeepseekV2Config | None = None
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list | tuple = ((384, 384),)
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tile_tag != "2D":
            raise ValueError(f"tile_tag {self.tile_tag!r} is not supported: the published models use '2D'")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos must be 'head' or 'tail', got {self.global_view_pos!r}")
        self.candidate_resolutions = [tuple(int(v) for v in r) for r in self.candidate_resolutions]

    def get_text_config(self, *args, **kwargs):
        return self.language_config

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            raise ValueError(
                f"this checkpoint is a {found!r} model, not DeepSeek-VL2 (its config.json must say "
                f"model_type {cls.model_type!r})"
            )
        check_architectures(config_dict.get("architectures"))
        return super().from_dict(config_dict, **kwargs)


# Checkpoints that share DeepSeek-VL2's model_type but are other models: their vision tower differs.
OTHER_MODELS_OF_THIS_TYPE = {"DeepseekOCRForCausalLM": "DeepSeek-OCR", "DeepseekOCR2ForCausalLM": "DeepSeek-OCR-2"}


def check_architectures(architectures: list[str] | None) -> None:
    """ValueError, before any weight is read, for a config whose ``architectures`` name another model.

    The published DeepSeek-VL2 configs name none; ours, once saved, name ``DeepseekVLV2ForCausalLM``.
    """
    if not architectures or any(name.startswith("DeepseekVLV2") for name in architectures):
        return
    known = [OTHER_MODELS_OF_THIS_TYPE[name] for name in architectures if name in OTHER_MODELS_OF_THIS_TYPE]
    what = f"a {known[0]} checkpoint" if known else "not a DeepSeek-VL2 checkpoint"
    raise ValueError(
        f"this is {what} (architectures: {', '.join(architectures)}): it shares DeepSeek-VL2's model_type "
        f"{DeepseekVLV2Config.model_type!r} but has another vision tower, which this library does not run. "
        "transformers loads DeepSeek-OCR-2 natively (model type 'deepseek_ocr2', AutoModelForImageTextToText)."
    )


__all__ = ["VisionEncoderConfig", "MlpProjectorConfig", "DeepseekV2Config", "DeepseekVLV2Config"]
