"""scripts/forecast_select.py: validation means per configuration, and the per-seed view of the adoption rule."""

from __future__ import annotations

from engine_helpers import load_script


def _row(des, seed, loss, data="ETTh1", pred_len=96, **extra):
    return {"data": data, "pred_len": pred_len, "des": des, "seed": seed, "best_val_loss": loss, "mse": 9.9, **extra}


ROWS = [
    _row("table", 2021, 1.00), _row("table", 2022, 1.02), _row("table", 2023, 0.98),
    _row("vs_a", 2021, 0.95), _row("vs_a", 2022, 0.99), _row("vs_a", 2023, 0.99),  # lower at two seeds of three
    _row("vs_b", 2021, 0.50), _row("vs_b", 2021, 0.97),  # a rerun of one seed: the last row counts
    _row("vs_c", 2021, 0.90, config="x.yaml"),  # a table rerun made from a sweep config: not a configuration
    _row("vs_a", 2021, 0.5, data="ETTh2"), _row("table", 2021, 0.6, data="ETTh2"),
]


def test_means_relative_changes_and_the_per_seed_rule():
    select = load_script("forecast_select")
    val = select.validation_losses(ROWS)
    assert val[("ETTh1", 96)]["vs_b"] == {2021: 0.97} and "vs_c" not in val[("ETTh1", 96)]
    text = select.report(val, per_seed=True, only={("ETTh1", 96)})
    assert "ETTh2" not in text and "9.9" not in text  # other pairs filtered; test metrics never printed
    assert "default seed spread 4.00% over 3 seeds" in text  # (1.02 - 0.98) / 1.00
    lines = text.splitlines()
    a = lines.index(next(line for line in lines if line.strip().startswith("vs_a")))
    assert "(-2.33% vs default on the same seeds)" in lines[a]  # 0.9767 / 1.00 - 1
    assert lines[a + 1].strip() == ("per seed: 2021 0.9500 (-5.00%), 2022 0.9900 (-2.94%), 2023 0.9900 (+1.02%); "
                                    "lower at every seed: no")
    b = lines.index(next(line for line in lines if line.strip().startswith("vs_b")))
    assert "(-3.00% vs default on the same seeds)" in lines[b] and lines[b + 1].endswith("lower at every seed: yes")


def test_plain_report_and_seed_filter():
    select = load_script("forecast_select")
    text = select.report(select.validation_losses(ROWS, seeds=[2022]))
    assert "per seed" not in text and "spread" not in text
    assert "vs_a                     0.9900 [1] (-2.94% vs default on the same seeds)" in text
    assert "vs_b" not in text and "ETTh2" not in text  # no 2022 rows there
