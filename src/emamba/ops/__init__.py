"""Selective-scan kernels and their backends (see :mod:`emamba.ops.selective_scan`)."""

from .scan_reference import selective_scan_reference, selective_scan_torch
from .selective_scan import BACKENDS, available_backends, backend_status, resolve_backend, selective_scan

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
]
