"""Autocast helpers shared by the scan and EinFFT (both must compute in fp32 under mixed precision)."""

from __future__ import annotations

import contextlib

import torch


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast exists for that device (not on meta).

    Under ``torch.compile`` the availability check is skipped (compiled code runs on a real device): older
    dynamo versions (seen with torch 2.11) cannot trace ``torch._C._is_autocast_available`` and would break
    the graph inside every block, which also exhausts the recompile limit.
    """
    if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
