"""Conv-MLP channel mixers: what the released SiMBA code used instead of EinFFT (``cm_type='mlp'``)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class ConvMlp(nn.Module):
    """PVTv2-style feed-forward: fc1 (C -> rC) -> depthwise 3x3 conv on the HxW grid -> GELU -> fc2.

    The depthwise conv gives the channel mixer local spatial context, so it needs the token grid size;
    the parameter names (``fc1``, ``dwconv.dwconv``, ``fc2``) match the released code.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv2d(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class DepthwiseConv2d(nn.Module):
    """3x3 depthwise conv applied to (batch, H*W, C) tokens laid out row-major on an H x W grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, tokens, channels = x.shape
        if tokens != height * width:
            raise ValueError(f"ConvMlp got {tokens} tokens for a {height}x{width} grid")
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Plain two-layer MLP (fc -> GELU -> fc), used by the class-token block of the MLP variants."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
