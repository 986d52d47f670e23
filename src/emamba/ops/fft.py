"""Orthonormal n-D FFT as a custom op whose output is always contiguous (for compiled graphs on CUDA).

Why: PyTorch's fake (meta) kernels for the FFT ops predict output strides that cuFFT does not always
produce (pytorch/pytorch#106623, #167265). Inductor checks the real strides against the prediction, so a
compiled EinFFT failed at run time on CUDA (H200, torch 2.11: ``assert_size_stride`` on
``aten._fft_c2c``), while the same graph runs on CPU. Behind ``emamba::fftn_ortho`` the FFT is opaque to
the compiler: the real kernel returns a contiguous tensor and the fake kernel says exactly that.

The transform is unitary (``norm="ortho"``), so its vector-Jacobian product is the inverse transform of
the incoming gradient (the real part of it for a real input). Eager code keeps calling ``torch.fft``
directly; :func:`fftn_ortho` is only for the places that need exact strides under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fftn_ortho"]

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128, torch.float16: torch.complex32}


@torch.library.custom_op("emamba::fftn_ortho", mutates_args=())
def fftn_ortho(x: Tensor, dim: list[int], inverse: bool) -> Tensor:
    """``torch.fft.fftn`` (``ifftn`` when ``inverse``) over ``dim`` with ``norm="ortho"``, made contiguous.

    ``x`` may be real (float32/64) or complex; the result is complex of the matching precision.
    """
    fn = torch.fft.ifftn if inverse else torch.fft.fftn
    return fn(x, dim=dim, norm="ortho").contiguous()


@fftn_ortho.register_fake
def _fftn_ortho_fake(x: Tensor, dim: list[int], inverse: bool) -> Tensor:
    dtype = x.dtype if x.is_complex() else _COMPLEX_OF[x.dtype]
    return x.new_empty(x.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, dim, inverse = inputs
    ctx.dim, ctx.inverse, ctx.real_input = dim, inverse, not x.is_complex()


def _backward(ctx, grad: Tensor):
    # y = F x with F unitary: the VJP is F^H g = F^{-1} g (for a real x, its real part)
    grad_x = fftn_ortho(grad, ctx.dim, not ctx.inverse)
    return (grad_x.real if ctx.real_input else grad_x), None, None


fftn_ortho.register_autograd(_backward, setup_context=_setup_context)
