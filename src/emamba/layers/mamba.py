"""Mamba-1 token mixer (selective state space), written against :func:`emamba.ops.selective_scan`.

Parameter names follow mamba_ssm's ``Mamba`` module (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``,
``A_log``, ``D``, ``out_proj``) so state dicts trained with the original SiMBA code load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import causal_conv1d_silu, channels_first_linear, selective_scan


def _dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's dt initialisation)."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def _unhooked(module: nn.Module) -> bool:
    """No forward (pre-)hooks: the module may be replaced by a direct call on its weights."""
    return not module._forward_hooks and not module._forward_pre_hooks


def _plain(linear: nn.Module) -> bool:
    """Whether to apply ``linear`` as a channels-first GEMM on its weight (see :func:`_project`).

    Only for a bias-free ``nn.Linear`` (not a subclass or wrapper) without module hooks, and only without
    autograd: in a training step the backward of the broadcast-weight GEMMs (a (batch, out, in) weight
    gradient summed over the batch, input gradients in the transposed layout) cost as much as the copies
    they save (EMamba-S, batch 4, 128 px: inference 25% faster, training 0-6% slower; see
    docs/performance_cpu.md), so training keeps the token-major module calls.
    """
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and _unhooked(linear)
        and not (torch.is_grad_enabled() and linear.weight.requires_grad)
    )


def _project(linear: nn.Module, x_cf: Tensor, backend: str) -> Tensor:
    """``linear`` applied to channels-first input: (batch, in, L) -> (batch, out, L), contiguous.

    The mixer keeps its activations channels-first, the layout of the depthwise conv and the scan kernels.
    Calling an ``nn.Linear`` there needs transposes whose ``.contiguous()`` copies cost ~10% of EMamba-S
    CPU inference; ``weight @ x[b]`` per image (:func:`emamba.ops.channels_first_linear`: a batched BLAS GEMM,
    or oneDNN where that is faster) gives the same product reading the transposed operand in place (bitwise
    equality is not promised: a different GEMM call may round differently).
    Modules that are not a plain ``nn.Linear``, or that carry hooks (FLOP counters, LoRA-style wrappers,
    feature taps), and every Linear under autograd, are called as modules (see :func:`_plain`).
    """
    if _plain(linear):
        return channels_first_linear(linear.weight, x_cf, backend)
    return linear(x_cf.transpose(1, 2)).transpose(1, 2)


class MambaMixer(nn.Module):
    """Mamba-1 block over a token sequence: (batch, L, dim) -> (batch, L, dim).

    in_proj (no bias) -> causal depthwise conv1d (bias) -> SiLU -> x_proj (no bias) -> dt_proj (bias)
    -> softplus -> selective scan with A = -exp(A_log), D skip -> y * SiLU(z) -> out_proj (no bias).

    Args:
        dim: model width.
        d_state: SSM state size n (64 in the released SiMBA code).
        d_conv: causal depthwise conv kernel size.
        expand: inner width multiplier.
        dt_rank: rank of the delta projection; ``"auto"`` means ceil(dim / 16).
        bidirectional: add a second branch over the reversed sequence (the paper's Algorithm 1) with its
            own conv, projections, A and D (Vim-style names ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
            ``A_b_log``, ``D_b``); both outputs are summed before ``out_proj``. The released vision code
            is unidirectional, hence the default.
        backend: selective-scan backend (see :func:`emamba.ops.selective_scan`).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bidirectional: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_inner = int(expand * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional = bidirectional
        self.backend = backend
        self._dt_range = (dt_min, dt_max, dt_init_floor)

        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        for suffix in ("", "_b") if bidirectional else ("",):
            self._make_branch(suffix, d_conv)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.reset_dt_parameters()

    def _make_branch(self, suffix: str, d_conv: int) -> None:
        d_inner, n = self.d_inner, self.d_state
        conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", nn.Linear(d_inner, self.dt_rank + 2 * n, bias=False))
        setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, d_inner, bias=True))
        # S4D-real initialisation: A = -[1, 2, ..., n] for every channel.
        A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32).repeat(d_inner, 1)))
        D = nn.Parameter(torch.ones(d_inner))
        A_log._no_weight_decay = True
        D._no_weight_decay = True
        setattr(self, "A_log" if not suffix else "A_b_log", A_log)
        setattr(self, f"D{suffix}", D)

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """(Re-)apply Mamba's dt initialisation to ``dt_proj`` (and ``dt_proj_b``).

        The released SiMBA code ran a model-wide ``_init_weights`` after building the blocks that reset
        every Linear (dt_proj included) to trunc-normal weights and zero bias, so every channel started
        with dt = softplus(0) = 0.69 instead of Mamba's log-uniform [1e-3, 0.1]. The vision model calls
        this method after its own weight init so that the Mamba initialisation survives.
        """
        std = self.dt_rank**-0.5
        for suffix in ("", "_b") if self.bidirectional else ("",):
            dt_proj = getattr(self, f"dt_proj{suffix}")
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt_proj.bias.copy_(_dt_bias_init(self.d_inner, *self._dt_range))

    def _scan_branch(self, x: Tensor, z: Tensor, suffix: str) -> Tensor:
        conv1d = getattr(self, f"conv1d{suffix}")
        x_proj = getattr(self, f"x_proj{suffix}")
        dt_proj = getattr(self, f"dt_proj{suffix}")
        A_log = self.A_log if not suffix else self.A_b_log
        D = getattr(self, f"D{suffix}")

        if type(conv1d) is nn.Conv1d and _unhooked(conv1d):
            # the fused CPU kernel where it applies (emamba.ops.causal_conv1d); the same function otherwise
            x = causal_conv1d_silu(x, conv1d.weight[:, 0], conv1d.bias, backend=self.backend)
        else:  # wrapped or hooked conv (FLOP counters, feature taps): call the module
            x = F.silu(conv1d(x)[..., : x.shape[-1]])  # causal: drop the right padding
        x_dbl = _project(x_proj, x, self.backend)  # (batch, dt_rank + 2n, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        # (batch, d_inner, L); dt_proj's bias is added inside the scan
        dt = channels_first_linear(dt_proj.weight, dt, self.backend)
        return selective_scan(
            x,
            dt,
            -torch.exp(A_log.float()),
            B,
            C,
            D=D.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MambaMixer expects (batch, L, {self.dim}), got {tuple(x.shape)}")
        # Channels-first from here on: (batch, channels, L) is the layout of the conv and the scan.
        x_cf = x.transpose(1, 2)
        if _plain(self.in_proj):
            # two GEMMs on the halves of the weight, so that xs and z are each contiguous (conv1d and
            # the fused scans would otherwise copy them out of an interleaved (batch, 2*d_inner, L))
            weight = self.in_proj.weight
            xs = channels_first_linear(weight[: self.d_inner], x_cf, self.backend)
            z = channels_first_linear(weight[self.d_inner :], x_cf, self.backend)
        else:
            xs, z = _project(self.in_proj, x_cf, self.backend).chunk(2, dim=1)
        y = self._scan_branch(xs, z, "")
        if self.bidirectional:
            y = y + self._scan_branch(xs.flip(-1), z.flip(-1), "_b").flip(-1)
        # The scan computes in fp32; go back to the residual stream's dtype (autocast re-casts anyway).
        y = y.to(x.dtype).transpose(1, 2)  # (batch, L, d_inner) view of channels-first memory
        if _plain(self.out_proj):  # GEMM on the transposed view: (batch, L, dim) out, no copy of y
            return torch.bmm(y, self.out_proj.weight.t().expand(y.shape[0], -1, -1))
        return self.out_proj(y)
