"""Public selective-scan entry point and backend dispatch.

Every backend computes the same function (mamba_ssm's ``selective_scan_fn``)::

    delta = softplus(delta + delta_bias)        (each step optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = C_t . h_t + D * u_t
    y     = y * silu(z)                           (when z is given)

Backends:

* ``reference`` - a readable sequential loop; the oracle for the tests.
* ``torch``     - chunked log-depth scan in plain PyTorch; portable fallback.
* ``cpu``       - fused C++/OpenMP kernel, compiled on first use (``emamba.ops.scan_cpu``).
* ``triton``    - fused Triton kernels for CUDA tensors (``emamba.ops.scan_triton``).
* ``mamba_ssm`` - the upstream CUDA kernel when that package is importable.

The fused backends (``cpu`` and ``triton``) run behind one ``torch.library`` custom op with a registered
autograd formula and fake implementation, so ``torch.compile`` traces through the model without a graph
break at the scan.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import scan_cpu
from .amp import autocast_disabled
from .scan_reference import selective_scan_reference, selective_scan_torch

BACKENDS = ("reference", "torch", "cpu", "triton", "mamba_ssm")
FUSED_BACKENDS = ("cpu", "triton")
# plain PyTorch, no kernels: the mixer around them stays plain PyTorch too (conv1d, projections)
PURE_PYTORCH_BACKENDS = ("reference", "torch")
ENV_VAR = "EMAMBA_SCAN_BACKEND"

_FUSED_MODULES = {"cpu": "emamba.ops.scan_cpu", "triton": "emamba.ops.scan_triton"}
_availability: dict[str, tuple[bool, str]] = {}
_warned_fallback = False


def _fused_module(name: str):
    return importlib.import_module(_FUSED_MODULES[name])


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for one backend on this machine; cached after the first call."""
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {BACKENDS + ('auto',)}")
    if name not in _availability:
        if name in PURE_PYTORCH_BACKENDS:
            status = (True, "pure PyTorch")
        elif name == "mamba_ssm":
            try:
                importlib.import_module("mamba_ssm.ops.selective_scan_interface")
                status = (torch.cuda.is_available(), "needs CUDA tensors")
            except Exception as exc:  # ImportError or a broken CUDA build
                status = (False, f"mamba_ssm not importable: {exc}")
        else:
            try:
                status = _fused_module(name).is_available()
            except Exception as exc:
                status = (False, f"{type(exc).__name__}: {exc}")
        _availability[name] = status
    return _availability[name]


def available_backends() -> list[str]:
    """Names of the backends that work on this machine (``triton``/``mamba_ssm`` need a GPU)."""
    return [name for name in BACKENDS if backend_status(name)[0]]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` (or the ``EMAMBA_SCAN_BACKEND`` override) into a concrete backend name."""
    global _warned_fallback
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend != "auto":
        ok, reason = backend_status(backend)
        if not ok:
            raise RuntimeError(f"scan backend {backend!r} is not available here: {reason}")
        return backend
    if device.type == "cuda":
        for name in ("mamba_ssm", "triton"):
            if backend_status(name)[0]:
                return name
        return "torch"
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        ok, reason = backend_status("cpu")
        if ok:
            return "cpu"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                "emamba: the fused CPU scan kernel is unavailable, falling back to the slower pure-PyTorch "
                f"scan. Reason: {reason}. Fix: install a C++ compiler with OpenMP (e.g. `apt-get install "
                "g++`) and `pip install ninja`, or silence this by setting EMAMBA_SCAN_BACKEND=torch.",
                RuntimeWarning,
                stacklevel=3,
            )
    return "torch"


@torch.compiler.assume_constant_result
def _resolve_backend_while_tracing(backend: str, device_type: str, dtype: torch.dtype) -> str:
    """Backend choice as a trace-time constant: dynamo runs this eagerly instead of tracing the import and
    build checks inside (which would break ``fullgraph=True`` in a fresh process)."""
    return resolve_backend(backend, torch.device(device_type), dtype)


@torch.compiler.assume_constant_result
def _cpu_reads_bc_rows() -> bool:
    """Which B, C layout the CPU kernel's forward reads, as a trace-time constant (like the backend)."""
    return scan_cpu.reads_bc_rows()


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d, L), got shape {tuple(u.shape)}")
    batch, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n), got shape {tuple(A.shape)}")
    n = A.shape[1]
    expected = {
        "delta": (delta, (batch, d, length)),
        "B": (B, (batch, n, length)),
        "C": (C, (batch, n, length)),
        "D": (D, (d,)),
        "z": (z, (batch, d, length)),
        "delta_bias": (delta_bias, (d,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                         ("delta_bias", delta_bias)):
        if tensor is not None and tensor.device != u.device:
            raise ValueError(f"{name} is on {tensor.device} but u is on {u.device}")
    if length == 0:
        raise ValueError("the sequence length must be at least 1")


# --------------------------------------------------------------------------------------------------
# Custom op for the fused backends.
# --------------------------------------------------------------------------------------------------

_EMPTY = (0,)


@torch.library.custom_op("emamba::selective_scan_fwd", mutates_args=())
def _fused_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    y, checkpoints = _fused_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return y, checkpoints


@_fused_fwd.register_fake
def _fused_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    batch, d, length = u.shape
    shape = _fused_module(backend).checkpoint_shape(batch, d, length, A.shape[1])
    return torch.empty_like(u), u.new_empty(shape)


@torch.library.custom_op("emamba::selective_scan_bwd", mutates_args=())
def _fused_bwd(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    checkpoints: Tensor,
    delta_softplus: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _fused_module(backend).backward(
        dout, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus
    )
    # custom ops cannot return None: absent optional inputs get an empty gradient placeholder.
    return tuple(g if g is not None else u.new_empty(_EMPTY) for g in grads)


@_fused_bwd.register_fake
def _fused_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus, backend):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(_EMPTY)

    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias))


def _fused_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # the checkpoints output never has a gradient: skip its zero fill


def _fused_autograd(ctx, dout, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _fused_bwd(
        dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, checkpoints, ctx.delta_softplus, ctx.backend
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        None,
        None,
    )


torch.library.register_autograd("emamba::selective_scan_fwd", _fused_autograd, setup_context=_fused_setup_context)


@torch.library.custom_op("emamba::selective_scan_infer", mutates_args=())
def _fused_infer(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> Tensor:
    """The forward when no gradient will be taken: the fused kernels (CPU and Triton) then skip their
    checkpoints (as much memory as the output at n = 64, and the time to map and write it)."""
    return _fused_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          save_checkpoints=False)[0]


@_fused_infer.register_fake
def _fused_infer_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return torch.empty_like(u)


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with mamba_ssm's ``selective_scan_fn`` semantics.

    Args:
        u, delta, z: (batch, d, L). A: (d, n). B, C: (batch, n, L). D, delta_bias: (d,).
        backend: ``auto`` (fastest available for the device and dtype; ``EMAMBA_SCAN_BACKEND`` overrides)
            or one of :data:`BACKENDS`.

    Returns:
        y: (batch, d, L). Half-precision inputs (e.g. from bf16 autocast) are computed in fp32 and the
        result is fp32: the recurrence is too long for bf16 accumulation.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type == "meta":  # shape propagation only (FLOP counting, deferred init)
        return u.new_empty(u.shape, dtype=torch.float64 if u.dtype == torch.float64 else torch.float32)
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():
        name = _resolve_backend_while_tracing(backend, u.device.type, compute_dtype)
    else:
        name = resolve_backend(backend, u.device, compute_dtype)
    with autocast_disabled(u.device.type):
        u, delta, A, B, C, D, z, delta_bias = (
            t.to(compute_dtype) if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)
        )
        if name == "reference":
            return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if name == "torch":
            return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if name == "mamba_ssm":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        u, delta, A, D, z, delta_bias = (
            t.contiguous() if t is not None else None for t in (u, delta, A, D, z, delta_bias)
        )
        if name == "cpu":
            # B and C in the layout the CPU kernel's forward reads (scan_cpu.forward_bc_layout), not
            # .contiguous(): one copy at most, none for the Mamba mixer's slices of x_proj's output on builds
            # with the tiled forward (AVX-512, AVX2).
            rows = _cpu_reads_bc_rows()
            B, C = scan_cpu.forward_bc_layout(B, rows), scan_cpu.forward_bc_layout(C, rows)
        else:
            B, C = B.contiguous(), C.contiguous()
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            y, _ = _fused_fwd(*inputs, bool(delta_softplus), name)
            return y
        return _fused_infer(*inputs, bool(delta_softplus), name)
