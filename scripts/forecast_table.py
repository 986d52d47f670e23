#!/usr/bin/env python
"""Markdown results table from ``emamba forecast`` JSONL rows: EMamba-TS vs the SiMBA paper vs naive.

    python scripts/forecast_table.py results/forecast/ett.jsonl [more.jsonl ...] [--des table]

One row per (dataset, horizon): mean +- std over the seeds found (their count is shown), the paper's
SiMBA MSE (Table 3, look-back 96), our gap to it, the repeat-last-value baseline, and timing. An ``Avg``
row per dataset appears only when all four horizons were run. If several rows share a seed (a rerun),
the latest one counts.

A run trained in two stages (``--linear_epochs``) keeps its linear stage's forecaster when no epoch of the
whole model beats it on validation (``best_epoch`` 0): that run's model does not use the EMamba blocks. Its
MSE cell then says so, "(linear k/n)" for k of the n seeds, with a legend under the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from emamba.engine import forecast

# SiMBA, arXiv 2403.15360, Table 3 (MSE, look-back 96).
PAPER_MSE = {
    "ETTh1": {96: 0.379, 192: 0.432, 336: 0.473, 720: 0.483},
    "ETTh2": {96: 0.290, 192: 0.373, 336: 0.376, 720: 0.407},
    "ETTm1": {96: 0.324, 192: 0.363, 336: 0.395, 720: 0.451},
    "ETTm2": {96: 0.177, 192: 0.245, 336: 0.304, 720: 0.400},
}
HORIZONS = (96, 192, 336, 720)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def build_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in forecast.latest_runs(rows):
        groups[(row["data"], row["seq_len"], row["features"], row["pred_len"])].append(row)

    lines = [
        "| Dataset | Horizon | Seeds | EMamba-TS MSE | EMamba-TS MAE | SiMBA paper MSE | Gap (ours - paper) "
        "| Naive MSE | Naive MAE | s / epoch | epochs | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    datasets = sorted({key[:3] for key in groups})
    any_linear = False
    for data, seq_len, features in datasets:
        means, paper_vals = {}, {}
        for h in HORIZONS:
            group = groups.get((data, seq_len, features, h))
            if not group:
                continue
            mse = [r["mse"] for r in group]
            mae = [r["mae"] for r in group]
            paper = PAPER_MSE.get(data, {}).get(h) if (seq_len, features) == (96, "M") else None
            means[h], paper_vals[h] = statistics.mean(mse), paper
            gap = f"{statistics.mean(mse) - paper:+.3f}" if paper is not None else "-"
            spe = [r["sec_per_epoch"] for r in group if r.get("sec_per_epoch")]
            spe_txt = f"{statistics.mean(spe):.0f}" if spe else "-"
            epochs = statistics.mean(r.get("epochs", 0) for r in group)
            naive_mse = statistics.mean(r["naive_mse"] for r in group)
            naive_mae = statistics.mean(r["naive_mae"] for r in group)
            run_s = statistics.mean(r["run_seconds"] for r in group)
            linear = sum(1 for r in group if kept_linear_stage(r))
            any_linear = any_linear or bool(linear)
            mse_txt = _mean_std(mse) + (f" (linear {linear}/{len(group)})" if linear else "")
            lines.append(
                f"| {data} | {h} | {len(group)} | {mse_txt} | {_mean_std(mae)} | "
                f"{f'{paper:.3f}' if paper is not None else '-'} | {gap} | {naive_mse:.3f} | {naive_mae:.3f} | "
                f"{spe_txt} | {epochs:.1f} | {run_s:.0f} |"
            )
        if len(means) == len(HORIZONS):
            avg = statistics.mean(means.values())
            paper_avg = statistics.mean(paper_vals.values()) if all(v is not None for v in paper_vals.values()) else None
            gap = f"{avg - paper_avg:+.3f}" if paper_avg is not None else "-"
            paper_txt = f"{paper_avg:.3f}" if paper_avg is not None else "-"
            lines.append(f"| **{data}** | **Avg** | | **{avg:.3f}** | | **{paper_txt}** | **{gap}** | | | | | |")
    if any_linear:
        lines += ["", "(linear k/n): at k of the n seeds no epoch of the whole model beat the linear stage's "
                  "forecaster on validation (`--linear_epochs`), so the kept model is that forecaster alone "
                  "(the EMamba blocks' head is zero)."]
    return "\n".join(lines)


def kept_linear_stage(row: dict) -> bool:
    """Whether ``row``'s run kept the forecaster of its ``--linear_epochs`` stage (epoch 0), not a trained
    epoch of the whole model."""
    return bool(row.get("linear_epochs")) and row.get("best_epoch") == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="JSONL files written by `emamba forecast`")
    parser.add_argument("--des", default=None, help="keep only rows with this --des tag (e.g. table)")
    args = parser.parse_args(argv)
    try:
        rows = forecast.load_results(args.files, args.des)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not rows:
        print("no rows found", file=sys.stderr)
        return 1
    print(build_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
