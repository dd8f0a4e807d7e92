"""The SigLIP tower against an independent transcription of timm's ViT math (pre-norm blocks, tanh GELU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_vl2.models.configuration import VisionEncoderConfig
from deepseek_vl2.models.vision import VisionTransformer


def small_config() -> VisionEncoderConfig:
    return VisionEncoderConfig(image_size=56, patch_size=14, width=48, layers=3, heads=4, mlp_ratio=3.7362)


def random_tower(dtype=torch.float32) -> VisionTransformer:
    torch.manual_seed(0)
    tower = VisionTransformer(small_config())
    with torch.no_grad():
        for param in tower.parameters():
            param.normal_(0, 0.2)
    return tower.to(dtype).eval()


def reference_forward(tower: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """Out-of-place, step-by-step math with explicit softmax attention."""
    p = dict(tower.named_parameters())
    config = tower.config
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2) + p["pos_embed"]
    batch, length, width = x.shape
    head_dim = width // config.heads
    for i in range(config.layers):
        b = f"blocks.{i}."

        def norm(t, name, b=b):
            return F.layer_norm(t, (width,), p[b + name + ".weight"], p[b + name + ".bias"], config.layer_norm_eps)

        qkv = F.linear(norm(x, "norm1"), p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
        q, k, v = qkv.view(batch, length, 3, config.heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1) @ v
        attention = attention.transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attention, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, "norm2"), p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(hidden, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (width,), p["norm.weight"], p["norm.bias"], config.layer_norm_eps)


def test_tower_matches_the_reference_math_in_float32():
    tower = random_tower()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        features = tower(pixels)
        expected = reference_forward(tower, pixels)
    assert features.shape == (3, 16, 48)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_in_place_activation_and_residuals_round_as_the_out_of_place_forms_in_bfloat16():
    tower = random_tower(torch.bfloat16)
    x = torch.randn(2, 16, 48, dtype=torch.bfloat16)
    block = tower.blocks[0]
    with torch.no_grad():
        after_attention = x + block.attn(block.norm1(x))
        hidden = F.gelu(block.mlp.fc1(block.norm2(after_attention)), approximate="tanh")
        expected = after_attention + block.mlp.fc2(hidden)
        assert torch.equal(block(x), expected)


def test_tower_runs_with_autograd_and_gives_the_same_features():
    tower = random_tower()
    pixels = torch.randn(1, 3, 56, 56, requires_grad=True)
    features = tower(pixels)
    features.square().sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(features.detach(), tower(pixels), rtol=0, atol=0)


def test_tiles_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="56x56"):
        random_tower()(torch.randn(1, 3, 64, 64))
