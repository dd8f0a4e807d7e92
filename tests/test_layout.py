"""The published checkpoints' tensors are exactly the ones our model loads and saves; look-alikes are refused."""

import json

import pytest
import torch
from transformers.core_model_loading import revert_weight_conversion

from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl2.testing.published import VARIANTS, published_layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_tensors_match_published_checkpoint(variant):
    layout = published_layout(variant)
    config = DeepseekVLV2Config(**layout["config"])
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config)
    on_disk = revert_weight_conversion(model, model.state_dict())
    ours = {name: list(tensor.shape) for name, tensor in on_disk.items()}
    expected = layout["tensors"]
    assert sorted(set(expected) - set(ours)) == [], "missing tensors"
    assert sorted(set(ours) - set(expected)) == [], "unexpected tensors"
    wrong = {name: (ours[name], shape) for name, shape in expected.items() if ours[name] != shape}
    assert wrong == {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_config_defaults(variant):
    """Fields the published files leave out take the original config class's defaults."""
    layout = published_layout(variant)
    config = DeepseekVLV2Config(**layout["config"])
    language = config.language_config
    assert config.vision_config.image_size == 384 and config.vision_config.heads == 16
    assert config.projector_config.projector_type == "downsample_mlp_gelu"
    assert config.projector_config.depth == 2 and config.projector_config.downsample_ratio == 2
    assert len(config.candidate_resolutions) == 23
    assert language.rope_theta == 10000.0 and language.rope_scaling is None
    assert language.rms_norm_eps == 1e-6 and language.hidden_act == "silu" and language.attention_bias is False
    assert language.moe_layer_freq == 1
    assert language.max_position_embeddings == 4096
    if variant == "tiny":
        assert language.use_mla is False
    else:
        assert language.use_mla is True
        assert (language.kv_lora_rank, language.qk_nope_head_dim, language.qk_rope_head_dim) == (512, 128, 64)
        assert language.q_lora_rank is None and language.v_head_dim == 128
    if variant in ("tiny", "small"):
        assert language.norm_topk_prob is False and language.scoring_func == "softmax"
        assert language.routed_scaling_factor == 1.0
    if variant == "small":
        assert (language.vocab_size, language.bos_token_id, language.eos_token_id) == (102400, 100000, 100001)
    if variant == "base":
        assert language.num_hidden_layers == 30 and language.num_attention_heads == 32
        assert language.topk_method == "noaux_tc" and language.scoring_func == "sigmoid"
        assert language.norm_topk_prob is True and language.routed_scaling_factor == 2.0


def other_model_config(architecture: str) -> dict:
    """A config.json shaped like DeepSeek-OCR's and DeepSeek-OCR-2's: DeepSeek-VL2's model_type, another tower."""
    config = published_layout("tiny")["config"]
    config["architectures"] = [architecture]
    config["candidate_resolutions"] = [[1024, 1024]]
    config["vision_config"] = {
        "image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deeplip_b_l", "model_type": "vision",
        "width": {"clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
                  "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                                "heads": 12, "layers": 12, "width": 768}},
    }  # fmt: skip
    config["projector_config"] = {"input_dim": 2048, "model_type": "mlp_projector", "n_embed": 1280,
                                  "projector_type": "linear"}  # fmt: skip
    return config


@pytest.mark.parametrize(
    "architecture, model", [("DeepseekOCRForCausalLM", "DeepSeek-OCR"), ("DeepseekOCR2ForCausalLM", "DeepSeek-OCR-2")]
)
def test_ocr_checkpoints_are_refused_before_any_weight_is_read(architecture, model, tmp_path):
    from transformers import AutoModelForCausalLM

    from deepseek_vl2.chat import DeepseekVL2Chat
    from deepseek_vl2.planner import load_config

    (tmp_path / "config.json").write_text(json.dumps(other_model_config(architecture)))
    (tmp_path / "model.safetensors").write_bytes(b"not read: the config is refused first")
    expected = rf"this is a {model} checkpoint \(architectures: {architecture}\).*deepseek_ocr2"
    loaders = (DeepseekVLV2ForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained, load_config,
               DeepseekVL2Chat.from_pretrained)  # fmt: skip
    for load in loaders:
        with pytest.raises(ValueError, match=expected):
            load(tmp_path)


def test_our_saved_architectures_are_accepted():
    saved = {**published_layout("tiny")["config"], "architectures": ["DeepseekVLV2ForCausalLM"]}
    config = DeepseekVLV2Config.from_dict(saved)
    assert config.architectures == ["DeepseekVLV2ForCausalLM"]
