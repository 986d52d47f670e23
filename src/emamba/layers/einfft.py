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
from ..ops.fft import fftn_ortho

FFT_MODES = ("tokens_blocks", "tokens")


def _complex_block_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ (W_r + i W_i) + (b_r + i b_i) for every channel block at once, as one *real* batched GEMM.

    x: real (num_blocks, M, 2 * block_size), each complex value stored as an adjacent (re, im) pair (the
    memory layout of ``torch.view_as_real``); weight: (2, num_blocks, block_size, block_size);
    bias: (2, num_blocks, block_size). Returns (num_blocks, M, 2 * block_size) in the same layout.

    The complex weight is expanded once per call (a tiny copy) to the real 2x2-block matrix
    [[W_r, W_i], [-W_i, W_r]] with rows/columns interleaved like x, so one real GEMM (bias fused) computes
    exactly (x_r W_r - x_i W_i) + i (x_r W_i + x_i W_r), what the released real/imaginary formulation
    does, with the multiply count of a complex GEMM. Staying real between the two FFTs is what lets
    inductor fuse the elementwise work and the ONNX exporter translate the layer (neither handles complex
    matmuls).
    """
    num_blocks, _, width = x.shape
    w_r, w_i = weight[0], weight[1]
    w = torch.stack((torch.stack((w_r, w_i), dim=-1), torch.stack((-w_i, w_r), dim=-1)), dim=2)
    w = w.reshape(num_blocks, width, width)  # (blocks, [in, re/im], [out, re/im])
    b = torch.stack((bias[0], bias[1]), dim=-1).reshape(num_blocks, 1, width)
    return torch.baddbmm(b, x, w)


# Per FFT mode: the dims the FFT runs over (the last, contiguous ones of the layout it is given), the
# permutation from (batch, tokens, blocks, bs) to that layout and back, and the permutation from that
# layout to the (blocks, batch, tokens, bs) order of the block GEMMs and back.
_LAYOUTS = {
    "tokens_blocks": dict(fft_dims=(2, 3), to_fft=(0, 3, 1, 2), from_fft=(0, 2, 3, 1),
                          to_gemm=(3, 0, 2, 1), from_gemm=(1, 3, 2, 0)),
    "tokens": dict(fft_dims=(3,), to_fft=(0, 2, 3, 1), from_fft=(0, 3, 1, 2),
                   to_gemm=(1, 0, 3, 2), from_gemm=(1, 0, 3, 2)),
}


def _needs_exact_fft_strides(x: Tensor) -> bool:
    """Compiling for CUDA: route the FFTs through :func:`emamba.ops.fft.fftn_ortho`, whose output strides
    inductor predicts exactly (its own FFT stride predictions can be wrong for cuFFT; see that module)."""
    return x.is_cuda and torch.compiler.is_compiling()


def _fftn(x: Tensor, dim: tuple[int, ...], inverse: bool = False) -> Tensor:
    if _needs_exact_fft_strides(x):
        return fftn_ortho(x, list(dim), inverse)
    return (torch.fft.ifftn if inverse else torch.fft.fftn)(x, dim=dim, norm="ortho")


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
        lay = _LAYOUTS[self.fft_mode]
        with autocast_disabled(x.device.type):
            # FFTs over contiguous dims; the spectrum is then copied once into the GEMM layout as
            # interleaved (re, im) reals, where it stays for both complex layers: ReLU and soft-shrink act
            # on the real and imaginary parts separately, as in the paper.
            h = x.float().reshape(batch, tokens, nb, bs).permute(lay["to_fft"])
            h = _fftn(h, lay["fft_dims"]).permute(lay["to_gemm"])
            h = torch.view_as_real(h).reshape(nb, batch * tokens, 2 * bs)
            h = F.relu(_complex_block_linear(h, self.complex_weight_1.float(), self.complex_bias_1.float()))
            h = _complex_block_linear(h, self.complex_weight_2.float(), self.complex_bias_2.float())
            if self.sparsity_threshold:
                h = F.softshrink(h, self.sparsity_threshold)
            h = torch.view_as_complex(h.reshape(nb, batch, tokens, bs, 2)).permute(lay["from_gemm"])
            h = _fftn(h, lay["fft_dims"], inverse=True).real
            out = h.permute(lay["from_fft"]).reshape(batch, tokens, channels)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, fft_mode={self.fft_mode!r}"
