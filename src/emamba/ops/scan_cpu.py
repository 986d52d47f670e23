"""Fused CPU selective-scan backend (C++/OpenMP kernel compiled on first use).

The kernel (``csrc/selective_scan_cpu.cpp``) keeps memory at O(inputs): the forward never stores the
(batch, d, L, n) state sequence, only the state at the end of every ``CHUNK`` steps (the
"checkpoints"); the backward recomputes one chunk of states at a time from those checkpoints in a small
thread-local buffer and runs the reverse recurrence over it.

This module is the backend contract used by :mod:`emamba.ops.selective_scan`:
``is_available``, ``checkpoint_shape``, ``forward`` and ``backward``. Elementwise pre/post-processing
(``delta_bias``, ``softplus``, the ``silu(z)`` gate and their derivatives) is done here with ATen's
vectorised kernels so that it matches PyTorch exactly; the C++ kernel only does the scan itself.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Time steps between saved states. Must equal ``kChunk`` in the C++ source.
CHUNK = 64

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "selective_scan_cpu.cpp")
_BASE_FLAGS = ["-O3", "-ffp-contract=fast"]
# Attempts in order: tuned for this CPU with OpenMP threads, then portable (no -march, SIMD pragmas only,
# single-threaded) for compilers without an OpenMP runtime (e.g. Apple clang).
_ATTEMPTS = (
    ("native", _BASE_FLAGS + ["-march=native", "-fopenmp"], ["-fopenmp"]),
    ("portable", _BASE_FLAGS + ["-fopenmp-simd"], []),
)

_lock = threading.Lock()
_module = None
_status: Optional[tuple[bool, str]] = None


def _cpu_signature() -> str:
    """Identifies the host CPU, so a shared extensions dir never serves a -march=native build elsewhere."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.strip())
                    if len(parts) >= 4:
                        break
    except OSError:
        pass
    return "|".join(parts)


def _build_name(tag: str, cflags: list[str], ldflags: list[str]) -> str:
    # torch's JIT versioner already rebuilds when sources/flags change, but it keeps one build per name;
    # hashing flags, toolchain-relevant versions and the CPU into the name makes each configuration its
    # own cache entry (no rebuild ping-pong, no stale -march=native binary on a different CPU).
    with open(_SOURCE, "rb") as fh:
        src = fh.read()
    key = "\n".join([
        " ".join(cflags), " ".join(ldflags), torch.__version__, sys.version, _cpu_signature(),
        hashlib.sha1(src).hexdigest(),
    ])
    return f"emamba_scan_cpu_{tag}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _load():
    """Build (first call on this machine) or load the extension; raises on failure."""
    global _module
    if _module is not None:
        return _module
    from torch.utils.cpp_extension import load

    errors = []
    for tag, cflags, ldflags in _ATTEMPTS:
        try:
            _module = load(
                name=_build_name(tag, cflags, ldflags),
                sources=[_SOURCE],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                verbose=False,
            )
            if _module.chunk_size() != CHUNK:
                raise RuntimeError(f"chunk size mismatch: C++ {_module.chunk_size()} vs Python {CHUNK}")
            return _module
        except Exception as exc:  # compiler missing, ninja missing, build error, ...
            _module = None
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            errors.append(f"[{tag}] {type(exc).__name__}: " + " | ".join(lines[-6:])[-600:])
    raise RuntimeError("could not build the fused CPU scan extension: " + " ; ".join(errors))


def is_available() -> tuple[bool, str]:
    """(True, description) if the extension builds/loads here, else (False, reason). Never raises; cached."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    mod = _load()
                    _status = (True, f"compiled C++ kernel ({mod.__name__})")
                except BaseException as exc:  # noqa: BLE001 - the contract is "never raises"
                    _status = (False, str(exc) or type(exc).__name__)
    return _status


def checkpoint_shape(batch: int, d: int, L: int, n: int) -> tuple[int, int, int, int]:
    """Saved states: h at the end of every chunk of CHUNK steps (the last one is the final state)."""
    return (batch, d, (L + CHUNK - 1) // CHUNK, n)


def _ext():
    ok, reason = is_available()
    if not ok:
        raise RuntimeError(f"fused CPU scan unavailable: {reason}")
    return _module


def _raw_delta(delta: Tensor, delta_bias: Optional[Tensor]) -> Tensor:
    return delta + delta_bias[None, :, None] if delta_bias is not None else delta


def _transpose_bc(X: Tensor) -> Tensor:
    # (batch, n, L) -> (batch, L, n): makes the per-timestep state vector contiguous for the kernel.
    return X.transpose(1, 2).contiguous()


@torch.no_grad()
def forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out, checkpoints) with checkpoints of shape :func:`checkpoint_shape`."""
    ext = _ext()
    dt = _raw_delta(delta, delta_bias)
    if delta_softplus:
        dt = F.softplus(dt)
    y, checkpoints = ext.scan_fwd(
        u.contiguous(), dt.contiguous(), A.contiguous(), _transpose_bc(B), _transpose_bc(C),
        D.contiguous() if D is not None else None,
    )
    if z is not None:
        y.mul_(F.silu(z))
    return y, checkpoints


@torch.no_grad()
def backward(
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
):
    """Gradients of sum(out * dout): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs."""
    ext = _ext()
    raw = _raw_delta(delta, delta_bias)
    dt = F.softplus(raw) if delta_softplus else raw
    dout = dout.contiguous()
    dy = dout * F.silu(z) if z is not None else dout  # gradient arriving at y = C.h + D u
    du, ddt, dA, dB, dC, dD, y = ext.scan_bwd(
        dy, u.contiguous(), dt.contiguous(), A.contiguous(), _transpose_bc(B), _transpose_bc(C),
        D.contiguous() if D is not None else None, checkpoints.contiguous(), z is not None,
    )
    dz = None
    if z is not None:
        dz = torch.ops.aten.silu_backward(y.mul_(dout), z)
    ddelta = torch.ops.aten.softplus_backward(ddt, raw, 1.0, 20.0) if delta_softplus else ddt
    ddelta_bias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, (dD if D is not None else None), dz, ddelta_bias
