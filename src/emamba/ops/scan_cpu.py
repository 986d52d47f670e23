"""Fused CPU selective-scan backend (C++/OpenMP kernel compiled on first use).

The kernel (``csrc/selective_scan_cpu.cpp``) keeps memory at O(inputs): the forward never stores the
(batch, d, L, n) state sequence, only the state at the end of every ``CHUNK`` steps (the
"checkpoints"); the backward recomputes one chunk of states at a time from those checkpoints in a small
thread-local buffer and runs the reverse recurrence over it.

This module is the backend contract used by :mod:`emamba.ops.selective_scan`:
``is_available``, ``checkpoint_shape``, ``forward`` and ``backward``. The forward kernel computes the
step ``softplus(delta + delta_bias)`` itself, per chunk (never materialised; fp32 within ~2e-7 of
``F.softplus``); the backward gets the same steps from the kernel (``scan_steps``) and chains the gradient
through softplus with ATen. The ``D`` skip and the ``silu(z)`` gate are fused into the kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

#: Time steps between saved states. Must equal ``kChunk`` in the C++ source.
CHUNK = 64

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "selective_scan_cpu.cpp")
# -ffp-contract=fast: FMAs even in the ISO -std=c++NN mode torch compiles with (GCC then defaults to off).
# -fno-trapping-math: lets GCC if-convert the selects in the polynomial exp, so its loops vectorise.
_BASE_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]
#: Environment variable of extra compiler flags for the kernel build, e.g. ``-mno-avx512f`` to run the AVX2
#: kernels on an AVX-512 CPU (how ``benchmarks/ab_e2e.sh`` stands in for an AVX2-only machine). The flags
#: are part of the build's cache key, so each setting keeps its own build.
CFLAGS_ENV = "EMAMBA_CPU_CFLAGS"


def build_attempts() -> tuple[tuple[str, list[str], list[str]], ...]:
    """(tag, cflags, ldflags) in the order tried: tuned for this CPU with OpenMP threads, then portable (no
    -march, SIMD pragmas only, single-threaded) for compilers without an OpenMP runtime (e.g. Apple clang);
    both with ``$EMAMBA_CPU_CFLAGS`` appended."""
    extra = shlex.split(os.environ.get(CFLAGS_ENV, ""))
    return (
        ("native", _BASE_FLAGS + ["-march=native", "-fopenmp"] + extra, ["-fopenmp"]),
        ("portable", _BASE_FLAGS + ["-fopenmp-simd"] + extra, []),
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
    # own cache entry (no rebuild ping-pong, no stale -march=native binary on a different CPU). The source's
    # path and the interpreter (hence torch's include paths) are in the key too: ninja's build file holds
    # them, so two checkouts or virtual environments sharing one name rebuilt each other's kernel (20-30 s)
    # every time the other one loaded it.
    with open(_SOURCE, "rb") as fh:
        src = fh.read()
    key = "\n".join([
        " ".join(cflags), " ".join(ldflags), torch.__version__, sys.version, _cpu_signature(),
        hashlib.sha1(src).hexdigest(), os.path.realpath(_SOURCE), os.path.realpath(sys.executable),
        os.path.realpath(torch.__file__), os.environ.get("CXX", ""),
    ])
    return f"emamba_scan_cpu_{tag}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _failure_summary(exc: Exception) -> str:
    # Build errors embed full compiler command lines; keep the diagnostic lines, each shortened.
    text = str(exc).replace("[1/2]", "\n").replace("[2/2]", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "-isystem" not in ln]
    keys = ("error", "not found", "fatal", "no such", "required", "failed")
    picked = [ln for ln in lines if any(k in ln.lower() for k in keys)] or lines[-3:]
    return f"{type(exc).__name__}: " + " | ".join(ln[:200] for ln in picked[:4])


def _load():
    """Build (first call on this machine) or load the extension; raises on failure."""
    global _module
    if _module is not None:
        return _module
    # cpp_extension logs warnings (CUDA_HOME without a CUDA runtime, compiler-ABI notes) that are noise
    # for this CPU-only build; a failure is reported through the exception instead.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        errors = []
        for tag, cflags, ldflags in build_attempts():
            try:
                module = load(
                    name=_build_name(tag, cflags, ldflags),
                    sources=[_SOURCE],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    verbose=False,
                )
                if module.chunk_size() != CHUNK:
                    raise RuntimeError(f"chunk size mismatch: C++ {module.chunk_size()} vs Python {CHUNK}")
                if errors:  # the tuned build failed: say so, the portable one is several times slower
                    warnings.warn("emamba: using the portable CPU scan build (single-threaded, no -march): "
                                  + " ; ".join(errors), RuntimeWarning, stacklevel=2)
                _module = module
                return _module
            except Exception as exc:  # compiler missing, ninja missing, build error, ...
                errors.append(f"[{tag} build] {_failure_summary(exc)}")
        raise RuntimeError("could not build the fused CPU scan extension: " + " ; ".join(errors))
    finally:
        cpp_logger.setLevel(level)


def is_available() -> tuple[bool, str]:
    """(True, description) if the extension builds/loads here, else (False, reason). Never raises; cached."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    mod = _load()
                    _status = (True, f"compiled C++ kernel ({mod.__name__})")
                except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
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


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _transpose_bc(X: Tensor) -> Tensor:
    # (batch, n, L) -> (batch, L, n): makes the per-timestep state vector contiguous for the kernel.
    return X.transpose(1, 2).contiguous()


def reads_bc_rows() -> bool:
    """True when the forward kernel reads B, C as (batch, n, L) rows (its tiled loop is compiled).

    The kernel takes two layouts (``check_bc`` in the C++ source). Builds with the tiled forward (AVX-512, or
    AVX2 + FMA) read rows with unit stride along L in place and transpose them chunk by chunk in register
    blocks (the Mamba mixer's slices of x_proj's output already have that layout, so its forward makes no
    copy); the generic loop runs faster on a transposed view of a (batch, L, n) copy. The backward makes its
    own (batch, L, n) copy either way.
    """
    return _ext().tile_lanes() > 0


def kernel_variant() -> str:
    """Which fp32 loops this build runs: ``"avx512"`` (hand-vectorised forward and backward, 16-channel
    tiles), ``"avx2"`` (8-channel tiled forward, compiler-vectorised backward) or ``"generic"``.

    Speeds differ between them (README, Performance), so benchmark rows record it.
    """
    if _ext().avx512_step_loop():
        return "avx512"
    return "avx2" if reads_bc_rows() else "generic"


def forward_bc_layout(X: Tensor, rows: bool) -> Tensor:
    """B or C (batch, n, L) in the forward kernel's layout (see :func:`reads_bc_rows`): at most one copy."""
    if rows:
        return X if X.stride(2) == 1 or X.shape[2] == 1 else X.contiguous()
    if X.stride(1) == 1 and X.stride(2) == X.shape[1]:  # already a view of (batch, L, n) memory
        return X
    return _transpose_bc(X).transpose(1, 2)


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
    save_checkpoints: bool = True,
) -> tuple[Tensor, Tensor]:
    """Returns (out, checkpoints) with checkpoints of shape :func:`checkpoint_shape`; without
    ``save_checkpoints`` (no backward will run) an empty tensor, never allocated or written."""
    ext = _ext()
    rows = reads_bc_rows()
    return tuple(ext.scan_fwd(
        u.contiguous(), delta.contiguous(), A.contiguous(), forward_bc_layout(B, rows), forward_bc_layout(C, rows),
        _opt(D), _opt(z), _opt(delta_bias), bool(delta_softplus), bool(save_checkpoints),
    ))


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
    # the forward's own steps (not F.softplus, which differs in the last bits): the kernel recomputes the
    # states from the forward's checkpoints with them
    dt = ext.scan_steps(delta.contiguous(), _opt(delta_bias), bool(delta_softplus))
    du, ddt, dA, dBt, dCt, dD, dz = ext.scan_bwd(
        dout.contiguous(), u.contiguous(), dt, A.contiguous(), _transpose_bc(B), _transpose_bc(C),
        _opt(D), _opt(z), checkpoints.contiguous(),
    )
    # The kernel differentiates wrt the effective step; chain through softplus (same threshold as
    # F.softplus) and the bias with ATen so it matches PyTorch exactly.
    if delta_softplus:
        ddelta = torch.ops.aten.softplus_backward(ddt, _raw_delta(delta, delta_bias), 1.0, 20.0)
    else:
        ddelta = ddt
    ddelta_bias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else None
    # The kernel writes dB, dC as (batch, L, n); hand them back as (batch, n, L) views (no copy): the strides
    # match B, C as :func:`emamba.ops.selective_scan` passes them (transposed views of (batch, L, n) memory).
    dB, dC = dBt.transpose(1, 2), dCt.transpose(1, 2)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None, ddelta_bias)
