"""Causal depthwise conv1d + SiLU, the Mamba mixer's step between ``in_proj`` and ``x_proj``.

``causal_conv1d_silu(x, weight, bias)`` computes ``silu(conv1d(x, weight, bias, padding=K-1,
groups=d)[..., :L])`` for x of shape (batch, d, L), the way ``nn.Conv1d`` plus a slice does in the original
code. On CPU, for float32/float64 tensors outside autocast, it runs the fused kernel of
:mod:`emamba.ops.scan_cpu` (one vectorised pass per row with the SiLU fused, and its backward): PyTorch's CPU
depthwise conv pads both ends and took 3.4 ms per call at the EMamba-S stage-1 shape, the kernel 0.3 ms. The
pure-PyTorch backends (``reference``, ``torch``), other devices and dtypes, and autocast regions use the
``F.conv1d`` formula. The kernel sits behind a ``torch.library`` custom op with an autograd formula and a
fake implementation, so ``torch.compile`` traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scan_cpu

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


torch.library.register_autograd("emamba::causal_conv1d_silu_fwd", _backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _kernel_available() -> bool:
    return scan_cpu.is_available()[0]


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """silu(causal depthwise conv1d(x)): x (batch, d, L), weight (d, K), bias (d,) -> (batch, d, L).

    ``backend`` is the mixer's scan backend: ``reference`` and ``torch`` keep the whole mixer in plain
    PyTorch (``F.conv1d``); any other value uses the fused CPU kernel where it applies (see module doc).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (d={x.shape[1]}, K), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    fused = (
        backend not in ("reference", "torch")
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_autocast_enabled("cpu")
        and _kernel_available()
    )
    if not fused:
        return causal_conv1d_silu_reference(x, weight, bias)
    return _conv_fwd(x.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None)
