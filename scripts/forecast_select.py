#!/usr/bin/env python
"""Choose per-(dataset, horizon) EMamba-TS settings on the *validation* split of a sweep.

    python scripts/forecast_select.py results/forecast/tuning.jsonl results/forecast/ett.jsonl [--seeds 2021]

Reads ``emamba forecast`` JSONL rows and prints for every (dataset, horizon) each configuration's best
validation loss (the early-stopping criterion), averaged over the seeds it was run with (their count in
brackets; ``--seeds`` restricts them), sorted, relative to the committed defaults (``des == "table"``) over
the same seeds. Test metrics are deliberately not printed: the choice must not see them. A configuration
is named by its ``des`` field (``vs_<name>`` in the sweep); of repeated runs of one seed the last counts.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from emamba.engine import forecast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="only these seeds (default: all)")
    args = p.parse_args()
    val: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    try:
        rows = forecast.load_results(args.files)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    for row in rows:
        if args.seeds is not None and row.get("seed") not in args.seeds:
            continue
        if row.get("config"):  # a sweep run adopted into the results table: already counted under its des
            continue
        name = "default" if row.get("des") == "table" else row.get("des", "?")
        val[(row["data"], row["pred_len"])][name][row["seed"]] = row["best_val_loss"]
    for (data, horizon), by_name in sorted(val.items()):
        if len(by_name) < 2:
            continue
        default = by_name.get("default", {})
        print(f"{data} {horizon}: best validation loss per configuration (mean over seeds)")
        ranked = sorted(by_name.items(), key=lambda kv: statistics.mean(kv[1].values()))
        for name, by_seed in ranked:
            mean = statistics.mean(by_seed.values())
            same = [default[s] for s in by_seed if s in default]
            rel = (f" ({100 * (mean / statistics.mean(same) - 1):+.2f}% vs default on the same seeds)"
                   if len(same) == len(by_seed) and name != "default" else "")
            print(f"  {name:<24} {mean:.4f} [{len(by_seed)}]{rel}")


if __name__ == "__main__":
    main()
