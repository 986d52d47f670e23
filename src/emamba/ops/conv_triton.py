"""Triton kernels for the causal depthwise conv1d + SiLU on CUDA (forward and backward).

The CUDA implementation of the ``emamba::causal_conv1d_silu_fwd/bwd`` custom ops
(:mod:`emamba.ops.causal_conv1d`); the CPU one is the C++ kernel of :mod:`emamba.ops.scan_cpu`. Semantics::

    pre[b, c, t] = bias[c] + sum_k weight[c, k] * x[b, c, t - (K - 1) + k]      (x[.., < 0] = 0)
    out = silu(pre)

PyTorch runs the same step as ``nn.Conv1d(padding=K-1)`` (padding both ends, computing K - 1 outputs that
are sliced away), then a separate SiLU kernel that reads and writes the whole (batch, d, L) tensor again.
Here one pass reads x once and writes out once.

Grid ``(cdiv(L, BLOCK_L), cdiv(d, BLOCK_D), batch)``: a program owns a ``(BLOCK_D, BLOCK_L)`` tile, L
contiguous (coalesced). The K shifted loads of a tile overlap and hit L1/L2.

The backward recomputes ``pre`` instead of saving it (saving would cost a (batch, d, L) tensor):

    g = dout * silu'(pre),  silu'(p) = s (1 + p (1 - s)), s = sigmoid(p)
    dx[t] = sum_k weight[k] g[t + (K - 1) - k]        (g[.., >= L] = 0)
    dweight[k] = sum_{b, t} g[t] x[t - (K - 1) + k],  dbias = sum_{b, t} g[t]

``dx`` needs g at the K positions t .. t + K - 1, so each program recomputes ``pre`` at K shifts (K^2 loads
of x per element plus K for dweight, all from cache; K = 4 in Mamba). ``dweight`` and ``dbias`` are summed per program into a
``(batch * L tiles, d, K)`` buffer and then over its first axis with ``torch.sum``: deterministic, no
atomics. Accumulation is in fp32 (fp64 for fp64 inputs); outputs have the inputs' dtypes.

With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter (how the tests run
without a GPU). As in :mod:`emamba.ops.scan_triton`, they are wrapped with ``triton.jit`` lazily and use
only triton builtins (``tl.full``, ``tl.reduce`` with triton's add, ``tl.exp``), never the jit helpers of
``triton.language`` such as ``tl.zeros``, ``tl.sum`` or ``tl.sigmoid``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .scan_triton import _add, _interpreting, _or, is_available, jit_kernels, tl

__all__ = ["is_available", "forward", "backward"]

#: Tile sizes (module attributes, read at every call; the tests shrink them). Powers of two.
BLOCK_D = 4
BLOCK_L = 256
NUM_WARPS = 4


def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, d, L,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < d
    rows = pid_b * d * L + offs_d[:, None] * L  # int64: batch x d x L may exceed 2^31
    pre = tl.full((BLOCK_D, BLOCK_L), 0.0, ACC)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)[:, None]
    for k in tl.static_range(K):
        src = offs_l - (K - 1) + k
        m = mask_d[:, None] & ((src >= 0) & (src < L))[None, :]
        xv = tl.load(x_ptr + rows + src[None, :], mask=m, other=0.0).to(ACC)
        wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(ACC)
        pre += wk[:, None] * xv
    out = pre / (1.0 + tl.exp(-pre))
    m_out = mask_d[:, None] & (offs_l < L)[None, :]
    tl.store(out_ptr + rows + offs_l[None, :], out.to(out_ptr.dtype.element_ty), mask=m_out)


def _conv_bwd_kernel(
    dout_ptr, x_ptr, w_ptr, bias_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, d, L, n_ltiles,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < d
    rows = pid_b * d * L + offs_d[:, None] * L  # int64: batch x d x L may exceed 2^31
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    dx = tl.full((BLOCK_D, BLOCK_L), 0.0, ACC)
    part = (pid_b * n_ltiles + pid_l) * d + offs_d  # this program's row of the partial-sum buffers
    for j in tl.static_range(K):  # g at positions t + j, which dx[t] takes with weight[K - 1 - j]
        pos = offs_l + j
        m_pos = mask_d[:, None] & (pos < L)[None, :]
        pre = tl.full((BLOCK_D, BLOCK_L), 0.0, ACC)
        if HAS_BIAS:
            pre += bias[:, None]
        for k in tl.static_range(K):
            src = pos - (K - 1) + k
            m = mask_d[:, None] & ((src >= 0) & (src < L))[None, :]
            xv = tl.load(x_ptr + rows + src[None, :], mask=m, other=0.0).to(ACC)
            wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(ACC)
            pre += wk[:, None] * xv
        s = 1.0 / (1.0 + tl.exp(-pre))
        g = tl.load(dout_ptr + rows + pos[None, :], mask=m_pos, other=0.0).to(ACC) * (s * (1.0 + pre * (1.0 - s)))
        w_j = tl.load(w_ptr + offs_d * K + (K - 1 - j), mask=mask_d, other=0.0).to(ACC)
        dx += w_j[:, None] * g
        if j == 0:
            if HAS_BIAS:
                tl.store(dbias_part_ptr + part, tl.reduce(g, 1, _add).to(dbias_part_ptr.dtype.element_ty),
                         mask=mask_d)
            for k in tl.static_range(K):  # dweight[k] pairs g[t] with x[t - (K - 1) + k] (cached reload)
                src = offs_l - (K - 1) + k
                m = mask_d[:, None] & ((src >= 0) & (src < L))[None, :]
                xv = tl.load(x_ptr + rows + src[None, :], mask=m, other=0.0).to(ACC)
                tl.store(dw_part_ptr + part * K + k, tl.reduce(g * xv, 1, _add).to(dw_part_ptr.dtype.element_ty),
                         mask=mask_d)
    m_out = mask_d[:, None] & (offs_l < L)[None, :]
    tl.store(dx_ptr + rows + offs_l[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m_out)


def _kernels(interpret: bool):
    """(forward, backward) conv kernels for the given mode (compiled JIT or interpreter)."""
    return jit_kernels((_conv_fwd_kernel, _conv_bwd_kernel), interpret)


def _launch_params(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"expected x (batch, d, L) and weight (d, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton conv supports float32/float64/float16/bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton conv needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    for name, value in (("BLOCK_D", BLOCK_D), ("BLOCK_L", BLOCK_L)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    batch, d, length = x.shape
    grid = (-(-length // BLOCK_L), -(-d // BLOCK_D), batch)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return grid, dict(K=weight.shape[1], HAS_BIAS=bias is not None, ACC=acc, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """silu(causal depthwise conv1d): x (batch, d, L), weight (d, K), bias (d,) or None -> like x."""
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grid, meta = _launch_params(x, weight, bias)
    out = torch.empty_like(x)
    if x.numel():
        fwd, _ = _kernels(_interpreting())
        fwd[grid](x, weight, _or(bias, x), out, x.shape[1], x.shape[2], num_warps=NUM_WARPS, **meta)
    return out


def backward(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dx, dweight, dbias) of :func:`forward` for the output gradient ``dout``; dbias is None without bias."""
    dout, x, weight = dout.contiguous(), x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if dout.shape != x.shape or dout.dtype != x.dtype:
        raise ValueError(f"dout {tuple(dout.shape)} {dout.dtype} must match x {tuple(x.shape)} {x.dtype}")
    grid, meta = _launch_params(x, weight, bias)
    batch, d, length = x.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(x)
    dw_part = torch.zeros(batch * grid[0], d, weight.shape[1], dtype=acc_dtype, device=x.device)
    dbias_part = torch.zeros(batch * grid[0], d, dtype=acc_dtype, device=x.device) if bias is not None else None
    if x.numel():
        _, bwd = _kernels(_interpreting())
        bwd[grid](dout, x, weight, _or(bias, x), dx, dw_part, _or(dbias_part, dw_part), d, length, grid[0],
                  num_warps=NUM_WARPS, **meta)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
