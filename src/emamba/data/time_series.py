"""Multivariate time-series datasets with Time-Series-Library's (TSLib) long-term forecasting protocol.

Reproduces TSLib's ``Dataset_ETT_hour``, ``Dataset_ETT_minute`` and ``Dataset_Custom`` so that numbers
are comparable with the literature (Informer, PatchTST, iTransformer, SiMBA all use this protocol):

* ETTh*: 12 / 4 / 4 months of 30 days x 24 hours for train / val / test; ETTm*: the same in 15-minute
  steps (x4). Custom CSV (Electricity, Traffic, Weather, ...): 70 / 10 / 20 % of the rows.
* The look-back window of the first val (test) sample reaches ``seq_len`` steps back into the train (val)
  part, exactly as TSLib does, so every target step of a split is predicted once per window offset.
* A StandardScaler fitted on the train rows only; features ``M`` (all -> all), ``S`` (target -> target),
  ``MS`` (all -> target; the target is moved to the last column, so ``[..., -1:]`` selects it).
* Calendar features as TSLib's ``timeenc=1`` (``time_features``): each in [-0.5, 0.5].

Differences on purpose: the test loader never drops its last partial batch (some TSLib versions do, which
silently skips up to ``batch_size - 1`` test windows), and missing files / columns, NaNs and splits too
short for one window raise errors that name the problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "BUNDLED_DIR",
    "DATASETS",
    "FEATURES",
    "StandardScaler",
    "TimeSeriesDataset",
    "data_provider",
    "resolve_data_file",
    "split_borders",
    "time_features",
]

#: Files shipped inside the package (ETTh1.csv, CC BY-ND 4.0, see bundled/NOTICE.md).
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

#: ``--data`` name -> split protocol. Electricity / Traffic / Weather / ILI files use the custom protocol.
DATASETS = {
    "ETTh1": "ett_hour",
    "ETTh2": "ett_hour",
    "ETTm1": "ett_minute",
    "ETTm2": "ett_minute",
    "custom": "custom",
}
FEATURES = ("M", "S", "MS")
FLAGS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------
# Calendar features (TSLib utils/timefeatures.py, timeenc=1).
# --------------------------------------------------------------------------------------------------


def _second_of_minute(d: pd.DatetimeIndex) -> np.ndarray:
    return d.second / 59.0 - 0.5


def _minute_of_hour(d: pd.DatetimeIndex) -> np.ndarray:
    return d.minute / 59.0 - 0.5


def _hour_of_day(d: pd.DatetimeIndex) -> np.ndarray:
    return d.hour / 23.0 - 0.5


def _day_of_week(d: pd.DatetimeIndex) -> np.ndarray:
    return d.day_of_week / 6.0 - 0.5


def _day_of_month(d: pd.DatetimeIndex) -> np.ndarray:
    return (d.day - 1) / 30.0 - 0.5


def _day_of_year(d: pd.DatetimeIndex) -> np.ndarray:
    return (d.day_of_year - 1) / 365.0 - 0.5


def _month_of_year(d: pd.DatetimeIndex) -> np.ndarray:
    return (d.month - 1) / 11.0 - 0.5


def _week_of_year(d: pd.DatetimeIndex) -> np.ndarray:
    return (d.isocalendar().week.to_numpy(dtype=np.float64) - 1) / 52.0 - 0.5


_DAY = [_day_of_week, _day_of_month, _day_of_year]
_HOUR = [_hour_of_day] + _DAY
_MINUTE = [_minute_of_hour] + _HOUR
# Frequency unit -> features, in TSLib's order (finest first).
_TIME_FEATURES: dict[str, list[Callable[[pd.DatetimeIndex], np.ndarray]]] = {
    "y": [],
    "a": [],
    "m": [_month_of_year],
    "w": [_day_of_month, _week_of_year],
    "d": _DAY,
    "b": _DAY,
    "h": _HOUR,
    "t": _MINUTE,
    "min": _MINUTE,
    "s": [_second_of_minute] + _MINUTE,
}


def _freq_unit(freq: str) -> str:
    match = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]+)\s*", freq or "")
    unit = match.group(2).lower() if match else ""
    if unit not in _TIME_FEATURES:
        raise ValueError(
            f"unsupported --freq {freq!r}; use one of s, t (minutely), h, d, b, w, m, y, optionally with a "
            "multiple such as 15min"
        )
    return unit


def time_features(dates: Sequence | pd.DatetimeIndex, freq: str = "h") -> np.ndarray:
    """Calendar features of ``dates`` for sampling frequency ``freq``: (len(dates), n_features) float32.

    ``h`` gives [HourOfDay, DayOfWeek, DayOfMonth, DayOfYear]; ``t`` adds MinuteOfHour in front; each
    feature is scaled to [-0.5, 0.5] as in TSLib (``timeenc=1``).
    """
    funcs = _TIME_FEATURES[_freq_unit(freq)]
    index = pd.DatetimeIndex(pd.to_datetime(dates))
    if not funcs:
        return np.zeros((len(index), 0), dtype=np.float32)
    return np.stack([np.asarray(f(index), dtype=np.float64) for f in funcs], axis=1).astype(np.float32)


def num_time_features(freq: str) -> int:
    """Width of :func:`time_features` for ``freq`` (TSLib's ``freq_map``)."""
    return len(_TIME_FEATURES[_freq_unit(freq)])


# --------------------------------------------------------------------------------------------------
# Scaling and splits.
# --------------------------------------------------------------------------------------------------


class StandardScaler:
    """Per-column z-score with population std (sklearn's StandardScaler, which TSLib uses)."""

    def __init__(self) -> None:
        self.mean_: Optional[np.ndarray] = None
        self.scale_: Optional[np.ndarray] = None

    def fit(self, data: np.ndarray) -> "StandardScaler":
        data = np.asarray(data, dtype=np.float64)
        self.mean_ = data.mean(axis=0)
        std = data.std(axis=0)
        self.scale_ = np.where(std == 0, 1.0, std)  # constant columns: sklearn leaves them unscaled
        return self

    def _check(self) -> None:
        if self.mean_ is None:
            raise RuntimeError("StandardScaler used before fit()")

    def transform(self, data: np.ndarray) -> np.ndarray:
        self._check()
        return (np.asarray(data, dtype=np.float64) - self.mean_) / self.scale_

    def inverse_transform(self, data: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        self._check()
        if isinstance(data, torch.Tensor):
            mean = torch.as_tensor(self.mean_, dtype=data.dtype, device=data.device)
            scale = torch.as_tensor(self.scale_, dtype=data.dtype, device=data.device)
            return data * scale + mean
        return np.asarray(data) * self.scale_ + self.mean_


def split_borders(protocol: str, num_rows: int, seq_len: int) -> tuple[list[int], list[int]]:
    """(starts, ends) row indices of train / val / test, starts reaching ``seq_len`` into the previous split.

    ``protocol`` is a value of :data:`DATASETS`. ETT borders are fixed month counts (TSLib), so files
    shorter than 20 months are rejected rather than silently producing empty splits.
    """
    if protocol in ("ett_hour", "ett_minute"):
        steps_per_day = 24 if protocol == "ett_hour" else 24 * 4
        month = 30 * steps_per_day
        ends = [12 * month, 16 * month, 20 * month]
        if num_rows < ends[-1]:
            raise ValueError(
                f"the ETT protocol needs at least {ends[-1]} rows (20 months of 30 days), the file has {num_rows}; "
                "use --data custom for other files"
            )
        starts = [0, ends[0] - seq_len, ends[1] - seq_len]
    elif protocol == "custom":
        num_train = int(num_rows * 0.7)
        num_test = int(num_rows * 0.2)
        num_val = num_rows - num_train - num_test
        starts = [0, num_train - seq_len, num_rows - num_test - seq_len]
        ends = [num_train, num_train + num_val, num_rows]
    else:
        raise ValueError(f"unknown split protocol {protocol!r}; choose one of {sorted(set(DATASETS.values()))}")
    if min(starts) < 0:
        raise ValueError(f"seq_len={seq_len} is longer than the train part ({ends[0]} rows)")
    return starts, ends


# --------------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------------


def resolve_data_file(root_path: Optional[str | os.PathLike], data_path: str) -> Path:
    """The CSV file to read: ``root_path/data_path``, or without ``root_path`` the path as given or the
    bundled copy (ETTh1.csv). Raises FileNotFoundError naming every place it looked."""
    if root_path is not None:
        candidates = [Path(root_path) / data_path]
    else:
        candidates = [Path(data_path), BUNDLED_DIR / data_path]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    hint = "" if root_path is not None else f" (bundled files: {sorted(p.name for p in BUNDLED_DIR.glob('*.csv'))})"
    raise FileNotFoundError(f"data file {data_path!r} not found; looked at: {looked}{hint}. Pass --root_path DIR")


@dataclass(frozen=True)
class _Table:
    values: np.ndarray  # (rows, variables) float64, target last for M / MS
    dates: pd.Series
    columns: list[str]


_TABLE_CACHE: dict[tuple, _Table] = {}


def _read_table(path: Path, features: str, target: str) -> _Table:
    """Read and validate a CSV once per (file, mtime, features, target); the splits share it."""
    key = (str(path.resolve()), path.stat().st_mtime_ns, features, target)
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    df = pd.read_csv(path)
    if "date" not in df.columns:
        raise ValueError(f"{path}: no 'date' column (columns: {list(df.columns)})")
    if features in ("S", "MS") or target in df.columns:
        if target not in df.columns:
            raise ValueError(
                f"{path}: target column {target!r} not found (columns: {list(df.columns)}); pass --target NAME"
            )
        # TSLib's Dataset_Custom order: date, the other variables, target last.
        others = [c for c in df.columns if c not in ("date", target)]
        columns = [target] if features == "S" else others + [target]
    else:
        columns = [c for c in df.columns if c != "date"]
    if not columns:
        raise ValueError(f"{path}: no variable columns besides 'date'")
    data = df[columns]
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(data[c])]
    if bad:
        raise ValueError(f"{path}: non-numeric column(s) {bad}")
    values = data.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        nan_cols = [c for c, has in zip(columns, np.isnan(values).any(axis=0)) if has]
        raise ValueError(f"{path}: missing values (NaN) in column(s) {nan_cols}; fill them before training")
    try:
        dates = pd.to_datetime(df["date"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: cannot parse the 'date' column: {exc}") from exc
    table = _Table(values, dates, columns)
    _TABLE_CACHE[key] = table
    return table


# --------------------------------------------------------------------------------------------------
# Dataset and loaders.
# --------------------------------------------------------------------------------------------------


class TimeSeriesDataset(Dataset):
    """Sliding windows of one split: ``(seq_x, seq_y, seq_x_mark, seq_y_mark)`` as in TSLib (and the cycle
    phase as a fifth item when ``cycle_len`` is set).

    seq_x: (seq_len, C) look-back; seq_y: (label_len + pred_len, C) decoder window whose last ``pred_len``
    steps are the targets; ``*_mark``: calendar features of the same steps. All float32 numpy arrays.

    Args:
        root_path, data_path: the CSV (see :func:`resolve_data_file`).
        flag: ``train``, ``val`` or ``test``.
        size: (seq_len, label_len, pred_len).
        data: a key of :data:`DATASETS` (chooses the split protocol).
        features: ``M``, ``S`` or ``MS``.
        target: target column (last column of the arrays for M / MS).
        scale: z-score with the train statistics.
        freq: sampling frequency for the calendar features.
        cycle_len: if > 0, each item has a fifth element, the phase of the window's first step in a cycle of
            that many steps: its row index in the whole file modulo ``cycle_len`` (the ``cycle_index`` of
            EMamba-TS's learned cycle; with ETT's rows starting at midnight, 24 gives the hour of day for
            hourly data and 96 the quarter-hour of day for ETTm).
    """

    def __init__(
        self,
        root_path: Optional[str | os.PathLike],
        data_path: str,
        flag: str = "train",
        size: tuple[int, int, int] = (96, 48, 96),
        data: str = "ETTh1",
        features: str = "M",
        target: str = "OT",
        scale: bool = True,
        freq: str = "h",
        cycle_len: int = 0,
    ) -> None:
        if flag not in FLAGS:
            raise ValueError(f"flag must be one of {FLAGS}, got {flag!r}")
        if data not in DATASETS:
            raise ValueError(f"unknown dataset {data!r}; choose one of {list(DATASETS)} (custom = any CSV)")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        self.seq_len, self.label_len, self.pred_len = (int(s) for s in size)
        if self.seq_len <= 0 or self.pred_len <= 0 or not 0 <= self.label_len <= self.seq_len:
            raise ValueError(f"need seq_len > 0, pred_len > 0 and 0 <= label_len <= seq_len, got {size}")
        self.flag, self.features, self.target, self.scale, self.freq = flag, features, target, scale, freq
        if cycle_len < 0:
            raise ValueError(f"cycle_len must be >= 0 (0: no cycle index), got {cycle_len}")
        self.cycle_len = int(cycle_len)

        self.path = resolve_data_file(root_path, data_path)
        table = _read_table(self.path, features, target)
        self.columns = table.columns
        starts, ends = split_borders(DATASETS[data], len(table.values), self.seq_len)
        split = FLAGS.index(flag)
        self.border1, self.border2 = starts[split], ends[split]

        self.scaler = StandardScaler().fit(table.values[starts[0] : ends[0]])
        values = self.scaler.transform(table.values) if scale else table.values
        self.data_x = values[self.border1 : self.border2].astype(np.float32)
        self.data_y = self.data_x
        self.data_stamp = time_features(table.dates.iloc[self.border1 : self.border2], freq)

        if len(self.data_x) - self.seq_len - self.pred_len + 1 <= 0:
            raise ValueError(
                f"the {flag} split of {self.path} has {self.border2 - self.border1} rows, too few for one window "
                f"of seq_len + pred_len = {self.seq_len + self.pred_len}"
            )

    @property
    def num_variables(self) -> int:
        return self.data_x.shape[1]

    def __len__(self) -> int:
        return max(0, len(self.data_x) - self.seq_len - self.pred_len + 1)

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        s_end = index + self.seq_len
        r_begin = s_end - self.label_len
        r_end = s_end + self.pred_len
        item = (
            self.data_x[index:s_end],
            self.data_y[r_begin:r_end],
            self.data_stamp[index:s_end],
            self.data_stamp[r_begin:r_end],
        )
        if self.cycle_len:
            item += (np.int64((self.border1 + index) % self.cycle_len),)
        return item

    def inverse_transform(self, data):
        return self.scaler.inverse_transform(data)


def data_provider(args, flag: str) -> tuple[TimeSeriesDataset, DataLoader]:
    """TSLib's ``data_provider(args, flag)``: the split's dataset and loader.

    Reads ``root_path, data_path, data, seq_len, label_len, pred_len, features, target, freq, batch_size,
    num_workers`` and optionally ``cycle_len`` from ``args``. Only the train loader shuffles and drops its
    last partial batch (as TSLib; it keeps batch statistics steady); val and test keep every window.
    """
    dataset = TimeSeriesDataset(
        root_path=args.root_path,
        data_path=args.data_path,
        flag=flag,
        size=(args.seq_len, args.label_len, args.pred_len),
        data=args.data,
        features=args.features,
        target=args.target,
        freq=args.freq,
        cycle_len=getattr(args, "cycle_len", 0),
    )
    train = flag == "train"
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= args.batch_size,
        num_workers=getattr(args, "num_workers", 0),
        persistent_workers=getattr(args, "num_workers", 0) > 0,
    )
    return dataset, loader
