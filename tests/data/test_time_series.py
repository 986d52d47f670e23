"""Time-Series-Library protocol of emamba.data.time_series on the real ETT files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from emamba.data.time_series import (
    BUNDLED_DIR,
    StandardScaler,
    TimeSeriesDataset,
    data_provider,
    split_borders,
    time_features,
)

ETT_DIR = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ETT-small").resolve()
needs_ett = pytest.mark.skipif(
    not (ETT_DIR / "ETTm1.csv").is_file(), reason=f"ETT-small data not found at {ETT_DIR} (../shared/data from the repo)"
)

# (data, rows, train/val/test windows for seq_len 96, pred_len 96), as TSLib prints them.
EXPECTED = {
    "ETTh1": ((8449, 2785, 2785), [0, 8544, 11424], [8640, 11520, 14400]),
    "ETTm1": ((34369, 11425, 11425), [0, 34464, 45984], [34560, 46080, 57600]),
}


@needs_ett
@pytest.mark.parametrize("data", ["ETTh1", "ETTm1"])
def test_ett_borders_and_window_counts(data):
    counts, starts, ends = EXPECTED[data]
    for flag, count, b1, b2 in zip(("train", "val", "test"), counts, starts, ends):
        ds = TimeSeriesDataset(ETT_DIR, f"{data}.csv", flag, (96, 48, 96), data)
        assert (ds.border1, ds.border2) == (b1, b2)
        assert len(ds) == count
        seq_x, seq_y, x_mark, y_mark = ds[len(ds) - 1]
        assert seq_x.shape == (96, 7) and seq_y.shape == (144, 7)
        # the last window's target ends exactly on the split's last row
        np.testing.assert_array_equal(seq_y[-1], ds.data_x[-1])


def test_split_borders_custom_and_short_files():
    starts, ends = split_borders("custom", 1000, 96)
    assert ends == [700, 800, 1000] and starts == [0, 700 - 96, 800 - 96]
    with pytest.raises(ValueError, match="at least 14400 rows"):
        split_borders("ett_hour", 1000, 96)


@needs_ett
def test_scaler_fit_on_train_rows_only():
    ds = TimeSeriesDataset(ETT_DIR, "ETTh1.csv", "test", (96, 48, 96), "ETTh1")
    raw = pd.read_csv(ETT_DIR / "ETTh1.csv").iloc[:8640, 1:].to_numpy()
    np.testing.assert_allclose(ds.scaler.mean_, raw.mean(0))
    np.testing.assert_allclose(ds.scaler.scale_, raw.std(0))  # population std, like sklearn
    train = TimeSeriesDataset(ETT_DIR, "ETTh1.csv", "train", (96, 48, 96), "ETTh1")
    np.testing.assert_allclose(train.data_x.mean(0), 0, atol=1e-5)
    assert abs(ds.data_x.mean()) > 1e-3  # test rows are not re-centred on themselves
    np.testing.assert_allclose(ds.inverse_transform(ds.data_x), ds.scaler.inverse_transform(ds.data_x))


def test_standard_scaler_constant_column_and_unfitted():
    with pytest.raises(RuntimeError, match="before fit"):
        StandardScaler().transform(np.zeros((2, 2)))
    s = StandardScaler().fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(s.transform([[2.0, 5.0]]), [[0.0, 0.0]])
    np.testing.assert_allclose(s.inverse_transform(torch.zeros(1, 2)).numpy(), [[2.0, 5.0]])


def test_test_loader_keeps_every_window():
    class Args:
        root_path, data_path, data, features, target, freq = None, "ETTh1.csv", "ETTh1", "M", "OT", "h"
        seq_len, label_len, pred_len, batch_size, num_workers = 96, 48, 96, 128, 0

    ds, loader = data_provider(Args, "test")
    assert len(ds) % Args.batch_size  # 2785 windows: the last batch is partial
    assert sum(batch[0].shape[0] for batch in loader) == len(ds) == 2785
    train_ds, train_loader = data_provider(Args, "train")
    assert train_loader.drop_last and len(train_loader) == len(train_ds) // Args.batch_size


def test_features_modes_put_target_last():
    sizes = (96, 48, 24)
    m = TimeSeriesDataset(None, "ETTh1.csv", "val", sizes, "ETTh1", features="M")
    s = TimeSeriesDataset(None, "ETTh1.csv", "val", sizes, "ETTh1", features="S")
    ms = TimeSeriesDataset(None, "ETTh1.csv", "val", sizes, "ETTh1", features="MS", target="HUFL")
    assert m.num_variables == 7 and m.columns[-1] == "OT"
    assert s.num_variables == 1 and s.columns == ["OT"]
    np.testing.assert_allclose(s.data_x[:, 0], m.data_x[:, -1], rtol=1e-6)
    assert ms.columns[-1] == "HUFL" and ms.num_variables == 7


def test_time_features_shapes_and_range():
    dates = pd.date_range("2016-07-01", periods=200, freq="15min")
    assert time_features(dates, "h").shape == (200, 4)
    assert time_features(dates, "t").shape == (200, 5)
    assert time_features(dates, "15min").shape == (200, 5)
    assert time_features(dates, "d").shape == (200, 3)
    feats = time_features(dates, "t")
    assert feats.min() >= -0.5 and feats.max() <= 0.5
    # HourOfDay of 2016-07-01 01:00 is 1/23 - 0.5, MinuteOfHour of 00:15 is 15/59 - 0.5
    np.testing.assert_allclose(feats[4, 1], 1 / 23 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(feats[1, 0], 15 / 59 - 0.5, rtol=1e-6)
    ds = TimeSeriesDataset(None, "ETTh1.csv", "train", (96, 48, 96), "ETTh1", freq="h")
    assert ds[0][2].shape == (96, 4) and ds[0][3].shape == (144, 4)
    with pytest.raises(ValueError, match="unsupported --freq"):
        time_features(dates, "fortnight")


def test_bundled_copy_is_unchanged():
    assert (BUNDLED_DIR / "LICENSE").is_file() and (BUNDLED_DIR / "NOTICE.md").is_file()
    if (ETT_DIR / "ETTh1.csv").is_file():
        assert (BUNDLED_DIR / "ETTh1.csv").read_bytes() == (ETT_DIR / "ETTh1.csv").read_bytes()


def test_missing_file_and_column_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TimeSeriesDataset(tmp_path, "nope.csv", "train", (96, 48, 96), "custom")
    pd.DataFrame({"date": pd.date_range("2020", periods=400, freq="h"), "a": np.arange(400.0)}).to_csv(
        tmp_path / "x.csv", index=False
    )
    with pytest.raises(ValueError, match="target column 'OT' not found"):
        TimeSeriesDataset(tmp_path, "x.csv", "train", (24, 12, 24), "custom", features="S")
    pd.DataFrame({"when": ["2020-01-01"], "OT": [1.0]}).to_csv(tmp_path / "y.csv", index=False)
    with pytest.raises(ValueError, match="no 'date' column"):
        TimeSeriesDataset(tmp_path, "y.csv", "train", (24, 12, 24), "custom")
    with pytest.raises(ValueError, match="too few for one window"):
        TimeSeriesDataset(tmp_path, "x.csv", "val", (96, 48, 96), "custom")
    # M on a file without the target column works (all columns are variables)
    assert TimeSeriesDataset(tmp_path, "x.csv", "train", (24, 12, 24), "custom").num_variables == 1


@pytest.mark.parametrize(
    "data, cycle_len, freq, root",
    [
        ("ETTh1", 24, "h", BUNDLED_DIR),  # hour of day
        pytest.param("ETTm1", 96, "t", ETT_DIR, marks=needs_ett),  # quarter-hour of day
    ],
)
def test_cycle_index_is_the_phase_of_the_calendar(data, cycle_len, freq, root):
    """The fifth item is the window's first row in the file modulo cycle_len; on ETT (rows from midnight)
    that is the time of day, checked against the calendar features of every split."""
    for flag in ("train", "val", "test"):
        ds = TimeSeriesDataset(root, f"{data}.csv", flag, (96, 48, 96), data, freq=freq, cycle_len=cycle_len)
        for index in (0, 1, 37, len(ds) - 1):
            item = ds[index]
            assert len(item) == 5 and item[4].dtype == np.int64
            assert item[4] == (ds.border1 + index) % cycle_len
            stamp = item[2][0]  # first look-back step; TSLib timeenc=1 features in [-0.5, 0.5]
            if freq == "h":
                expected = round((stamp[0] + 0.5) * 23)
            else:
                expected = round((stamp[1] + 0.5) * 23) * 4 + round((stamp[0] + 0.5) * 59) // 15
            assert item[4] == expected
    assert len(TimeSeriesDataset(root, f"{data}.csv", "val", (96, 48, 96), data, freq=freq)[0]) == 4  # off: TSLib's 4
    with pytest.raises(ValueError, match="cycle_len must be >= 0"):
        TimeSeriesDataset(root, f"{data}.csv", "val", (96, 48, 96), data, freq=freq, cycle_len=-1)
