#!/usr/bin/env python
"""How much a test loader that drops its last partial batch changes the reported test MSE.

    python scripts/forecast_drop_last.py results/forecast/ett.jsonl --des table \
        --root_path ../shared/data/ETT-small --batch_sizes 32 128 --out results/forecast/drop_last.jsonl

Why: PatchTST's code, which the SiMBA paper says it used, builds its *test* DataLoader with
``drop_last=True`` at the training batch size (128 in PatchTST's ETT scripts), so the last
``windows % batch_size`` test windows (the end of the test period) are never scored. Time-Series-Library
and ``emamba forecast`` score every window. This script re-scores the checkpoints behind result rows both
ways, so the two conventions can be compared on the same trained models. It is a diagnostic only: the
results table and every target stay on all windows.

For the latest row per (dataset, horizon, look-back, features, seed) it rebuilds the run's arguments from
the row, loads the row's checkpoint, predicts every test window once, checks that the MSE over all windows
reproduces the row's ``mse``, and reports the MSE over the first ``floor(windows / B) * B`` windows for each
B in ``--batch_sizes`` (exactly what ``drop_last=True`` at batch B keeps, since the test loader is not
shuffled). Prints a Markdown table (mean over seeds) and appends one JSON row per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from emamba.data.time_series import data_provider
from emamba.engine import forecast
from emamba.models.forecasting import Model

HORIZONS = (96, 192, 336, 720)


def kept_windows(windows: int, batch_size: int) -> int:
    """Windows a non-shuffled ``DataLoader(drop_last=True)`` yields: whole batches only."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return windows // batch_size * batch_size


def rescore(row: dict, root_path: str | None, batch_sizes: list[int]) -> dict:
    """Test MSE of ``row``'s checkpoint over all windows and over the windows drop_last keeps per batch size."""
    ckpt = Path(row["checkpoint"])
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt} (rerun the run that wrote this row to recreate it)")
    args = forecast.args_from_row(row, root_path)
    _, loader = data_provider(args, "test")
    model = Model(args)
    forecast.load_run_checkpoint(model, ckpt)
    pred, true = forecast.predict(model, loader, args, torch.device("cpu"), desc=f"{row['data']}-{row['pred_len']}")
    full = forecast.metric(pred, true)["mse"]
    out = {"setting": row["setting"], "data": row["data"], "pred_len": row["pred_len"], "seq_len": row["seq_len"],
           "features": row["features"], "seed": row["seed"], "windows": int(len(pred)), "mse_all": full,
           "row_mse": row["mse"], "reproduces_row": abs(full - row["mse"]) <= 1e-6 * max(1.0, abs(row["mse"]))}
    for b in batch_sizes:
        keep = kept_windows(len(pred), b)
        out[f"mse_drop_last_{b}"] = forecast.metric(pred[:keep], true[:keep])["mse"] if keep else None
        out[f"dropped_{b}"] = int(len(pred) - keep)
    return out


def table(results: list[dict], batch_sizes: list[int]) -> str:
    """Markdown: per (dataset, horizon) mean over seeds, all windows vs drop_last at each batch size."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["data"], r["seq_len"], r["features"], r["pred_len"])].append(r)
    cols = " | ".join(f"drop_last at {b} (windows dropped)" for b in batch_sizes)
    lines = [f"| Dataset | Horizon | Seeds | MSE, all windows | {cols} |",
             "|---|---|---|---|" + "---|" * len(batch_sizes)]
    for data, seq_len, features in sorted({key[:3] for key in groups}):
        horizons = sorted(key[3] for key in groups if key[:3] == (data, seq_len, features))
        means: dict = {"all": []} | {b: [] for b in batch_sizes}
        for h in horizons:
            group = groups[(data, seq_len, features, h)]
            full = statistics.mean(r["mse_all"] for r in group)
            means["all"].append(full)
            cells = []
            for b in batch_sizes:
                vals = [r[f"mse_drop_last_{b}"] for r in group]
                if any(v is None for v in vals):
                    cells.append("- (no whole batch)")
                    continue
                means[b].append(statistics.mean(vals))
                cells.append(f"{means[b][-1]:.3f} ({group[0][f'dropped_{b}']})")
            lines.append(f"| {data} | {h} | {len(group)} | {full:.3f} | " + " | ".join(cells) + " |")
        if horizons == list(HORIZONS):  # the paper's average over its four horizons
            avg = " | ".join(f"**{statistics.mean(means[b]):.3f}**" if len(means[b]) == len(HORIZONS) else "-"
                             for b in batch_sizes)
            lines.append(f"| **{data}** | **Avg** | | **{statistics.mean(means['all']):.3f}** | {avg} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="emamba forecast JSONL results")
    p.add_argument("--des", default="table", help="only rows with this des tag ('' for all rows)")
    p.add_argument("--root_path", default=None, help="data folder (default: the bundled ETTh1 copy only)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--out", type=Path, default=None, help="append one JSON row per rescored run here")
    p.add_argument("--num_threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    try:
        if any(b < 1 for b in args.batch_sizes):
            raise ValueError(f"--batch_sizes must be positive, got {args.batch_sizes}")
        rows = forecast.latest_runs(forecast.load_results(args.files, args.des or None))
        if not rows:
            raise ValueError(f"no rows with des {args.des!r} in {', '.join(map(str, args.files))}")
        results = [rescore(row, args.root_path, args.batch_sizes) for row in rows]
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"forecast_drop_last: error: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")
    print(table(results, args.batch_sizes))
    bad = [r["setting"] for r in results if not r["reproduces_row"]]
    if bad:
        print(f"forecast_drop_last: error: the all-windows MSE does not reproduce the row for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
