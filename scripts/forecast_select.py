#!/usr/bin/env python
"""Choose per-(dataset, horizon) EMamba-TS settings on the *validation* split of a sweep.

    python scripts/forecast_select.py results/forecast/tuning.jsonl results/forecast/ett.jsonl [--seeds 2021]
    python scripts/forecast_select.py ... --per_seed --only ETTh1:96 ETTh2:96

Reads ``emamba forecast`` JSONL rows and prints for every (dataset, horizon) each configuration's best
validation loss (the early-stopping criterion), averaged over the seeds it was run with (their count in
brackets; ``--seeds`` restricts them), sorted, relative to the committed defaults (``des == "table"``) over
the same seeds. Test metrics are deliberately not printed: the choice must not see them. A configuration
is named by its ``des`` field (``vs_<name>`` in the sweep); of repeated runs of one seed the last counts.

``--per_seed`` adds what the adoption rule (configs/forecast/README.md) asks for: the defaults' seed spread
((max - min) / mean over their seeds) and, for each configuration, its change per seed and whether it is
lower than the defaults at every seed they share.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from emamba.engine import forecast


Losses = dict[tuple, dict[str, dict[int, float]]]


def validation_losses(rows: Iterable[dict], seeds: Optional[list[int]] = None) -> Losses:
    """{(data, pred_len): {configuration: {seed: best validation loss}}}; the defaults are named ``default``."""
    val: Losses = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if seeds is not None and row.get("seed") not in seeds:
            continue
        if row.get("config"):  # a sweep run adopted into the results table: already counted under its des
            continue
        name = "default" if row.get("des") == "table" else row.get("des", "?")
        val[(row["data"], row["pred_len"])][name][row["seed"]] = row["best_val_loss"]
    return val


def report(val: Losses, per_seed: bool = False, only: Optional[set[tuple]] = None) -> str:
    lines = []
    for (data, horizon), by_name in sorted(val.items()):
        if len(by_name) < 2 or (only and (data, horizon) not in only):
            continue
        default = by_name.get("default", {})
        head = f"{data} {horizon}: best validation loss per configuration (mean over seeds)"
        if per_seed and len(default) > 1:
            spread = (max(default.values()) - min(default.values())) / statistics.mean(default.values())
            head += f"; default seed spread {100 * spread:.2f}% over {len(default)} seeds"
        lines.append(head)
        ranked = sorted(by_name.items(), key=lambda kv: statistics.mean(kv[1].values()))
        for name, by_seed in ranked:
            mean = statistics.mean(by_seed.values())
            same = [default[s] for s in by_seed if s in default]
            rel = (f" ({100 * (mean / statistics.mean(same) - 1):+.2f}% vs default on the same seeds)"
                   if len(same) == len(by_seed) and name != "default" else "")
            lines.append(f"  {name:<24} {mean:.4f} [{len(by_seed)}]{rel}")
            shared = sorted(s for s in by_seed if s in default)
            if per_seed and name != "default" and shared:
                changes = ", ".join(f"{s} {by_seed[s]:.4f} ({100 * (by_seed[s] / default[s] - 1):+.2f}%)"
                                    for s in shared)
                lower = all(by_seed[s] < default[s] for s in shared)
                lines.append(f"      per seed: {changes}; lower at every seed: {'yes' if lower else 'no'}")
    return "\n".join(lines)


def _pair(text: str) -> tuple[str, int]:
    data, _, horizon = text.partition(":")
    if not horizon.isdigit():
        raise argparse.ArgumentTypeError(f"expected DATA:HORIZON such as ETTh1:96, got {text!r}")
    return data, int(horizon)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="only these seeds (default: all)")
    p.add_argument("--per_seed", action="store_true", help="also each seed's change and the defaults' spread")
    p.add_argument("--only", type=_pair, nargs="*", default=None, help="only these DATA:HORIZON pairs")
    args = p.parse_args(argv)
    try:
        rows = forecast.load_results(args.files)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    print(report(validation_losses(rows, args.seeds), args.per_seed, set(args.only) if args.only else None))


if __name__ == "__main__":
    main()
