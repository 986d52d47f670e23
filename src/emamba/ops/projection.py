"""The Mamba mixer's channels-first projections: ``weight @ x[b]`` for every image b, on the fastest GEMM.

The mixer keeps its activations channels-first, (batch, in, L), and applies its bias-free projections as
``weight @ x[b]`` (see :func:`emamba.layers.mamba._project`). Which GEMM computes that best depends on the
machine and the shape:

* **batched BLAS GEMM** (``torch.bmm`` over the expanded weight): the default. PyTorch's x86 wheels run it
  through MKL, which takes its AVX2 code on AMD CPUs.
* **oneDNN, one call per image** (``torch.ops.mkldnn._linear_pointwise``): runs AVX-512 on AMD too. On an
  AMD EPYC Zen 5 it does the mixer's in_proj and x_proj GEMMs 1.3-2x faster than MKL, but loses on small
  ones (the per-call overhead is ~20 us): dt_proj (inner size = dt_rank, 4-28) and anything under ~4
  MFLOP per image. Used only in inference (no autograd formula), in fp32, outside autocast, tracing,
  compilation and export, and with a fused backend (``reference`` and ``torch`` stay plain PyTorch).
  The automatic choice takes it only where it made EMamba-S inference faster: on AMD CPUs with AVX-512
  and one intra-op thread (1.05-1.10x). With two threads the projections took as long as with MKL in two of
  three runs (one parallel GEMM per image against MKL's batch split over the threads); with oneDNN and
  MKL both capped at AVX2 (standing in for Zen 2/3) the model was 3-9% slower; on Intel, where MKL runs
  AVX-512, it is unmeasured. ``EMAMBA_CPU_GEMM=onednn|blas`` (or :func:`set_cpu_gemm`) overrides it.
* **one GEMM over the batch** when L == 1 (the class-token post block): ``bmm`` of (out, in) x (in, 1)
  per image is a matrix-vector product per image, ~17x slower than one (batch, in) x (in, out) GEMM.

Numbers and commands: docs/performance_cpu.md ("oneDNN projections and a batch GEMM for single tokens").
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan import PURE_PYTORCH_BACKENDS

CPU_GEMM_ENGINES = ("auto", "onednn", "blas")

# oneDNN's per-call overhead dominates below these (measured on Zen 5, docs/performance_cpu.md).
ONEDNN_MIN_INNER = 32
ONEDNN_MIN_FLOPS_PER_IMAGE = 4_000_000

_cpu_gemm: Optional[str] = None  # set by set_cpu_gemm; None: EMAMBA_CPU_GEMM decides (read on every call)


def set_cpu_gemm(engine: Optional[str]) -> None:
    """Choose the CPU engine for the mixer's projections: ``auto``, ``onednn`` or ``blas``.

    ``None`` goes back to ``EMAMBA_CPU_GEMM`` (default ``auto``: oneDNN on AMD CPUs with AVX-512 running
    one thread, BLAS elsewhere).
    """
    global _cpu_gemm
    if engine is not None and engine not in CPU_GEMM_ENGINES:
        raise ValueError(f"CPU GEMM engine must be one of {CPU_GEMM_ENGINES}, got {engine!r}")
    _cpu_gemm = engine


def cpu_gemm() -> str:
    """The engine set by :func:`set_cpu_gemm` or ``EMAMBA_CPU_GEMM``, ``auto`` resolved: onednn or blas."""
    engine = _cpu_gemm
    if engine is None:
        engine = os.environ.get("EMAMBA_CPU_GEMM", "auto").strip().lower() or "auto"
        if engine not in CPU_GEMM_ENGINES:
            raise ValueError(f"EMAMBA_CPU_GEMM must be one of {CPU_GEMM_ENGINES}, got {engine!r}")
    if engine == "auto":
        amd_avx512 = _onednn_usable() and cpu_vendor() == "AuthenticAMD" and _onednn_avx512()
        return "onednn" if amd_avx512 and torch.get_num_threads() == 1 else "blas"
    if engine == "onednn" and not _onednn_usable():
        return "blas"  # a PyTorch build without oneDNN: nothing else to run
    return engine


def cpuinfo_field(name: str) -> Optional[str]:
    """The first value of ``name`` in /proc/cpuinfo (e.g. ``vendor_id``, ``model name``); None without it."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The x86 vendor string (``AuthenticAMD``, ``GenuineIntel``), or ``platform.processor()`` elsewhere."""
    return cpuinfo_field("vendor_id") or platform.processor()


# oneDNN's ISA caps below AVX-512 (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA values)
_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def _onednn_avx512() -> bool:
    """Whether oneDNN will run AVX-512 code: the CPU has it (as ATen sees it) and no environment cap."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cap not in _BELOW_AVX512


@functools.lru_cache(maxsize=None)
def _onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_allowed(backend: str, *, needs_grad: bool, autocast: bool, traced: bool) -> bool:
    """The run-level half of the oneDNN rule: a fused scan backend, no gradient to compute, no autocast, no
    tracing / compilation / export, and :func:`cpu_gemm` choosing oneDNN. :func:`projection_path` adds the
    per-call half (fp32 CPU tensors of a large enough shape); ``emamba benchmark`` reports this half for
    its run from its options."""
    return (
        backend not in PURE_PYTORCH_BACKENDS
        and not needs_grad
        and not autocast
        and not traced
        and cpu_gemm() == "onednn"
    )


def _traced() -> bool:
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )


def projection_path(weight: Tensor, x: Tensor, backend: str = "auto") -> str:
    """Which GEMM :func:`channels_first_linear` takes: ``"fold"`` (L == 1), ``"onednn"`` or ``"bmm"``."""
    if x.shape[-1] == 1:
        return "fold"
    out_features, in_features = weight.shape
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and in_features >= ONEDNN_MIN_INNER
        and out_features * in_features * x.shape[-1] >= ONEDNN_MIN_FLOPS_PER_IMAGE
        and onednn_allowed(
            backend,
            needs_grad=torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad),
            autocast=torch.is_autocast_enabled("cpu"),
            traced=_traced(),
        )
    ):
        return "onednn"
    return "bmm"


def bmm_expanded(weight: Tensor, x: Tensor) -> Tensor:
    """weight @ x[b] for every b as one batched GEMM over the expanded weight (the ``bmm`` path).

    ``torch.matmul`` would fold the batch into the rows when the weight requires grad (avoiding a (batch,
    out, in) weight-gradient buffer), and that fold copies a transposed operand. Here the weight gradient is
    a (batch, out, in) sum, tiny next to x.
    """
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def fold_over_batch(weight: Tensor, x: Tensor) -> Tensor:
    """weight @ x[b] for every b when L == 1 (the ``fold`` path): one (batch, in) x (in, out) GEMM."""
    return F.linear(x[..., 0], weight).unsqueeze(-1)


def onednn_per_image(weight: Tensor, x: Tensor) -> Tensor:
    """weight @ x[b] for every b with one oneDNN GEMM per image (fp32 CPU tensors, no autograd)."""
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2])
    for b in range(x.shape[0]):
        # linear(a, w) = a @ w.T: with a = weight and w = x[b].T it is weight @ x[b], already (out, L)
        out[b] = torch.ops.mkldnn._linear_pointwise(weight, x[b].t(), None, "none", [], "")
    return out


def channels_first_linear(weight: Tensor, x: Tensor, backend: str = "auto") -> Tensor:
    """weight @ x[b] for every b: (out, in) x (batch, in, L) -> (batch, out, L), contiguous.

    ``backend`` is the mixer's scan backend (``reference`` and ``torch`` never take oneDNN). Results agree
    with ``torch.bmm`` to fp32 rounding (different GEMMs sum in different orders); autograd works on the
    ``bmm`` and ``fold`` paths, which are the only ones taken when a gradient is needed.
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"expected weight (out, in) and x (batch, in, L) with matching in, got {tuple(weight.shape)} and "
            f"{tuple(x.shape)}"
        )
    path = projection_path(weight, x, backend)
    if path == "fold":
        return fold_over_batch(weight, x)
    if path == "onednn":
        return onednn_per_image(weight, x)
    return bmm_expanded(weight, x)
