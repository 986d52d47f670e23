"""Autocast helpers shared by the scan and EinFFT (both must compute in fp32 under mixed precision)."""

from __future__ import annotations

import contextlib

import torch


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast exists for that device (not on meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
