"""``emamba forecast``: long-horizon multivariate forecasting with EMamba-TS, Time-Series-Library style.

Accepts Time-Series-Library's (TSLib) argument names so that its scripts translate one to one, and follows
its protocol: MSE training loss, Adam, early stopping on the validation loss (best checkpoint kept), test
metrics MSE / MAE / RMSE / MAPE / MSPE on the scaled data over every test window. Each run appends one
JSON (or CSV) row to ``--results_file``; the last stdout line is a JSON object with the test ``mse`` and
``mae`` (mean over ``--itr`` runs) so scripts can parse it.

Per run, ``--checkpoints/<setting>/`` holds ``checkpoint.pth`` (the best weights), ``epochs.csv`` (one row per
epoch: learning rate, training loss, validation MSE, seconds) and, while training, ``last.pth``: the training
state after the newest epoch (weights, optimizer, weight average, early-stopping counters, random generator
states), written atomically and deleted when training ends. A killed run continues from it with
``--resume``, producing the same result as an uninterrupted run.

Example (bundled ETTh1, committed defaults)::

    emamba forecast --data ETTh1 --features M --seq_len 96 --pred_len 96 --seed 2021
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data.augment import AUG_METHODS, augment_batch
from ..data.time_series import DATASETS, FEATURES, TimeSeriesDataset, data_provider
from ..models.forecasting import TOKENIZATIONS, Model
from .checkpoint import (atomic_save, atomic_write_bytes, get_rng_state, load_checkpoint, load_model_weights,
                         set_rng_state, to_plain)

LRADJ = ("type1", "type3", "cosine", "constant")
#: Keys of the last stdout line / results row that hold the test metrics.
METRICS = ("mae", "mse", "rmse", "mape", "mspe")


# --------------------------------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------------------------------


def _bool_int(text: str) -> int:
    """TSLib passes switches as 0/1 integers (``--revin 1``); accept true/false too."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return 1
    if value in ("0", "false", "no"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _unit_interval(what: str, closed: bool = False):
    """argparse type: a float in [0, 1) (``closed``: [0, 1]); the error names ``what``."""
    interval = "[0, 1]" if closed else "[0, 1)"

    def parse(text: str) -> float:
        value = float(text)
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}")
        return value

    parse.__name__ = "float"  # argparse's "invalid float value: ..." for text that is no number
    return parse


_probability = _unit_interval("a dropout rate")
_ema_decay = _unit_interval("an EMA decay (0 turns it off)")
_loss_weight = _unit_interval("a loss weight", closed=True)
_aug_rate = _unit_interval("an augmentation rate", closed=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emamba forecast",
        description="Train and test EMamba-TS on a multivariate time series (Time-Series-Library arguments).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML file of argument defaults (keys = option names); "
                   "options given on the command line win")
    g = p.add_argument_group("task")
    g.add_argument("--task_name", default="long_term_forecast", choices=["long_term_forecast"])
    g.add_argument("--is_training", type=_bool_int, default=1, help="1: train then test; 0: test the saved checkpoint")
    g.add_argument("--model_id", default="", help="run name used in the setting string (default: DATA_SEQ_PRED)")
    g.add_argument("--model", default="EMamba", choices=["EMamba"])
    g.add_argument("--des", default="Exp", help="free-text tag in the setting string")
    g.add_argument("--itr", type=_positive_int, default=1, help="repeats; repeat i uses seed + i")
    g.add_argument("--seed", type=int, default=2021)

    g = p.add_argument_group("data")
    g.add_argument("--data", default="ETTh1", choices=list(DATASETS),
                   help="split protocol: ETT borders (12/4/4 months) or custom (70/10/20 %%)")
    g.add_argument("--root_path", default=None,
                   help="data folder (default: DATA_PATH as given, else the bundled copy of ETTh1.csv)")
    g.add_argument("--data_path", default=None, help="CSV file name (default: DATA.csv for ETT datasets)")
    g.add_argument("--features", default="M", choices=list(FEATURES),
                   help="M: all -> all, S: target -> target, MS: all -> target")
    g.add_argument("--target", default="OT", help="target column for S / MS")
    g.add_argument("--freq", default=None, help="calendar-feature frequency (default: t for ETTm, else h)")
    g.add_argument("--seq_len", type=_positive_int, default=96, help="look-back length")
    g.add_argument("--label_len", type=_non_negative_int, default=48,
                   help="decoder start-token length of TSLib's x_dec (EMamba-TS does not read it)")
    g.add_argument("--pred_len", type=_positive_int, default=96, help="horizon")
    g.add_argument("--enc_in", type=_positive_int, default=None,
                   help="input variates (default: from the data; an explicit value is checked against it)")
    g.add_argument("--dec_in", type=_positive_int, default=None, help="TSLib name; must equal enc_in if given")
    g.add_argument("--c_out", type=_positive_int, default=None,
                   help="output variates (default: enc_in for M, 1 for S / MS; checked against the data)")
    g.add_argument("--num_workers", type=_non_negative_int, default=0, help="DataLoader workers")

    g = p.add_argument_group("model (EMamba-TS; defaults chosen on the validation split)")
    g.add_argument("--tokenization", default="patch", choices=list(TOKENIZATIONS))
    g.add_argument("--patch_len", type=_positive_int, default=16)
    g.add_argument("--stride", type=_positive_int, default=16)
    g.add_argument("--d_model", type=_positive_int, default=32)
    g.add_argument("--e_layers", type=_positive_int, default=1)
    g.add_argument("--d_ff", type=_positive_int, default=64, help="inner width of the Mamba mixer")
    g.add_argument("--d_state", type=_positive_int, default=8, help="Mamba SSM state size")
    g.add_argument("--d_conv", type=_positive_int, default=4, help="Mamba causal conv width")
    g.add_argument("--bidirectional", type=_bool_int, default=0, help="add a reverse-direction Mamba branch")
    g.add_argument("--einfft_blocks", type=_positive_int, default=4, help="EinFFT channel blocks")
    g.add_argument("--dropout", type=_probability, default=0.1)
    g.add_argument("--head_dropout", type=_probability, default=0.0)
    g.add_argument("--revin", type=_bool_int, default=1, help="reversible instance normalisation")
    g.add_argument("--affine", type=_bool_int, default=1, help="RevIN's learnable per-variate scale and shift")
    g.add_argument("--subtract_last", type=_bool_int, default=0,
                   help="RevIN centres each window on its last value instead of its mean")
    g.add_argument("--cycle_len", type=_non_negative_int, default=0,
                   help="0: off; else learn a recurring cycle of this many steps per variate, subtracted from "
                        "the input and added to the forecast (CycleNet's residual cycle; 24 = daily for hourly "
                        "data, 96 = daily for 15-minute data; phase = row index in the file modulo cycle_len)")
    g.add_argument("--linear_skip", type=_bool_int, default=0,
                   help="add a linear look-back -> horizon map (RLinear, shared by the variates, starting at "
                        "zero) to the forecast, so the blocks learn the residual")
    g.add_argument("--decomp_kernel", type=_non_negative_int, default=0,
                   help="0: off; else an odd moving-average window: its trend of the look-back is extrapolated "
                        "by a linear map, the blocks see the rest (Autoformer / DLinear decomposition; DLinear: 25)")
    g.add_argument("--linear_epochs", type=_non_negative_int, default=0,
                   help="0: off; else a first training stage of at most this many epochs that fits only the "
                        "linear part (--linear_skip's path, the cycle, RevIN's affine: RLinear / CycleNet-Linear) "
                        "with its own --linear_lr / --linear_batch_size / --linear_patience and the type3 schedule; "
                        "the second stage then trains everything from that forecaster, the blocks' head zeroed, "
                        "and keeps it if no epoch beats it on validation. Needs --linear_skip 1")
    g.add_argument("--linear_lr", type=float, default=0.01, help="learning rate of the --linear_epochs stage")
    g.add_argument("--linear_batch_size", type=_positive_int, default=256,
                   help="training batch size of the --linear_epochs stage")
    g.add_argument("--linear_patience", type=_positive_int, default=5,
                   help="early-stopping patience of the --linear_epochs stage")
    g.add_argument("--time_tokens", type=_bool_int, default=0,
                   help="variate tokenization only: the look-back's calendar features (--freq's time features) "
                        "become extra tokens in front of the variates (iTransformer)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_epochs", type=_positive_int, default=10)
    g.add_argument("--patience", type=_positive_int, default=3, help="early-stopping patience (epochs)")
    g.add_argument("--batch_size", type=_positive_int, default=32)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lradj", default="type1", choices=list(LRADJ),
                   help="type1: halve every epoch; type3: constant 3 epochs then x0.9; cosine; constant")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--ema_decay", type=_ema_decay, default=0.0,
                   help="0: off; else validate, keep and test an exponential moving average of the weights "
                        "(timm ModelEmaV3, updated every step). With its warm-up the decay at step k is "
                        "min(ema_decay, 1 - k^(-2/3)): it reaches 0.99 only at step 1,000 and 0.998 at 11,180")
    g.add_argument("--loss", default="MSE", choices=list(LOSSES),
                   help="training loss; validation (early stopping) and test metrics stay MSE-based")
    g.add_argument("--freq_loss_weight", type=_loss_weight, default=0.0,
                   help="FreDF: train on (1 - w) x the --loss + w x the mean absolute difference of the "
                        "forecast's and the truth's Fourier spectra over the horizon (0: off, 1: spectrum only)")
    g.add_argument("--horizon_decay", type=_non_negative_float, default=0.0,
                   help="CARD's signal-decay loss: weigh the --loss at horizon step t by t^(-a), normalised to "
                        "mean 1 (0: every step alike; CARD uses 0.5), so the far, noisier steps pull less")
    g.add_argument("--aug_method", default="none", choices=AUG_METHODS,
                   help="FrAug: append to every training batch a copy of its windows (look-back and horizon as "
                        "one series) with Fourier coefficients masked (freq_mask) or swapped between windows "
                        "(freq_mix)")
    g.add_argument("--aug_rate", type=_aug_rate, default=0.5,
                   help="probability that --aug_method changes a coefficient (the mean is never changed)")

    g = p.add_argument_group("output")
    g.add_argument("--checkpoints", default="./checkpoints/", help="folder for checkpoints and plots")
    g.add_argument("--results_file", default="results/forecast/results.jsonl",
                   help="one row appended per run; .csv for CSV, anything else JSON lines")
    g.add_argument("--plot", action="store_true",
                   help="save forecast-vs-truth PNGs of a few test windows and the learning curve")
    g.add_argument("--plot_windows", type=_positive_int, default=4, help="how many test windows --plot draws")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its <checkpoints>/<setting>/last.pth (same options "
                        "required); without that file, train from the start")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--num_threads", type=_non_negative_int, default=0, help="torch CPU threads (0: torch default)")
    return p


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise SystemExit(f"emamba forecast: config file not found: {path}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"emamba forecast: {path} must hold a mapping of option names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"emamba forecast: unknown option(s) {unknown} in {path}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` defaults applied first; fill the data-dependent defaults."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_config(pre.config, parser))
    args = parser.parse_args(argv)
    if args.data_path is None:
        if args.data == "custom":
            parser.error("--data custom needs --data_path FILE.csv")
        args.data_path = f"{args.data}.csv"
    if args.freq is None:
        args.freq = "t" if args.data.startswith("ETTm") else "h"
    if args.label_len > args.seq_len:
        parser.error(f"--label_len ({args.label_len}) cannot exceed --seq_len ({args.seq_len})")
    if args.linear_epochs and not args.linear_skip:
        parser.error("--linear_epochs fits the linear path first and needs --linear_skip 1")
    if not args.model_id:
        args.model_id = f"{Path(args.data_path).stem}_{args.seq_len}_{args.pred_len}"
    return args


def _resolve_channels(args: argparse.Namespace, num_variables: int) -> None:
    """Set enc_in / dec_in / c_out from the data, or check the explicit values against it."""
    for name in ("enc_in", "dec_in"):
        given = getattr(args, name)
        if given is not None and given != num_variables:
            raise ValueError(
                f"--{name} {given} does not match the data: {args.data_path} with --features {args.features} has "
                f"{num_variables} input variate(s)"
            )
    args.enc_in = args.dec_in = num_variables
    expected = num_variables if args.features == "M" else 1
    if args.c_out is not None and args.c_out != expected:
        raise ValueError(f"--c_out {args.c_out} does not match --features {args.features} (expected {expected})")
    args.c_out = expected


def setting_name(args: argparse.Namespace, ii: int) -> str:
    """TSLib-style run name, unique per configuration and repeat."""
    tokens = f"patch{args.patch_len}s{args.stride}" if args.tokenization == "patch" else "variate"
    return (
        f"{args.task_name}_{args.model_id}_{args.model}_{args.data}_ft{args.features}_sl{args.seq_len}"
        f"_ll{args.label_len}_pl{args.pred_len}_{tokens}_dm{args.d_model}_el{args.e_layers}_df{args.d_ff}"
        f"_ds{args.d_state}_{args.des}_seed{args.seed + ii}"
    )


# --------------------------------------------------------------------------------------------------
# Training utilities.
# --------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def metric(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """TSLib's ``metric``: MAE, MSE, RMSE, MAPE, MSPE over every element (MAPE/MSPE divide by the scaled
    truth, so they blow up near zero; reported for comparability only)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    err = pred - true
    mse = float(np.mean(err**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = err / true
    return {
        "mae": float(np.mean(np.abs(err))),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mape": float(np.mean(np.abs(ratio))),
        "mspe": float(np.mean(ratio**2)),
    }


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace) -> float:
    """TSLib's ``adjust_learning_rate`` (``epoch`` counts from 1), applied before each epoch."""
    base = args.learning_rate
    if args.lradj == "type1":
        lr = base * 0.5 ** (epoch - 1)
    elif args.lradj == "type3":
        lr = base if epoch < 3 else base * 0.9 ** (epoch - 3)
    elif args.lradj == "cosine":
        lr = base / 2 * (1 + math.cos((epoch - 1) / args.train_epochs * math.pi))
    else:
        lr = base
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def append_result(row: dict[str, Any], path: Path) -> None:
    """Append one run: a JSON line, or a CSV row (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
    else:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def load_results(paths: list[Path], des: Optional[str] = None) -> list[dict[str, Any]]:
    """JSON-lines rows written by :func:`append_result`, in file order; ``des`` keeps one tag only.

    The result scripts (``scripts/forecast_*.py``) read these. Raises ``FileNotFoundError`` /
    ``ValueError`` naming the file (and line) that is missing, CSV, or not JSON.
    """
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        if path.suffix.lower() == ".csv":
            raise ValueError(f"{path}: CSV results are for spreadsheets; the scripts read JSON lines "
                             "(--results_file with any other suffix)")
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from None
            if des is None or row.get("des") == des:
                rows.append(row)
    return rows


def latest_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last of ``rows`` per (data, pred_len, seq_len, features, seed), sorted by that key: a rerun
    replaces the earlier row of its seed, as the results table counts them."""
    latest = {(r["data"], r["pred_len"], r["seq_len"], r["features"], r["seed"]): r for r in rows}
    return [latest[key] for key in sorted(latest)]


def _select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def _progress(iterable, **kwargs):
    """tqdm bar on a terminal, nothing in logs (``disable=None``)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)


def _f_dim(args: argparse.Namespace) -> int:
    # MS predicts only the target, which the loader puts last (TSLib's f_dim = -1).
    return -1 if args.features == "MS" else 0


def forward_batch(model: nn.Module, batch, device, linear_only: bool = False) -> torch.Tensor:
    """The model's forecast for one loader batch: TSLib's four tensors, plus the cycle phase when the
    dataset makes one (``--cycle_len``); ``linear_only``: the forecast of the model's linear part alone."""
    batch_x, _, batch_x_mark, batch_y_mark = batch[:4]
    extra = {"cycle_index": batch[4].to(device)} if len(batch) > 4 else {}
    if linear_only:
        extra["linear_only"] = True
    return model(batch_x.float().to(device), batch_x_mark.float().to(device), None,
                 batch_y_mark.float().to(device), **extra)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, args, device, desc: str = "eval",
            linear_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, truths) of every window of ``loader``: (windows, pred_len, c_out) scaled arrays."""
    model.eval()
    preds, trues = [], []
    f_dim = _f_dim(args)
    for batch in _progress(loader, desc=desc):
        out = forward_batch(model, batch, device, linear_only)
        preds.append(out[:, -args.pred_len :, f_dim:].cpu().numpy())
        trues.append(batch[1][:, -args.pred_len :, f_dim:].numpy())
    return np.concatenate(preds), np.concatenate(trues)


def naive_forecast(loader: DataLoader, args) -> tuple[np.ndarray, np.ndarray]:
    """Repeat-last-value baseline: every horizon step equals the last look-back value."""
    preds, trues = [], []
    f_dim = _f_dim(args)
    for batch_x, batch_y, *_ in loader:
        last = batch_x[:, -1:, f_dim:].numpy()
        preds.append(np.repeat(last, args.pred_len, axis=1))
        trues.append(batch_y[:, -args.pred_len :, f_dim:].numpy())
    return np.concatenate(preds), np.concatenate(trues)


#: ``--loss`` -> training loss on the scaled data. Early stopping, checkpoint choice and the reported
#: metrics always use the MSE, so runs trained with different losses are compared on the same number.
#: MAE and Huber weigh the rare large errors less (ETTh2 and ETTm2 have spikes); Huber's delta is 1
#: standard deviation of the scaled series.
LOSSES = {
    "MSE": nn.functional.mse_loss,
    "MAE": nn.functional.l1_loss,
    "Huber": partial(nn.functional.huber_loss, delta=1.0),
}


def frequency_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """FreDF's frequency-domain term (Wang et al., ICLR 2025): the mean absolute difference of the two
    (B, pred_len, C) forecasts' real FFTs along the horizon, unnormalised as in FreDF's code.

    Why: the errors of a direct multi-step forecast are correlated across the horizon, which a per-step MSE
    ignores; the Fourier coefficients are close to uncorrelated, so matching them weighs the forecast's
    shape (its level, trend and cycles) instead of chasing single steps.
    """
    return (torch.fft.rfft(pred, dim=1) - torch.fft.rfft(true, dim=1)).abs().mean()


def horizon_weights(pred_len: int, decay: float) -> torch.Tensor:
    """CARD's signal-decay weights (Wang et al., ICLR 2024) t^(-decay) for horizon steps t = 1..pred_len,
    shaped (1, pred_len, 1) and normalised to mean 1 so that the loss keeps its scale next to the learning
    rate, the weight decay and the ``--freq_loss_weight`` mix.

    Why: the error of step t of a forecast grows with t (its variance grows roughly linearly for a random
    walk), so an unweighted loss is dominated by the far steps, whose errors are mostly unpredictable noise.
    """
    weights = torch.arange(1, pred_len + 1, dtype=torch.float64).pow(-decay)
    return (weights / weights.mean()).view(1, pred_len, 1)


def criterion(pred: torch.Tensor, true: torch.Tensor, loss: str = "MSE", freq_weight: float = 0.0,
              horizon_decay: float = 0.0) -> torch.Tensor:
    """Training loss chosen by ``--loss`` (TSLib default: MSE) over (B, pred_len, C) forecasts, its steps
    weighed by :func:`horizon_weights` if ``horizon_decay``, mixed with ``--freq_loss_weight`` x
    :func:`frequency_loss`. Module-level so that tests can replace it."""
    if horizon_decay:
        weights = horizon_weights(pred.shape[1], horizon_decay).to(pred.device, pred.dtype)
        value = (LOSSES[loss](pred, true, reduction="none") * weights).mean()
    else:  # the plain reduction, so that runs without the option reproduce bit for bit
        value = LOSSES[loss](pred, true)
    if freq_weight:
        value = (1.0 - freq_weight) * value + freq_weight * frequency_loss(pred, true)
    return value


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def weight_average(model: nn.Module, args) -> Optional[nn.Module]:
    """The ``--ema_decay`` average of ``model``'s weights (``None`` when off).

    timm's ModelEmaV3 with its warm-up: after optimizer step k the decay is min(ema_decay, 1 - k^(-2/3)), so
    the average spans roughly the last k^(2/3) steps until that reaches the set decay's horizon. Without it the
    random initial weights would still weigh 0.998^264 = 59% in the average after the first ETTh1 epoch,
    and the forecasters here often peak on validation after one or two epochs.
    """
    if not args.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=args.ema_decay, use_warmup=True)


EPOCH_LOG_FIELDS = ("epoch", "lr", "train_loss", "val_mse", "best_val_mse", "seconds")


def _run_identity(args) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every option of its results row (the seed is
    part of the run's folder name)."""
    return to_plain({name: getattr(args, name) for name in _ROW_ARGS})


def _load_resume_state(path: Path, args) -> dict[str, Any]:
    state = load_checkpoint(path)  # CheckpointError (a RuntimeError) names a missing / corrupt file
    saved = state.get("identity")
    if not isinstance(saved, dict) or "optimizer" not in state:
        raise ValueError(f"{path} is not an emamba forecast training state; delete it to train from the start")
    current = _run_identity(args)
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ValueError(f"--resume: {path} was written by a run with other options ({changes}); "
                         "rerun with the same options, or delete it to train from the start")
    return state


def write_epoch_log(history: list[dict[str, Any]], path: Path) -> None:
    """``epochs.csv``: the whole history, rewritten atomically each epoch (a resumed run keeps the earlier rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(buf.getvalue().encode(), path)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, args, device,
                 desc: str, linear_only: bool = False, on_step=None) -> float:
    """One pass over ``loader`` with the run's training loss (and augmentation); returns the mean loss.
    Raises :class:`NonFiniteLoss` at the first NaN / infinite loss; ``on_step()`` runs after every step."""
    model.train()
    f_dim = _f_dim(args)
    total, count = 0.0, 0
    bar = _progress(loader, desc=desc)
    try:
        for batch in bar:
            batch = augment_batch(batch, args.pred_len, args.aug_method, args.aug_rate)
            target = batch[1][:, -args.pred_len :, f_dim:].float().to(device)
            out = forward_batch(model, batch, device, linear_only)
            loss = criterion(out[:, -args.pred_len :, f_dim:], target, args.loss, args.freq_loss_weight,
                             args.horizon_decay)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"training loss is {loss.item()} at {desc}, batch {count + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
    finally:
        bar.close()
    return total / max(count, 1)


def fit_linear_part(model: nn.Module, loaders: dict[str, DataLoader], args, device) -> dict[str, Any]:
    """Stage 1 of ``--linear_epochs``: train only the model's linear part (``EMambaTS.linear_parameters``:
    the linear path, the cycle, RevIN's affine) on its forecast without the blocks, and leave the model
    holding the linear part's best-on-validation weights.

    Why: on the ETT data a linear forecaster between RevIN and a learned cycle (CycleNet-Linear) is very hard
    to beat, but it needs a high learning rate and many epochs (CycleNet: 0.01, batches of 256, up to 30
    epochs), while the blocks overfit within a few epochs at a tenth of that rate or less. Trained jointly,
    early stopping ends the run long before the linear path has converged. Fitted first, with a recipe of
    its own (Adam without weight decay, TSLib's type3 schedule from ``--linear_lr``, the run's loss and
    augmentation), it gives the second stage a strong forecaster to correct.

    Returns ``linear_val_mse``, ``linear_best_epoch``, ``linear_epochs_run``, ``linear_train_loss`` (of the
    best epoch), ``linear_lr_last`` and ``linear_seconds``.
    """
    start = time.perf_counter()
    inner = model.model if isinstance(model, Model) else model
    params = inner.linear_parameters()
    stage_args = argparse.Namespace(**{**vars(args), "batch_size": args.linear_batch_size})
    _, train_loader = data_provider(stage_args, "train")
    optimizer = torch.optim.Adam(params, lr=args.linear_lr)
    stage_args.learning_rate, stage_args.lradj = args.linear_lr, "type3"
    best, best_epoch, bad_epochs, best_loss, lr = math.inf, 0, 0, math.nan, args.linear_lr
    best_state = [p.detach().clone() for p in params]
    epoch = 0
    for epoch in range(1, args.linear_epochs + 1):
        lr = adjust_learning_rate(optimizer, epoch, stage_args)
        train_loss = _train_epoch(model, train_loader, optimizer, args, device,
                                  desc=f"linear stage epoch {epoch}/{args.linear_epochs}", linear_only=True)
        val_loss = metric(*predict(model, loaders["val"], args, device, desc="val", linear_only=True))["mse"]
        improved = val_loss < best
        print(f"linear {epoch:>3} | lr {lr:.2e} | train {train_loss:.4f} | val {val_loss:.4f}{' *' if improved else ''}",
              flush=True)
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(f"validation loss is {val_loss} at linear stage epoch {epoch}")
        if improved:
            best, best_epoch, bad_epochs, best_loss = val_loss, epoch, 0, train_loss
            best_state = [p.detach().clone() for p in params]
        else:
            bad_epochs += 1
            if bad_epochs >= args.linear_patience:
                break
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    return {"linear_val_mse": best, "linear_best_epoch": best_epoch, "linear_epochs_run": epoch,
            "linear_train_loss": best_loss, "linear_lr_last": lr, "linear_seconds": time.perf_counter() - start}


def train(model: nn.Module, loaders: dict[str, DataLoader], args, device, ckpt_path: Path,
          resume: bool = False) -> dict[str, Any]:
    """Train with early stopping on the validation MSE; the best weights are saved to ``ckpt_path``.

    With ``--ema_decay`` the weight average is what is validated and saved (the raw weights only train).
    After every epoch the full training state goes to ``last.pth`` beside ``ckpt_path`` (and the history to
    ``epochs.csv``); ``resume`` continues from that state, restoring the random generators too, so the
    remaining epochs draw the same shuffles and dropout masks as an uninterrupted run. ``last.pth`` is
    deleted once training ends.
    Returns a dict with best_val_loss, best_epoch, epochs, sec_per_epoch, history and, if the loss stopped
    being finite, ``stopped='nan_loss'`` (training ends there; the last good checkpoint is kept).
    """
    step = 0
    best, best_epoch, bad_epochs, epoch_times = math.inf, None, 0, []
    history: list[dict[str, Any]] = []
    stopped = "max_epochs"
    state_path, log_path = ckpt_path.with_name("last.pth"), ckpt_path.with_name("epochs.csv")
    first_epoch = 1
    state = None
    if resume and state_path.exists():
        state = _load_resume_state(state_path, args)
    elif resume:
        print(f"--resume: no {state_path} (no interrupted run), training from the start", flush=True)
    linear_info: dict[str, Any] = {}
    if args.linear_epochs and state is None:
        try:
            linear_info = fit_linear_part(model, loaders, args, device)
        except NonFiniteLoss as exc:
            print(f"emamba forecast: {exc} in the linear stage; stopping. Try a lower --linear_lr.", file=sys.stderr)
            return {"best_val_loss": None, "best_epoch": None, "epochs": 0, "sec_per_epoch": None,
                    "stopped": "nan_loss", "history": []}
        (model.model if isinstance(model, Model) else model).zero_head()
        atomic_save({"model": model.state_dict(), "args": vars(args), **linear_info}, ckpt_path.with_name("linear.pth"))
    # built after the linear stage, so that the weight average starts from its forecaster
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = weight_average(model, args)
    evaluated = model if ema is None else ema.module
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        step, best, best_epoch, bad_epochs = state["step"], state["best"], state["best_epoch"], state["bad_epochs"]
        epoch_times, history = list(state["epoch_times"]), list(state["history"])
        linear_info = dict(state.get("linear_info") or {})
        set_rng_state(state["rng"])
        first_epoch = state["epoch"] + 1
        print(f"resuming from {state_path} after epoch {state['epoch']}", flush=True)
    elif linear_info:
        # epoch 0 of the second stage: the linear forecaster (head zeroed), kept unless an epoch beats it
        best, best_epoch = linear_info["linear_val_mse"], 0
        atomic_save({"model": evaluated.state_dict(), "args": vars(args), "epoch": 0, "val_loss": best}, ckpt_path)
        history.append({"epoch": 0, "lr": linear_info["linear_lr_last"], "train_loss": linear_info["linear_train_loss"],
                        "val_mse": best, "best_val_mse": best, "seconds": linear_info["linear_seconds"]})
        write_epoch_log(history, log_path)

    def after_step() -> None:
        nonlocal step
        step += 1
        if ema is not None:
            ema.update(model, step=step)

    for epoch in range(first_epoch, args.train_epochs + 1):
        lr = adjust_learning_rate(optimizer, epoch, args)
        start = time.perf_counter()
        try:
            train_loss = _train_epoch(model, loaders["train"], optimizer, args, device,
                                      desc=f"epoch {epoch}/{args.train_epochs}", on_step=after_step)
        except NonFiniteLoss as exc:
            print(
                f"emamba forecast: {exc}; stopping. The last good checkpoint ({ckpt_path}) is kept. "
                "Try a lower --learning_rate.",
                file=sys.stderr,
            )
            stopped = "nan_loss"
            break
        epoch_times.append(time.perf_counter() - start)
        pred, true = predict(evaluated, loaders["val"], args, device, desc="val")
        val_loss = metric(pred, true)["mse"]
        improved = val_loss < best
        print(
            f"epoch {epoch:>3} | lr {lr:.2e} | train {train_loss:.4f} | val {val_loss:.4f}"
            f"{' *' if improved else ''} | {epoch_times[-1]:.1f}s",
            flush=True,
        )
        if not math.isfinite(val_loss):
            print(f"emamba forecast: validation loss is {val_loss} at epoch {epoch}; stopping.", file=sys.stderr)
            stopped = "nan_loss"
            break
        if improved:
            best, best_epoch, bad_epochs = val_loss, epoch, 0
            checkpoint = {"model": evaluated.state_dict(), "args": vars(args), "epoch": epoch, "val_loss": val_loss}
            atomic_save(checkpoint, ckpt_path)
        else:
            bad_epochs += 1
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_mse": val_loss,
                        "best_val_mse": best, "seconds": epoch_times[-1]})
        write_epoch_log(history, log_path)
        if bad_epochs >= args.patience:
            stopped = "early_stopping"
            break
        atomic_save({
            "identity": _run_identity(args), "epoch": epoch, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "ema": None if ema is None else ema.module.state_dict(),
            "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "epoch_times": epoch_times,
            "history": history, "linear_info": linear_info, "rng": get_rng_state(),
        }, state_path)
    state_path.unlink(missing_ok=True)  # training is over: nothing left to resume
    return {
        "best_val_loss": best if best_epoch is not None else None,
        "best_epoch": best_epoch,
        "epochs": len(epoch_times),
        "sec_per_epoch": float(np.mean(epoch_times)) if epoch_times else None,
        "stopped": stopped,
        "history": history,
        **linear_info,
    }


def plot_learning_curve(history: list[dict[str, Any]], args, out_dir: Path) -> str:
    """``learning_curve.png``: training loss and validation MSE per epoch, the kept (best) epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label=f"train ({args.loss} training loss)")
    ax.plot(epochs, [h["val_mse"] for h in history], "o-", label="validation MSE")
    best = min(history, key=lambda h: h["val_mse"])
    ax.axvline(best["epoch"], color="grey", ls=":", lw=0.8, label=f"kept: epoch {best['epoch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (scaled data)")
    ax.set_title(f"{args.data} {args.seq_len}->{args.pred_len}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "learning_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_windows(model_pred: np.ndarray, true: np.ndarray, dataset: TimeSeriesDataset, args, out_dir: Path) -> list[str]:
    """Save look-back + truth vs forecast of the last variate for ``--plot_windows`` evenly spaced windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    count = min(args.plot_windows, len(model_pred))
    paths = []
    for index in np.linspace(0, len(model_pred) - 1, count).round().astype(int):
        history = dataset[int(index)][0][:, -1]
        fig, ax = plt.subplots(figsize=(8, 3))
        steps = np.arange(len(history) + args.pred_len)
        ax.plot(steps, np.concatenate([history, true[index, :, -1]]), label="ground truth", lw=1.2)
        ax.plot(steps[len(history) :], model_pred[index, :, -1], label="EMamba-TS", lw=1.2)
        ax.axvline(len(history) - 0.5, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{args.data} {dataset.columns[-1]} (scaled), test window {index}")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"test_window_{index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------------------
# One run and the entry point.
# --------------------------------------------------------------------------------------------------

_ROW_ARGS = (
    "model_id", "model", "data", "data_path", "features", "target", "seq_len", "label_len", "pred_len",
    "enc_in", "c_out", "tokenization", "patch_len", "stride", "d_model", "e_layers", "d_ff", "d_state", "d_conv",
    "bidirectional", "einfft_blocks", "dropout", "head_dropout", "revin", "affine", "subtract_last", "cycle_len",
    "linear_skip", "time_tokens", "decomp_kernel", "batch_size", "linear_epochs", "linear_lr", "linear_batch_size",
    "linear_patience",
    "learning_rate", "lradj", "train_epochs", "patience", "weight_decay", "ema_decay", "loss", "freq_loss_weight",
    "horizon_decay", "aug_method", "aug_rate", "des",
)


def args_from_row(row: dict[str, Any], root_path: Optional[str] = None) -> argparse.Namespace:
    """The arguments of the run that wrote results ``row`` (its model, data and training options), to
    rebuild its model and data for re-scoring its checkpoint; ``root_path`` names the data folder, which
    rows do not record."""
    argv = ["--data", row["data"], "--data_path", row["data_path"]]
    if root_path:
        argv += ["--root_path", root_path]
    args = parse_args(argv)
    for name in _ROW_ARGS:
        if name in row:
            setattr(args, name, row[name])
    return args


def load_run_checkpoint(model: nn.Module, path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a run's ``checkpoint.pth`` into ``model`` and return it (``val_loss``, ``epoch``, ``args``).

    Raises :class:`CheckpointError` naming the file when it is corrupt, or when the options that built
    ``model`` differ from the run's in a way its folder name does not show (e.g. ``--linear_skip``,
    ``--d_conv``), listing the missing / unexpected keys or the mismatched shapes.
    """
    state = load_checkpoint(path, map_location=device)
    load_model_weights(model, state, path, target="the EMamba-TS these options build")
    return state


def run_once(args: argparse.Namespace, ii: int, device: torch.device) -> dict[str, Any]:
    run_start = time.perf_counter()
    seed = args.seed + ii
    set_seed(seed)
    setting = setting_name(args, ii)
    loaders, datasets = {}, {}
    for flag in ("train", "val", "test"):
        datasets[flag], loaders[flag] = data_provider(args, flag)
    _resolve_channels(args, datasets["train"].num_variables)
    model = Model(args).to(device)
    params = sum(p.numel() for p in model.parameters())
    ckpt_path = Path(args.checkpoints) / setting / "checkpoint.pth"
    print(f">>> {setting} | {params:,} parameters | train/val/test windows "
          f"{len(datasets['train'])}/{len(datasets['val'])}/{len(datasets['test'])} | {device}", flush=True)

    info: dict[str, Any] = {"stopped": "test_only"}
    if args.is_training:
        info = train(model, loaders, args, device, ckpt_path, resume=args.resume)
    history = info.pop("history", None)  # for epochs.csv and the learning curve, not the results row
    if args.is_training and info["best_epoch"] is None:  # never test a stale checkpoint of an earlier run
        raise RuntimeError("training produced no finite validation loss, so there is no checkpoint to test")
    if not ckpt_path.exists():
        raise RuntimeError(f"no checkpoint at {ckpt_path}: train it first (--is_training 1)")
    state = load_run_checkpoint(model, ckpt_path, device)

    pred, true = predict(model, loaders["test"], args, device, desc="test")
    row: dict[str, Any] = {"setting": setting, "seed": seed, "itr": ii}
    row.update({name: getattr(args, name) for name in _ROW_ARGS})
    row.update(metric(pred, true))
    row["test_windows"] = int(len(pred))
    naive_test = metric(*naive_forecast(loaders["test"], args))
    naive_val = metric(*naive_forecast(loaders["val"], args))
    row.update({"naive_mse": naive_test["mse"], "naive_mae": naive_test["mae"],
                "naive_val_mse": naive_val["mse"], "naive_val_mae": naive_val["mae"]})
    row.update(info)
    linear_path = ckpt_path.with_name("linear.pth")
    if args.is_training and args.linear_epochs and linear_path.exists():
        # diagnostic only (nothing is chosen on it): what the first stage's linear forecaster scores on test
        load_run_checkpoint(model, linear_path, device)
        linear_test = metric(*predict(model, loaders["test"], args, device, desc="test (linear)", linear_only=True))
        row.update({"linear_mse": linear_test["mse"], "linear_mae": linear_test["mae"]})
    if info["stopped"] == "test_only":
        row["best_val_loss"] = state.get("val_loss")
    row.update({"params": params, "run_seconds": time.perf_counter() - run_start, "device": str(device),
                "checkpoint": str(ckpt_path), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if history:
        row["epoch_log"] = str(ckpt_path.with_name("epochs.csv"))
    if args.plot:
        row["plots"] = plot_windows(pred, true, datasets["test"], args, ckpt_path.parent / "plots")
        if history:
            row["plots"].append(plot_learning_curve(history, args, ckpt_path.parent / "plots"))
    append_result(row, Path(args.results_file))
    return row


def _summary(rows: list[dict[str, Any]]) -> str:
    head = f"{'setting':<40} {'seed':>5} {'mse':>7} {'mae':>7} {'naive mse':>9} {'val':>7} {'ep':>3} {'s/ep':>6} {'run s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        val = r.get("best_val_loss")
        spe = r.get("sec_per_epoch")
        lines.append(
            f"{r['model_id'][:40]:<40} {r['seed']:>5} {r['mse']:>7.4f} {r['mae']:>7.4f} {r['naive_mse']:>9.4f} "
            f"{(f'{val:.4f}' if val is not None else '-'):>7} {r.get('epochs', 0):>3} "
            f"{(f'{spe:.1f}' if spe else '-'):>6} {r['run_seconds']:>6.0f}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        device = _select_device(args.device)
        rows = [run_once(args, ii, device) for ii in range(args.itr)]
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"emamba forecast: error: {exc}", file=sys.stderr)
        return 1
    print(_summary(rows))
    summary = {key: float(np.mean([r[key] for r in rows])) for key in METRICS + ("naive_mse", "naive_mae")}
    summary.update({
        "data": args.data, "features": args.features, "seq_len": args.seq_len, "pred_len": args.pred_len,
        "seeds": [r["seed"] for r in rows], "results_file": args.results_file,
        "sec_per_epoch": [r.get("sec_per_epoch") for r in rows], "run_seconds": [r["run_seconds"] for r in rows],
    })
    if args.itr > 1:
        summary["runs"] = [{key: r[key] for key in ("seed",) + METRICS} for r in rows]
    failed = any(r.get("stopped") == "nan_loss" for r in rows)
    if failed:
        summary["stopped"] = "nan_loss"
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
