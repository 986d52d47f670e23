"""Building blocks: the Mamba token mixer and the channel mixers (EinFFT, conv-MLP, MLP)."""

from .einfft import EinFFT
from .mamba import MambaMixer
from .mlp import ConvMlp, DepthwiseConv2d, Mlp

__all__ = ["ConvMlp", "DepthwiseConv2d", "EinFFT", "MambaMixer", "Mlp"]
