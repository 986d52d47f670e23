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


def _complex_block_linear(x_real: Tensor, x_imag: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(x_real + i x_imag) @ (W_r + i W_i) + (b_r + i b_i) for every channel block at once.

    x_*: (..., num_blocks, block_size); weight: (2, num_blocks, block_size, block_size);
    bias: (2, num_blocks, block_size). The real and imaginary halves are stacked into one real matmul
    per block, [x_r, x_i] @ [[W_r, W_i], [-W_i, W_r]], so each layer is a single batched GEMM.
    """
    w_r, w_i = weight[0], weight[1]
    stacked_w = torch.cat([torch.cat([w_r, w_i], dim=-1), torch.cat([-w_i, w_r], dim=-1)], dim=-2)
    lead = x_real.shape[:-2]
    num_blocks, block_size = x_real.shape[-2:]
    x = torch.cat([x_real, x_imag], dim=-1).reshape(-1, num_blocks, 2 * block_size).transpose(0, 1)
    out = torch.bmm(x, stacked_w).transpose(0, 1).reshape(*lead, num_blocks, 2 * block_size)
    out_real, out_imag = out.split(block_size, dim=-1)
    return out_real + bias[0], out_imag + bias[1]


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
        fft_dims = (1, 2) if self.fft_mode == "tokens_blocks" else (1,)
        with autocast_disabled(x.device.type):
            h = x.float().reshape(batch, tokens, self.num_blocks, self.block_size)
            h = torch.fft.fftn(h, dim=fft_dims, norm="ortho")
            real, imag = _complex_block_linear(h.real, h.imag, self.complex_weight_1.float(), self.complex_bias_1.float())
            real, imag = F.relu(real), F.relu(imag)
            real, imag = _complex_block_linear(real, imag, self.complex_weight_2.float(), self.complex_bias_2.float())
            if self.sparsity_threshold:
                real = F.softshrink(real, self.sparsity_threshold)
                imag = F.softshrink(imag, self.sparsity_threshold)
            h = torch.fft.ifftn(torch.complex(real, imag), dim=fft_dims, norm="ortho")
            out = h.real.reshape(batch, tokens, channels)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, fft_mode={self.fft_mode!r}"
