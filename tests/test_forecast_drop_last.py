"""scripts/forecast_drop_last.py: re-scoring a trained checkpoint with and without the last partial test batch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emamba.engine import forecast

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d_model", "8", "--e_layers", "1", "--d_ff", "16", "--d_state", "4", "--num_threads", "1"]


def load_script():
    spec = importlib.util.spec_from_file_location("forecast_drop_last", ROOT / "scripts" / "forecast_drop_last.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("windows, batch, kept", [(2545, 128, 2432), (2545, 32, 2528), (256, 128, 256), (100, 128, 0)])
def test_kept_windows_is_whole_batches(windows, batch, kept):
    assert load_script().kept_windows(windows, batch) == kept


def _write_custom(path: Path, rows: int = 700) -> None:
    t = np.arange(rows, dtype=np.float64)
    rng = np.random.default_rng(1)
    pd.DataFrame({
        "date": pd.date_range("2021-01-01", periods=rows, freq="h"),
        "a": np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(rows),
        "OT": np.cos(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(rows) * (1 + 4 * (t > 0.9 * rows)),
    }).to_csv(path, index=False)


def test_rescore_reproduces_the_row_and_drops_the_tail(tmp_path, capsys):
    _write_custom(tmp_path / "toy.csv")
    results = tmp_path / "results.jsonl"
    assert forecast.main(["--data", "custom", "--root_path", str(tmp_path), "--data_path", "toy.csv", "--seq_len", "48",
                          "--label_len", "24", "--pred_len", "24", "--train_epochs", "1", "--des", "table", *TINY,
                          "--checkpoints", str(tmp_path / "ckpt"), "--results_file", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    script = load_script()
    out = tmp_path / "drop_last.jsonl"
    assert script.main([str(results), "--root_path", str(tmp_path), "--batch_sizes", "16", "1000",
                        "--out", str(out)]) == 0
    rescored = json.loads(out.read_text().splitlines()[-1])
    assert rescored["reproduces_row"] and rescored["mse_all"] == pytest.approx(row["mse"], rel=1e-6)
    windows = row["test_windows"]
    assert rescored["windows"] == windows and rescored["dropped_16"] == windows % 16 != 0
    # the noisy tail of the series is what drop_last leaves out, so the score must change
    assert rescored["mse_drop_last_16"] != pytest.approx(rescored["mse_all"], rel=1e-4)
    assert rescored["mse_drop_last_1000"] is None and rescored["dropped_1000"] == windows  # no whole batch
    text = capsys.readouterr().out
    assert "| custom | 24 | 1 |" in text and "no whole batch" in text


def test_missing_checkpoint_and_files_are_clear_errors(tmp_path, capsys):
    script = load_script()
    assert script.main([str(tmp_path / "none.jsonl")]) == 1
    assert "results file not found" in capsys.readouterr().err
    row = {"setting": "s", "data": "ETTh1", "data_path": "ETTh1.csv", "pred_len": 96, "seq_len": 96, "features": "M",
           "seed": 2021, "des": "table", "mse": 0.4, "checkpoint": str(tmp_path / "gone" / "checkpoint.pth")}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    assert script.main([str(tmp_path / "r.jsonl")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert script.main([str(tmp_path / "r.jsonl"), "--des", "other"]) == 1
    assert "no rows with des 'other'" in capsys.readouterr().err
