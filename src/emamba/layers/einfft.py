"""EinFFT channel mixer (SiMBA, Section 3.2 and Appendix B).

FFT over the tokens -> complex block-diagonal linear layer (Einstein matmul) + complex bias -> ReLU on the
real and the imaginary parts -> second complex block-diagonal layer + bias -> soft-shrink -> inverse FFT
-> real part.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.amp import autocast_disabled
from ..ops.fft import fftn_ortho

FFT_MODES = ("tokens_blocks", "tokens")


def _real_block_matrix(weight: Tensor, conj_input: bool = False, conj_output: bool = False) -> Tensor:
    """The complex blocks W_r + i W_i as real (2 bs, 2 bs) matrices acting on interleaved (re, im) rows.

    weight: (2, num_blocks, bs, bs) -> (num_blocks, 2 bs, 2 bs) with rows [in, re/im] and columns
    [out, re/im]: x_interleaved @ M = (x_r W_r - x_i W_i) + i (x_r W_i + x_i W_r), where x_interleaved is
    the memory layout of ``torch.view_as_real``. ``conj_input`` gives the matrix of conj(x) W (the
    imaginary input rows negated), ``conj_output`` that of conj(x W) (the imaginary output columns
    negated).

    One real GEMM per layer (``baddbmm``, bias fused) then computes exactly what the released real/imaginary
    formulation does, with the multiply count of a complex GEMM. Staying real between the two FFTs is
    what lets inductor fuse the elementwise work and the ONNX exporter translate the layer (neither
    handles complex matmuls).
    """
    w_r, w_i = weight[0], weight[1]
    neg_w_i = -w_i if not (conj_input and not conj_output) else None  # negations only where needed
    neg_w_r = -w_r if conj_input != conj_output else None
    # input real part -> (out re, out im), input imaginary part -> (out re, out im)
    rows_re = torch.stack((w_r, neg_w_i if conj_output else w_i), dim=-1)
    rows_im = torch.stack((w_i if conj_input else neg_w_i, w_r if neg_w_r is None else neg_w_r), dim=-1)
    num_blocks, bs, _ = w_r.shape
    return torch.stack((rows_re, rows_im), dim=2).reshape(num_blocks, 2 * bs, 2 * bs)


def _real_bias(bias: Tensor, conj: bool = False) -> Tensor:
    """(2, num_blocks, bs) complex bias -> (num_blocks, 1, 2 bs) interleaved (re, im)."""
    num_blocks, bs = bias.shape[1:]
    return torch.stack((bias[0], -bias[1] if conj else bias[1]), dim=-1).reshape(num_blocks, 1, 2 * bs)


# Per FFT mode, for the full complex spectrum (EinFFT._full_spectrum: short sequences and CUDA compile): the
# dims the FFT runs over, the permutation from (batch, tokens, blocks, bs) to the FFT layout (FFT dims last)
# and back, and from that layout to the (blocks, batch, frequencies, bs) order of the block GEMMs and back.
_LAYOUTS = {
    "tokens_blocks": dict(fft_dims=(2, 3), to_fft=(0, 3, 1, 2), from_fft=(0, 2, 3, 1),
                          to_gemm=(3, 0, 2, 1), from_gemm=(1, 3, 2, 0)),
    "tokens": dict(fft_dims=(3,), to_fft=(0, 2, 3, 1), from_fft=(0, 3, 1, 2),
                   to_gemm=(1, 0, 3, 2), from_gemm=(1, 0, 3, 2)),
}
# The same for the real-FFT path (EinFFT._half_spectrum): rfftn halves its last dim, which must be the
# tokens. In "tokens" mode they already are; in "tokens_blocks" the blocks go before the tokens.
_HALF_LAYOUTS = {
    "tokens_blocks": dict(fft_dims=(2, 3), to_fft=(0, 3, 2, 1), from_fft=(0, 3, 2, 1),
                          to_gemm=(2, 0, 3, 1), from_gemm=(1, 3, 0, 2)),
    "tokens": _LAYOUTS["tokens"],
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
        self._weight_cache: Optional[tuple] = None  # see _block_weights

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"EinFFT expects (batch, N, {self.dim}), got {tuple(x.shape)}")
        in_dtype = x.dtype
        with autocast_disabled(x.device.type):
            x = x.float()
            out = self._half_spectrum(x) if self._use_half_spectrum(x) else self._full_spectrum(x)
        return out.to(in_dtype)

    def _use_half_spectrum(self, x: Tensor) -> bool:
        """Both paths compute the same function (to float rounding, tested). The half-spectrum path does
        half the FFT work and moves half the spectrum, but reads twice the block weights (two sets per
        layer), so it wins when the spectrum outweighs the weights: here when the tokens exceed half the
        channels (EMamba-S at 128 px: stages 1-2 take it, 3-4 do not; at 224 px stage 3 too). The rule looks
        at the tokens only, never the batch, so an exported graph keeps a dynamic batch dimension.
        Compiling for CUDA needs the full path (exact FFT strides, see _needs_exact_fft_strides)."""
        return not _needs_exact_fft_strides(x) and 2 * x.shape[1] > self.dim

    def _block_weights(self, path: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The real block matrices and biases of ``path`` ("half" or "full"), cached for inference.

        Expanding the complex blocks into real matrices copies ~C^2 values per call, which at the late
        stages (few tokens, wide channels) costs more than the layer's GEMMs. Without autograd (eval under
        ``torch.no_grad``/``inference_mode``) the expansion is kept and reused until a parameter changes
        (its version counter or storage), e.g. after ``load_state_dict``, ``.to()``, an optimizer or EMA
        step (all in-place updates bump the version counter).
        """
        params = (self.complex_weight_1, self.complex_bias_1, self.complex_weight_2, self.complex_bias_2)
        tracking = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        # Not under torch.distributed either: FSDP re-gathers parameters into reused storage, and whether
        # that bumps the version counters is its implementation detail; a stale expansion would be silent.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if tracking or distributed or torch.compiler.is_compiling():
            return self._expand_block_weights(path, dtype)
        key = (path, dtype) + tuple((p.data_ptr(), p._version) for p in params)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self._expand_block_weights(path, dtype))
        return self._weight_cache[1]

    def _expand_block_weights(self, path: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.complex_weight_1, self.complex_bias_1,
                                                self.complex_weight_2, self.complex_bias_2))
        if path == "full":
            return _real_block_matrix(w1), _real_bias(b1), _real_block_matrix(w2), _real_bias(b2)
        nb = self.num_blocks
        # the block whose weights act on X[-k] (see _half_spectrum)
        mirror = [(-j) % nb for j in range(nb)] if self.fft_mode == "tokens_blocks" else list(range(nb))
        m1 = torch.cat((_real_block_matrix(w1), _real_block_matrix(w1[:, mirror], conj_input=True)), dim=-1)
        c1 = torch.cat((_real_bias(b1), _real_bias(b1[:, mirror])), dim=-1)
        return (m1, c1, _real_block_matrix(w2), _real_bias(b2),
                _real_block_matrix(w2[:, mirror], conj_output=True), _real_bias(b2[:, mirror], conj=True))

    def _half_spectrum(self, x: Tensor) -> Tensor:
        """EinFFT from the real FFT's half spectrum (about half the FFT work and memory traffic).

        x is real, so its spectrum is Hermitian: X[-k] = conj(X[k]). rfftn gives X on the half k_t <= N/2
        of the token frequencies. The output Re(ifft(Y)), Y[k] = G_k(X[k]) the per-frequency block layers,
        equals irfftn of the Hermitian part Yh[k] = (Y[k] + conj(Y[-k])) / 2 on the same half. Y[-k] =
        G_{-k}(conj X[k]) needs no other half of X: it is a second set of block layers applied to the same
        X[k], with the weights of the mirrored block (-j mod blocks when the FFT runs over the blocks too,
        j otherwise) and the conjugations folded into the real matrices (soft-shrink is odd, so it
        commutes with the output conjugation). The first layer runs both sets as one GEMM of twice the
        width; the second layer as two GEMMs reading the two halves of its input in place.
        """
        batch, tokens, channels = x.shape
        nb, bs = self.num_blocks, self.block_size
        lay = _HALF_LAYOUTS[self.fft_mode]
        m1, c1, m2, c2, m2_mirror, c2_mirror = self._block_weights("half", x.dtype)
        h = x.reshape(batch, tokens, nb, bs).permute(lay["to_fft"]).contiguous()
        spec = torch.fft.rfftn(h, dim=lay["fft_dims"], norm="ortho")
        freqs = spec.shape[-1]
        h = torch.view_as_real(spec.permute(lay["to_gemm"])).reshape(nb, batch * freqs, 2 * bs)
        # layer 1, [Y-path | mirrored path] side by side: (nb, M, 2bs) @ (nb, 2bs, 4bs). The elementwise
        # steps below run in place on fresh GEMM / soft-shrink outputs (whose backward does not need them):
        # one pass and one allocation less each.
        h = torch.baddbmm(c1, h, m1).relu_()
        y = torch.baddbmm(c2, h[..., : 2 * bs], m2)
        y_mirror = torch.baddbmm(c2_mirror, h[..., 2 * bs :], m2_mirror)
        if self.sparsity_threshold:
            y, y_mirror = F.softshrink(y, self.sparsity_threshold), F.softshrink(y_mirror, self.sparsity_threshold)
        y = y.add_(y_mirror).mul_(0.5)
        y = torch.view_as_complex(y.reshape(nb, batch, freqs, bs, 2)).permute(lay["from_gemm"])
        fft_sizes = (nb, tokens) if self.fft_mode == "tokens_blocks" else (tokens,)
        h = torch.fft.irfftn(y, s=fft_sizes, dim=lay["fft_dims"], norm="ortho")
        return h.permute(lay["from_fft"]).reshape(batch, tokens, channels)

    def _full_spectrum(self, x: Tensor) -> Tensor:
        """EinFFT on the full complex spectrum (complex FFTs; through :func:`emamba.ops.fft.fftn_ortho` when
        compiling for CUDA)."""
        batch, tokens, channels = x.shape
        nb, bs = self.num_blocks, self.block_size
        lay = _LAYOUTS[self.fft_mode]
        m1, c1, m2, c2 = self._block_weights("full", x.dtype)
        # FFTs over contiguous dims; the spectrum is then copied once into the GEMM layout as interleaved
        # (re, im) reals, where it stays for both complex layers: ReLU and soft-shrink act on the real and
        # imaginary parts separately, as in the paper.
        h = x.reshape(batch, tokens, nb, bs).permute(lay["to_fft"])
        h = _fftn(h, lay["fft_dims"]).permute(lay["to_gemm"])
        h = torch.view_as_real(h).reshape(nb, batch * tokens, 2 * bs)
        h = torch.baddbmm(c1, h, m1).relu_()  # in place on the fresh GEMM output
        h = torch.baddbmm(c2, h, m2)
        if self.sparsity_threshold:
            h = F.softshrink(h, self.sparsity_threshold)
        h = torch.view_as_complex(h.reshape(nb, batch, tokens, bs, 2)).permute(lay["from_gemm"])
        h = _fftn(h, lay["fft_dims"], inverse=True).real
        return h.permute(lay["from_fft"]).reshape(batch, tokens, channels)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, fft_mode={self.fft_mode!r}"
