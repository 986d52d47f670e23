"""CUDA-event timing shared by the GPU benchmarks (gpu_check.sh, gpu_tune.py)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, runs: int = 7, warmup: int = 1) -> float:
    """Median over ``runs`` calls of ``fn`` of the GPU time between CUDA events, after ``warmup`` calls
    (the first compiles Triton kernels); ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
