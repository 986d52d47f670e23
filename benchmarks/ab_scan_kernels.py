#!/usr/bin/env python
"""A/B of two versions of the fused CPU scan kernel's source in one process.

    git show REV:src/emamba/ops/csrc/selective_scan_cpu.cpp > /tmp/old.cpp
    python benchmarks/ab_scan_kernels.py /tmp/old.cpp src/emamba/ops/csrc/selective_scan_cpu.cpp \
        --threads 2 --rounds 9 --mode fwd

Builds both files with the flags `emamba.ops.scan_cpu` uses, runs their raw `scan_fwd` (or `scan_bwd`) on
the same inputs at the EMamba-S stage shapes and the forecasting shape, alternating the order each round,
and prints the medians, the median of the per-round old/new ratios (with their range) and the largest
relative difference of the outputs (forward: out; backward: dC, which depends on the recomputed states).

B and C start as (batch, n, L) rows, the layout the Mamba mixer produces, and each forward gets them the
way `emamba.ops.scan_cpu` hands them to that source: read in place by a build with a tiled forward
(`tile_lanes()` > 0; in sources before it: `avx512_step_loop()` true), otherwise copied to (batch, L, n) inside the timed call
(sources that predate the two layouts take that copy as a plain tensor). The backward always gets the
(batch, L, n) copy, made outside the timing.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from emamba.ops.scan_cpu import build_attempts

SHAPES = [(8, 3136, 128, 64), (8, 784, 256, 64), (8, 196, 640, 64), (32, 96, 256, 16)]


def build(path: str, extra_cflags: list[str]):
    _, cflags, ldflags = build_attempts()[0]
    cflags = cflags + extra_cflags
    digest = hashlib.sha1(Path(path).read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    return load(name=f"emamba_scan_ab_{digest}", sources=[path], extra_cflags=cflags, extra_ldflags=ldflags)


def _forward_call(module, u, delta, A, B, C, D, z, bias):
    """module.scan_fwd with B, C (batch, n, L) prepared as the Python wrapper prepares them for it."""
    reads_rows = getattr(module, "tile_lanes", getattr(module, "avx512_step_loop", lambda: False))
    if reads_rows():
        return lambda: module.scan_fwd(u, delta, A, B, C, D, z, bias, True)
    if hasattr(module, "avx512_step_loop"):  # two-layout source, generic build: a transposed view of the copy
        return lambda: module.scan_fwd(u, delta, A, B.transpose(1, 2).contiguous().transpose(1, 2),
                                       C.transpose(1, 2).contiguous().transpose(1, 2), D, z, bias, True)
    return lambda: module.scan_fwd(u, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                   D, z, bias, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--mode", choices=["fwd", "bwd"], default="fwd")
    p.add_argument("--extra-cflags", nargs="*", default=[],
                   help="added to both builds, e.g. -mno-avx512f to time what an AVX2-only CPU runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mods = {"old": build(args.old, args.extra_cflags), "new": build(args.new, args.extra_cflags)}
    # one thread: process CPU time (robust to other jobs); more: wall clock
    clock = time.process_time if args.threads == 1 else time.perf_counter
    for b, L, d, n in SHAPES:
        u, z = torch.randn(b, d, L), torch.randn(b, d, L)
        delta = torch.randn(b, d, L) * 0.5 - 1
        A = -torch.rand(d, n) * 4 - 0.1
        B, C = torch.randn(b, n, L), torch.randn(b, n, L)
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        D, bias = torch.randn(d), torch.randn(d) * 0.1
        fwd_calls = {k: _forward_call(m, u, delta, A, B, C, D, z, bias) for k, m in mods.items()}
        fwd = {k: call() for k, call in fwd_calls.items()}  # also the warm-up of the forward
        if args.mode == "fwd":
            calls = fwd_calls
            outs = {k: fwd[k][0] for k in mods}
        else:
            dout = torch.randn_like(u)
            bwd_args = {k: (dout, u, m.scan_steps(delta, bias, True), A, Bt, Ct, D, z, fwd[k][1])
                        for k, m in mods.items()}
            calls = {k: (lambda m=m, a=bwd_args[k]: m.scan_bwd(*a)) for k, m in mods.items()}
            outs = {k: calls[k]()[4] for k in mods}  # also the warm-up of the backward
        diff = ((outs["old"] - outs["new"]).abs().max() / outs["old"].abs().max()).item()
        times = {k: [] for k in mods}
        for r in range(args.rounds):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                t0 = clock()
                calls[k]()
                times[k].append(clock() - t0)
        ratios = sorted(o / nw for o, nw in zip(times["old"], times["new"]))
        print(f"{(b, L, d, n)} {args.mode}: old {statistics.median(times['old']) * 1e3:.1f} ms, "
              f"new {statistics.median(times['new']) * 1e3:.1f} ms, old/new per round median "
              f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}), "
              f"max relative difference {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
