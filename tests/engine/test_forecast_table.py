"""scripts/forecast_table.py: means per (dataset, horizon), the average row, and the linear-stage marker."""

from __future__ import annotations

import pytest

from engine_helpers import load_script


def _row(pred_len, seed, mse, **extra):
    return {"data": "ETTh1", "seq_len": 96, "features": "M", "pred_len": pred_len, "seed": seed, "mse": mse,
            "mae": mse / 2, "naive_mse": 1.0, "naive_mae": 0.5, "run_seconds": 10.0, "sec_per_epoch": 2.0,
            "epochs": 5, **extra}


def test_table_means_the_average_row_and_marks_runs_that_kept_the_linear_stage():
    table = load_script("forecast_table")
    rows = [_row(h, s, 0.4 + h / 10000 + s / 1e6) for h in (96, 192, 336, 720) for s in (2021, 2022)]
    rows += [_row(96, 2021, 0.3, linear_epochs=30, best_epoch=0),  # a rerun: the later row replaces seed 2021
             _row(192, 2021, 0.3, linear_epochs=30, best_epoch=3)]  # two stages, the whole model kept
    text = table.build_table(rows)
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ETTh1 |")}
    assert "(linear 1/2)" in lines["96"] and "linear" not in lines["192"] + lines["336"] + lines["720"]
    mean_96 = (0.3 + 0.4 + 96 / 10000 + 2022 / 1e6) / 2
    assert lines["96"].split(" | ")[3].startswith(f"{mean_96:.3f} ± ")
    assert "| **ETTh1** | **Avg** |" in text and text.strip().endswith("(the EMamba blocks' head is zero).")
    assert "(linear" not in table.build_table(rows[:8])  # single-stage runs: no marker, no legend
    assert table.kept_linear_stage({"linear_epochs": 30, "best_epoch": 0})
    assert not table.kept_linear_stage({"best_epoch": 0}) and not table.kept_linear_stage({"linear_epochs": 0})


def test_paper_average_is_the_mean_of_its_rows():
    table = load_script("forecast_table")
    assert sum(table.PAPER_MSE["ETTh1"].values()) / 4 == pytest.approx(0.44175)
