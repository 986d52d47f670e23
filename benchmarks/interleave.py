"""Ratios between scan backends measured in one process, the backends alternating call by call.

`benchmarks/scan.py` times each backend in its own process, one after the other, so that each peak
memory is its own; on a shared VM whose speed drifts by tens of percent within minutes, a ratio between
two such runs carries that drift. Here every round calls each backend once, in a rotated order, and the
ratio is taken within the round; the median and range over rounds are printed (and the medians of the
times). Same shapes and inputs as scan.py (``make_step``); peak memory is not measured.

    python benchmarks/interleave.py --shapes s1 s2 s3 s4 ts --backends cpu reference --mode fwd --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan import SHAPES, make_step  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--backends", nargs=2, default=["cpu", "reference"], metavar=("FAST", "BASELINE"),
                   help="ratio = time(BASELINE) / time(FAST)")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    fast, base = args.backends
    rows = []
    for shape in args.shapes:
        steps = {b: make_step(b, shape, args.mode, args.device) for b in (fast, base)}
        for step in steps.values():
            step()  # warm-up (and the first-use kernel load)
        times = {b: [] for b in steps}
        for r in range(args.rounds):
            for b in ((fast, base) if r % 2 == 0 else (base, fast)):
                start = time.perf_counter()
                steps[b]()
                times[b].append(time.perf_counter() - start)
        ratios = sorted(tb / tf for tf, tb in zip(times[fast], times[base]))
        row = {"shape": shape, "dims": SHAPES[shape], "mode": args.mode, "fast": fast, "baseline": base,
               "rounds": args.rounds, "median_ratio": statistics.median(ratios), "min_ratio": ratios[0],
               "max_ratio": ratios[-1], **{f"median_s_{b}": statistics.median(t) for b, t in times.items()}}
        rows.append(row)
        print(f"{shape} {SHAPES[shape]} {args.mode}: {fast} {row[f'median_s_{fast}'] * 1e3:.1f} ms, "
              f"{base} {row[f'median_s_{base}'] * 1e3:.1f} ms, {base}/{fast} per round median "
              f"{row['median_ratio']:.1f}x (range {ratios[0]:.1f}-{ratios[-1]:.1f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
