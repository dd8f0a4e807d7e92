"""SigLIP so400m vision tower, with the parameter names of timm's VisionTransformer.

The published checkpoints store the tower under timm's names (``vision.blocks.N.attn.qkv`` ...). timm
itself is not a dependency: it pulls torchvision, which on this stack means a multi-GB CUDA build of
torch, for a dozen lines of ViT. The forward returns the final-norm features of every patch; the
attention-pool head is kept only so its published weights load and save back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import VisionEncoderConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens-by-channels: a transposed view here would make every later residual add,
        # norm and linear of the tower work on (or first copy) a strided layout.
        return self.proj(pixels).flatten(2).transpose(1, 2).contiguous()


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fc1's fresh output: a new tensor this size costs more in page faults than the GELU.
        return self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, length, width))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config.width, config.mlp_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residuals added into the branch outputs (fresh tensors) rather than into new ones: same sums.
        x = self.attn(self.norm1(x)).add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class AttentionPoolLatent(nn.Module):
    """SigLIP's MAP pooling head: present in the checkpoints, unused by DeepSeek-VL2's forward."""

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, config.width))
        self.q = nn.Linear(config.width, config.width)
        self.kv = nn.Linear(config.width, 2 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config.width, config.mlp_hidden_dim)


class VisionTransformer(nn.Module):
    """Encodes 384-px tiles into a (tiles, 27*27, width) grid of patch features."""

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config
        num_patches = config.num_patches_per_side**2
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, config.width))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.global_pool == "map":
            self.attn_pool = AttentionPoolLatent(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = self.config.image_size
        if pixels.shape[-2:] != (expected, expected):
            raise ValueError(f"vision tower expects {expected}x{expected} tiles, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
