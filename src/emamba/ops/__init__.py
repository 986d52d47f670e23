"""Selective-scan kernels and their backends (see :mod:`emamba.ops.selective_scan`), the mixer's fused
causal conv1d + SiLU (:mod:`emamba.ops.causal_conv1d`) and its channels-first projections
(:mod:`emamba.ops.projection`)."""

from .causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
from .projection import channels_first_linear, cpu_gemm, set_cpu_gemm
from .scan_reference import selective_scan_reference, selective_scan_torch
from .selective_scan import BACKENDS, available_backends, backend_status, resolve_backend, selective_scan

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "causal_conv1d_silu",
    "causal_conv1d_silu_reference",
    "channels_first_linear",
    "cpu_gemm",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
    "set_cpu_gemm",
]
