"""EinFFT channel mixer (SiMBA, Section 3.2 and Appendix B).

FFT over the tokens -> complex block-diagonal linear layer (Einstein matmul) + complex bias -> ReLU on the
real and the imaginary parts -> second complex block-diagonal layer + bias -> soft-shrink -> inverse FFT
-> real part.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.amp import autocast_disabled

FFT_MODES = ("tokens_blocks", "tokens")


def _complex_block_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ (W_r + i W_i) + (b_r + i b_i) for every channel block at once, as one complex batched GEMM.

    x: complex (..., num_blocks, block_size), any strides; weight: (2, num_blocks, block_size, block_size);
    bias: (2, num_blocks, block_size). The complex weights are packed once per call (a tiny copy); the
    GEMM reads x through its strides and the complex product does exactly
    (x_r W_r - x_i W_i) + i (x_r W_i + x_i W_r), what the released real/imaginary formulation computes,
    without splitting x into halves or concatenating them back.
    """
    num_blocks, block_size = x.shape[-2:]
    w = torch.complex(weight[0], weight[1])
    out = torch.bmm(x.reshape(-1, num_blocks, block_size).transpose(0, 1), w)
    return out.transpose(0, 1).reshape(x.shape) + torch.complex(bias[0], bias[1])


def _on_parts(fn, x: Tensor) -> Tensor:
    """Apply a real elementwise function to the real and the imaginary parts of x (no split/cat)."""
    return torch.view_as_complex(fn(torch.view_as_real(x)))


class EinFFT(nn.Module):
    """EinFFT channel mixer for token sequences (batch, N, C) -> (batch, N, C).

    Args:
        dim: channels C; must be divisible by ``num_blocks``.
        num_blocks: number of channel blocks of the block-diagonal complex weights (4 in SiMBA).
        sparsity_threshold: soft-shrink lambda applied to the real and imaginary parts (0.01).
        fft_mode: ``"tokens_blocks"`` (default, what the released code does: a 2-D orthonormal FFT over
            the token axis *and* the channel-block axis) or ``"tokens"`` (the paper's Appendix B: a 1-D
            FFT over the tokens only).

    Parameters: ``complex_weight_1/2`` (2, blocks, C/blocks, C/blocks) and ``complex_bias_1/2``
    (2, blocks, C/blocks), i.e. C^2 + 4C in total, initialised N(0, 0.02^2) as released. The FFTs
    and the complex layers run in fp32 even under autocast; the output has the input's dtype.
    """

    def __init__(
        self, dim: int, num_blocks: int = 4, sparsity_threshold: float = 0.01, fft_mode: str = "tokens_blocks"
    ) -> None:
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"EinFFT needs dim divisible by num_blocks, got dim={dim}, num_blocks={num_blocks}")
        if fft_mode not in FFT_MODES:
            raise ValueError(f"fft_mode must be one of {FFT_MODES}, got {fft_mode!r}")
        self.dim, self.num_blocks, self.block_size = dim, num_blocks, dim // num_blocks
        self.sparsity_threshold = sparsity_threshold
        self.fft_mode = fft_mode
        scale = 0.02
        bs = self.block_size
        self.complex_weight_1 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * scale)
        self.complex_weight_2 = nn.Parameter(torch.randn(2, num_blocks, bs, bs) * scale)
        self.complex_bias_1 = nn.Parameter(torch.randn(2, num_blocks, bs) * scale)
        self.complex_bias_2 = nn.Parameter(torch.randn(2, num_blocks, bs) * scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"EinFFT expects (batch, N, {self.dim}), got {tuple(x.shape)}")
        batch, tokens, channels = x.shape
        in_dtype = x.dtype
        nb, bs = self.num_blocks, self.block_size
        # The FFTs run over the last (contiguous) dims: (batch, bs, tokens, blocks) for "tokens_blocks",
        # (batch, blocks, bs, tokens) for "tokens"; the block GEMMs read the spectrum through a permuted
        # view in the (batch, tokens, blocks, bs) order. Same transform, same values, faster FFTs.
        perm = (0, 3, 1, 2) if self.fft_mode == "tokens_blocks" else (0, 2, 3, 1)
        inv = (0, 2, 3, 1) if self.fft_mode == "tokens_blocks" else (0, 3, 1, 2)
        fft_dims = (2, 3) if self.fft_mode == "tokens_blocks" else (3,)
        with autocast_disabled(x.device.type):
            h = x.float().reshape(batch, tokens, nb, bs).permute(perm)
            h = torch.fft.fftn(h, dim=fft_dims, norm="ortho").permute(inv)
            h = _complex_block_linear(h, self.complex_weight_1.float(), self.complex_bias_1.float())
            h = _on_parts(F.relu, h)
            h = _complex_block_linear(h, self.complex_weight_2.float(), self.complex_bias_2.float())
            if self.sparsity_threshold:
                h = _on_parts(lambda t: F.softshrink(t, self.sparsity_threshold), h)
            h = torch.fft.ifftn(h.permute(perm), dim=fft_dims, norm="ortho").real
            out = h.permute(inv).reshape(batch, tokens, channels)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, fft_mode={self.fft_mode!r}"
