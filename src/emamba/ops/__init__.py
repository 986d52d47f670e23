"""Selective-scan kernels and their backends (see :mod:`emamba.ops.selective_scan`), and the mixer's fused
causal conv1d + SiLU (:mod:`emamba.ops.causal_conv1d`)."""

from .causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
from .scan_reference import selective_scan_reference, selective_scan_torch
from .selective_scan import BACKENDS, available_backends, backend_status, resolve_backend, selective_scan

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "causal_conv1d_silu",
    "causal_conv1d_silu_reference",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
]
