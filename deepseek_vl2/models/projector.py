"""Projection of vision features into the language model's embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MlpProjectorConfig


class MlpProjector(nn.Module):
    """``downsample_mlp_gelu`` (the published models), ``mlp_gelu``, ``linear`` or ``identity``.

    Downsampling pads the square patch grid to a multiple of the ratio, then gathers each ratio x ratio
    neighbourhood into one vector with channels ordered as ``F.unfold`` orders them (channel-major),
    which is the order the published weights were trained with.
    """

    def __init__(self, config: MlpProjectorConfig):
        super().__init__()
        self.config = config
        kind = config.projector_type
        if kind == "identity":
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(config.input_dim, config.n_embed)
        elif kind == "mlp_gelu":
            self.layers = self._mlp(config.input_dim, config.n_embed, config.n_embed, config.depth)
        elif kind == "downsample_mlp_gelu":
            in_dim = config.input_dim * config.downsample_ratio**2
            # this type always has at least two linears, whatever `depth` says
            depth = max(config.depth, 2)
            self.layers = self._mlp(in_dim, config.n_embed * config.mlp_ratio, config.n_embed, depth)
        else:
            raise ValueError(f"unknown projector_type {kind!r}")

    @staticmethod
    def _mlp(in_dim: int, hidden: int, out_dim: int, depth: int) -> nn.Sequential:
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        return nn.Sequential(*layers)

    def downsample(self, features: torch.Tensor) -> torch.Tensor:
        ratio = self.config.downsample_ratio
        tiles, length, channels = features.shape
        side = int(length**0.5)
        grid = features.transpose(1, 2).reshape(tiles, channels, side, side)
        pad = -side % ratio
        grid = F.pad(grid, (0, pad, 0, pad))
        return F.unfold(grid, kernel_size=ratio, stride=ratio).transpose(1, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.projector_type == "downsample_mlp_gelu":
            features = self.downsample(features)
        return self.layers(features)
