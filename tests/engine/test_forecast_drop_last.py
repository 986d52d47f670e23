"""scripts/forecast_drop_last.py: re-scoring a trained checkpoint with and without the last partial test batch."""

from __future__ import annotations

import json

import pytest

from emamba.engine import forecast

from engine_helpers import FORECAST_TINY as TINY, load_script, write_custom_csv


@pytest.mark.parametrize("windows, batch, kept", [(2545, 128, 2432), (2545, 32, 2528), (256, 128, 256), (100, 128, 0)])
def test_kept_windows_is_whole_batches(windows, batch, kept):
    assert load_script("forecast_drop_last").kept_windows(windows, batch) == kept


def test_rescore_reproduces_the_row_and_drops_the_tail(tmp_path, capsys):
    write_custom_csv(tmp_path / "toy.csv")
    results = tmp_path / "results.jsonl"
    assert forecast.main(["--data", "custom", "--root_path", str(tmp_path), "--data_path", "toy.csv", "--seq_len", "48",
                          "--label_len", "24", "--pred_len", "24", "--train_epochs", "1", "--des", "table", *TINY,
                          "--checkpoints", str(tmp_path / "ckpt"), "--results_file", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    script = load_script("forecast_drop_last")
    out = tmp_path / "drop_last.jsonl"
    assert script.main([str(results), "--root_path", str(tmp_path), "--batch_sizes", "16", "1000",
                        "--out", str(out)]) == 0
    rescored = json.loads(out.read_text().splitlines()[-1])
    assert rescored["reproduces_row"] and rescored["mse_all"] == pytest.approx(row["mse"], rel=1e-6)
    windows = row["test_windows"]
    assert rescored["windows"] == windows and rescored["dropped_16"] == windows % 16 != 0
    # the left-out windows are scored differently from the rest, so the MSE must move
    assert rescored["mse_drop_last_16"] != pytest.approx(rescored["mse_all"], rel=1e-4)
    assert rescored["mse_drop_last_1000"] is None and rescored["dropped_1000"] == windows  # no whole batch
    text = capsys.readouterr().out
    assert "| custom | 24 | 1 |" in text and "no whole batch" in text


def test_missing_checkpoint_and_files_are_clear_errors(tmp_path, capsys):
    script = load_script("forecast_drop_last")
    assert script.main([str(tmp_path / "none.jsonl")]) == 1
    assert "results file not found" in capsys.readouterr().err
    row = {"setting": "s", "data": "ETTh1", "data_path": "ETTh1.csv", "pred_len": 96, "seq_len": 96, "features": "M",
           "seed": 2021, "des": "table", "mse": 0.4, "checkpoint": str(tmp_path / "gone" / "checkpoint.pth")}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    assert script.main([str(tmp_path / "r.jsonl")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert script.main([str(tmp_path / "r.jsonl"), "--des", "other"]) == 1
    assert "no rows with des 'other'" in capsys.readouterr().err
