"""Causal depthwise conv1d + SiLU, the Mamba mixer's step between ``in_proj`` and ``x_proj``.

``causal_conv1d_silu(x, weight, bias)`` computes ``silu(conv1d(x, weight, bias, padding=K-1,
groups=d)[..., :L])`` for x of shape (batch, d, L), the way ``nn.Conv1d`` plus a slice does in the original
code. Fused kernels, forward and backward, behind one ``torch.library`` custom op (with an autograd formula
and a fake implementation, so ``torch.compile`` traces through it):

* CPU, float32/float64 outside autocast: the C++ kernel of :mod:`emamba.ops.scan_cpu` (one vectorised pass
  per row with the SiLU fused). PyTorch's CPU depthwise conv pads both ends and took 3.4 ms per call at the
  EMamba-S stage-1 shape, the kernel 0.3 ms.
* CUDA, float32/float64/float16/bfloat16 (under autocast: the autocast dtype, as ``F.conv1d`` would use):
  the Triton kernels of :mod:`emamba.ops.conv_triton` (one pass instead of cuDNN's conv plus a SiLU kernel).
  They are checked under Triton's interpreter and compiled offline for sm_90 by the tests; their speed on a
  GPU is measured by ``benchmarks/gpu_check.sh``.

The pure-PyTorch backends (``reference``, ``torch``), other devices and dtypes, CPU autocast regions, and
machines where the kernel is unavailable use the ``F.conv1d`` formula.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import conv_triton, scan_cpu
from .amp import autocast_disabled
from .selective_scan import PURE_PYTORCH_BACKENDS

_EMPTY = (0,)


def causal_conv1d_silu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The formula: ``nn.Conv1d(d, d, K, groups=d, padding=K-1)`` on (batch, d, L), first L outputs, SiLU."""
    d, k = weight.shape
    return F.silu(F.conv1d(x, weight[:, None, :], bias, padding=k - 1, groups=d)[..., : x.shape[-1]])


@torch.library.custom_op("emamba::causal_conv1d_silu_fwd", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return scan_cpu._ext().conv_fwd(x, weight, bias)


@_conv_fwd.register_fake
def _conv_fwd_fake(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("emamba::causal_conv1d_silu_bwd", mutates_args=())
def _conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = scan_cpu._ext().conv_bwd(dout, x, weight, bias)
    return dx, dweight, dbias


@_conv_bwd.register_fake
def _conv_bwd_fake(dout, x, weight, bias):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(_EMPTY)
    return torch.empty_like(x), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, weight, bias (None stays None)


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd(dout.contiguous(), x, weight, bias)
    return dx, dweight, dbias if bias is not None else None


@_conv_fwd.register_kernel("cuda")
def _conv_fwd_cuda(x, weight, bias):
    return conv_triton.forward(x, weight, bias)


@_conv_bwd.register_kernel("cuda")
def _conv_bwd_cuda(dout, x, weight, bias):
    dx, dweight, dbias = conv_triton.backward(dout, x, weight, bias)
    return dx, dweight, dbias if dbias is not None else x.new_empty(_EMPTY)


torch.library.register_autograd("emamba::causal_conv1d_silu_fwd", _backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _kernel_available() -> bool:
    return scan_cpu.is_available()[0]


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    return conv_triton.is_available()[0]


_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """silu(causal depthwise conv1d(x)): x (batch, d, L), weight (d, K), bias (d,) -> (batch, d, L).

    ``backend`` is the mixer's scan backend: ``reference`` and ``torch`` keep the whole mixer in plain
    PyTorch (``F.conv1d``); any other value uses the fused CPU or CUDA kernel where it applies (see module
    doc).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (d={x.shape[1]}, K), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    if backend in PURE_PYTORCH_BACKENDS:
        return causal_conv1d_silu_reference(x, weight, bias)
    if x.device.type == "cuda":
        if torch.is_autocast_enabled("cuda"):  # the dtype F.conv1d would run in
            dtype = torch.get_autocast_dtype("cuda")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if not (x.dtype in _CUDA_DTYPES and _same_dtype(x, weight, bias) and _triton_available()):
            return causal_conv1d_silu_reference(x, weight, bias)
        with autocast_disabled("cuda"):
            return _fused(x, weight, bias)
    fused = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and _same_dtype(x, weight, bias)
        and not torch.is_autocast_enabled("cpu")
        and _kernel_available()
    )
    if not fused:
        return causal_conv1d_silu_reference(x, weight, bias)
    return _fused(x, weight, bias)


def _same_dtype(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)


def _fused(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _conv_fwd(x.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None)
