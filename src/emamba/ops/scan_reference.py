"""Pure-PyTorch selective scans.

``selective_scan_reference`` is the oracle every other backend is tested against: a plain loop over
time, written to be read, not to be fast. ``selective_scan_torch`` is the portable fallback used when
the fused CPU kernel cannot be compiled: it runs a log-depth (Hillis-Steele) scan inside chunks of
``chunk_size`` steps and carries the state sequentially across chunks, with activation checkpointing per
chunk so that memory stays O(batch * d * chunk * n) instead of O(batch * d * L * n).

Shapes follow mamba_ssm's ``selective_scan_fn``: u, delta, z: (batch, d, L); A: (d, n);
B, C: (batch, n, L); D, delta_bias: (d,).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sequential selective scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t + D u_t."""
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, d, length = u.shape
    # Time-major copies, so that every step reads contiguous slices whatever layout the caller has (a
    # strided gather per step made this baseline up to ~1.7x slower for channels-first callers).
    u_t, delta_t, B_t, C_t = (X.permute(2, 0, 1).contiguous() for X in (u, delta, B, C))
    h = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta_t[t, :, :, None] * A)  # (batch, d, n)
        drive = delta_t[t, :, :, None] * B_t[t, :, None, :] * u_t[t, :, :, None]  # (batch, d, n)
        h = decay * h + drive
        ys.append((h * C_t[t, :, None, :]).sum(-1))  # (batch, d)
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z)


def _chunk_scan(decay: Tensor, drive: Tensor, C: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Scan one chunk with a Hillis-Steele prefix product; decay, drive: (batch, d, T, n)."""
    a, b = decay, drive
    step = 1
    T = a.shape[2]
    while step < T:
        # combine (a_prev, b_prev) then (a, b): a_new = a * a_prev, b_new = a * b_prev + b
        a_prev = F.pad(a[:, :, :-step], (0, 0, step, 0), value=1.0)
        b_prev = F.pad(b[:, :, :-step], (0, 0, step, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        step *= 2
    h = a * h0[:, :, None, :] + b  # (batch, d, T, n)
    y = torch.einsum("bdtn,bnt->bdt", h, C)
    return y, h[:, :, -1]


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
) -> Tensor:
    """Vectorised chunked scan in plain PyTorch (differentiable through autograd)."""
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, d, length = u.shape
    h = u.new_zeros(batch, d, A.shape[1])
    ys = []
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C)
    )

    def body(u_c: Tensor, delta_c: Tensor, B_c: Tensor, C_c: Tensor, h_c: Tensor, A_: Tensor):
        decay = torch.exp(delta_c[..., None] * A_[None, :, None, :])
        drive = (delta_c * u_c)[..., None] * B_c.transpose(1, 2)[:, None]
        return _chunk_scan(decay, drive, C_c, h_c)

    for start in range(0, length, chunk_size):
        sl = slice(start, min(start + chunk_size, length))
        args = (u[:, :, sl], delta[:, :, sl], B[:, :, sl], C[:, :, sl], h, A)
        if need_grad:
            y_c, h = checkpoint(body, *args, use_reentrant=False)
        else:
            y_c, h = body(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1)
    return _finish(y, u, D, z)
