"""The published checkpoints' tensors are exactly the ones our model loads and saves."""

import json
from pathlib import Path

import pytest
import torch
from transformers.core_model_loading import revert_weight_conversion

from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM

LAYOUT_DIR = Path(__file__).resolve().parents[2] / "shared" / "checkpoint-layout"
VARIANTS = ["tiny", "small", "base"]


def published(variant: str) -> dict:
    path = LAYOUT_DIR / f"{variant}.json"
    if not path.exists():
        pytest.skip(f"checkpoint layout {path} is not available beside this checkout")
    return json.loads(path.read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_tensors_match_published_checkpoint(variant):
    layout = published(variant)
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
    layout = published(variant)
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
