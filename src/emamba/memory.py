"""Process memory measurement for benchmarks (Linux ``/proc``; CUDA uses the caching allocator's stats).

CPU peaks are read from the kernel's resident-set high-water mark (VmHWM), which can be reset between
phases by writing ``5`` to ``/proc/self/clear_refs``, so a warm-up or a library load is not counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_libc = None


def _release_freed_memory() -> None:
    """Make glibc hand freed memory back to the OS now and from now on.

    Otherwise memory freed after a warm-up step stays in malloc's arenas, is silently reused by the timed
    steps, and their peak resident memory reads near zero.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # fixed threshold: large blocks are mmap'd and unmapped
        _libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    _libc.malloc_trim(0)


def rss_bytes() -> int:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device: str = "cpu") -> int:
    """Reset the peak tracker and return the current usage (the baseline for :func:`peak_since`)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_bytes(device: str = "cpu") -> int:
    """Peak usage since the last :func:`reset_peak`."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")
