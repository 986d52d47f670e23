"""``emamba forecast``: argument parsing, short training runs, custom CSV files and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from emamba.cli import main as cli_main
from emamba.engine import forecast

from engine_helpers import FORECAST_TINY as TINY, write_custom_csv

ETT_DIR = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ETT-small").resolve()


def _out(tmp_path: Path) -> list[str]:
    return ["--checkpoints", str(tmp_path / "ckpt"), "--results_file", str(tmp_path / "results.jsonl")]


def _last_row(tmp_path: Path) -> dict:
    """The last row that a run with ``_out(tmp_path)`` appended to its results file."""
    return json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])


def _short_custom_run(tmp_path: Path, *options: str) -> list[str]:
    """Arguments of a one-epoch run on a fresh custom CSV: 6 training batches of 64 windows per epoch.
    ``options`` come last, so they override (e.g. ``--train_epochs 3``)."""
    write_custom_csv(tmp_path / "OTHER.csv")
    return ["--data", "custom", "--root_path", str(tmp_path), "--data_path", "OTHER.csv", "--seq_len", "48",
            "--label_len", "24", "--pred_len", "24", "--batch_size", "64", "--train_epochs", "1", *TINY,
            *_out(tmp_path), *options]


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_parse_defaults_and_tslib_names():
    args = forecast.parse_args([])
    assert (args.data, args.data_path, args.root_path, args.freq, args.features) == ("ETTh1", "ETTh1.csv", None, "h", "M")
    assert (args.seq_len, args.label_len, args.pred_len) == (96, 48, 96)
    args = forecast.parse_args([
        "--task_name", "long_term_forecast", "--is_training", "1", "--model_id", "x", "--model", "EMamba",
        "--data", "ETTm2", "--root_path", "d", "--features", "MS", "--target", "OT", "--seq_len", "96",
        "--label_len", "48", "--pred_len", "720", "--enc_in", "7", "--dec_in", "7", "--c_out", "1",
        "--e_layers", "3", "--d_model", "16", "--d_ff", "32", "--dropout", "0.2", "--batch_size", "16",
        "--learning_rate", "0.0005", "--train_epochs", "2", "--patience", "1", "--itr", "2", "--des", "Exp",
        "--seed", "7", "--num_workers", "0", "--checkpoints", "c", "--lradj", "cosine", "--patch_len", "8",
        "--stride", "4", "--d_state", "8", "--revin", "0", "--affine", "0", "--subtract_last", "1",
    ])
    assert args.data_path == "ETTm2.csv" and args.freq == "t" and args.revin == 0 and args.itr == 2
    assert (args.affine, args.subtract_last) == (0, 1)
    for bad in (["--data", "custom"], ["--features", "X"], ["--revin", "maybe"], ["--label_len", "200"],
                ["--pred_len", "0"], ["--dropout", "1.5"], ["--model", "Informer"], ["--no_such_option"],
                ["--loss", "SMAPE"], ["--ema_decay", "1"], ["--ema_decay", "-0.1"], ["--freq_loss_weight", "1.5"],
                ["--freq_loss_weight", "-0.1"], ["--aug_method", "jitter"], ["--aug_rate", "2"],
                ["--horizon_decay", "-0.5"], ["--horizon_decay", "nan"], ["--decomp_kernel", "-1"],
                ["--linear_epochs", "5"], ["--linear_epochs", "-1", "--linear_skip", "1"],
                ["--linear_batch_size", "0"], ["--linear_patience", "0"]):
        with pytest.raises(SystemExit):
            forecast.parse_args(bad)


def test_config_file_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("d_model: 16\npatch_len: 8\nlearning_rate: 0.01\n")
    args = forecast.parse_args(["--config", str(cfg), "--patch_len", "24"])
    assert (args.d_model, args.patch_len, args.learning_rate) == (16, 24, 0.01)
    cfg.write_text("d_modle: 16\n")
    with pytest.raises(SystemExit, match="d_modle"):
        forecast.parse_args(["--config", str(cfg)])


COMMITTED_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "forecast").glob("*.yaml"))


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda p: p.stem)
def test_committed_forecast_configs_parse(path):
    """configs/forecast/DATA_HORIZON.yaml: known option names only, and not tied to a dataset or horizon
    (scripts/forecast_all.sh passes those on the command line, matching the file name)."""
    data, horizon = path.stem.split("_")
    values = forecast._load_config(str(path), forecast.build_parser())
    assert values and not {"data", "data_path", "pred_len", "seed"} & set(values)
    args = forecast.parse_args(["--config", str(path), "--data", data, "--pred_len", horizon])
    for key, value in values.items():
        assert getattr(args, key) == value


def test_metric_matches_tslib_definitions():
    pred, true = np.array([[1.0, 2.0]]), np.array([[2.0, 4.0]])
    m = forecast.metric(pred, true)
    assert m["mae"] == 1.5 and m["mse"] == 2.5 and m["rmse"] == pytest.approx(2.5**0.5)
    assert m["mape"] == pytest.approx(0.5) and m["mspe"] == pytest.approx(0.25)


def test_short_etth1_run_beats_naive_on_validation(tmp_path, capsys):
    """One epoch of a tiny model on ETTh1's target (S, horizon 24) beats repeat-last-value on val and test."""
    root = ["--root_path", str(ETT_DIR)] if (ETT_DIR / "ETTh1.csv").is_file() else []  # else the bundled copy
    rc = cli_main(["forecast", "--data", "ETTh1", *root, "--features", "S", "--pred_len", "24", "--train_epochs", "1",
                   "--batch_size", "128", "--learning_rate", "0.01", "--stride", "16", "--plot", "--plot_windows", "2",
                   *TINY, *_out(tmp_path)])
    assert rc == 0
    summary = _last_json(capsys)
    assert {"mse", "mae", "rmse", "mape", "mspe", "naive_mse"} <= set(summary)
    row = _last_row(tmp_path)
    assert row["test_windows"] == 2857  # 2880 test rows + 96 look-back - 96 - 24 + 1: nothing dropped
    assert row["best_val_loss"] < row["naive_val_mse"]
    assert summary["mse"] < summary["naive_mse"]
    assert Path(row["checkpoint"]).is_file() and len(row["plots"]) == 2 + 1  # 2 windows + the learning curve
    assert all(Path(p).stat().st_size > 0 for p in row["plots"]) and row["plots"][-1].endswith("learning_curve.png")
    with open(row["epoch_log"]) as fh:
        log = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in log] == [1] and float(log[0]["val_mse"]) == pytest.approx(row["best_val_loss"])
    assert not Path(row["checkpoint"]).with_name("last.pth").exists()  # training over: no state left to resume


@pytest.mark.parametrize("cycle_len, linear_skip", [(0, 0), (24, 0), (0, 1)])
def test_custom_csv_ms_and_reload(tmp_path, capsys, cycle_len, linear_skip):
    write_custom_csv(tmp_path / "OTHER.csv")
    common = ["--data", "custom", "--root_path", str(tmp_path), "--data_path", "OTHER.csv", "--features", "MS",
              "--seq_len", "48", "--label_len", "24", "--pred_len", "24", "--train_epochs", "2", *TINY,
              "--cycle_len", str(cycle_len), "--linear_skip", str(linear_skip),
              "--checkpoints", str(tmp_path / "ckpt"), "--results_file", str(tmp_path / "results.csv")]
    assert forecast.main(common) == 0
    first = _last_json(capsys)
    assert first["mse"] < first["naive_mse"]
    assert forecast.main(common + ["--is_training", "0"]) == 0  # test-only reloads the checkpoint
    again = _last_json(capsys)
    assert again["mse"] == pytest.approx(first["mse"], rel=1e-6)
    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 2 and set(table["c_out"]) == {1} and set(table["enc_in"]) == {3}
    assert set(table["cycle_len"]) == {cycle_len} and set(table["linear_skip"]) == {linear_skip}
    saved = torch.load(next((tmp_path / "ckpt").rglob("*.pth")), weights_only=False)["model"]
    assert ("model.cycle" in saved) == bool(cycle_len)  # the learned cycle is saved with the weights
    assert ("model.skip.weight" in saved) == bool(linear_skip)


def test_bad_inputs(tmp_path, capsys):
    assert forecast.main(["--data", "custom", "--root_path", str(tmp_path), "--data_path", "missing.csv",
                          *_out(tmp_path)]) == 1
    assert "missing.csv" in capsys.readouterr().err
    write_custom_csv(tmp_path / "OTHER.csv")
    base = ["--data", "custom", "--root_path", str(tmp_path), "--data_path", "OTHER.csv", "--seq_len", "48",
            "--label_len", "24", "--pred_len", "24", *TINY, *_out(tmp_path)]
    assert forecast.main(base + ["--features", "S", "--target", "price"]) == 1
    assert "'price' not found" in capsys.readouterr().err
    assert forecast.main(base + ["--enc_in", "7"]) == 1
    assert "--enc_in 7 does not match" in capsys.readouterr().err
    assert forecast.main(base + ["--is_training", "0", "--model_id", "never_trained"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("loss, reference", [("MSE", "mse_loss"), ("MAE", "l1_loss"), ("Huber", "huber_loss")])
def test_loss_option_sets_the_training_loss_only(tmp_path, monkeypatch, loss, reference):
    """--loss picks the training loss, called once per training batch and never for validation or test."""
    import torch.nn.functional as F

    assert forecast.parse_args([]).loss == "MSE"
    seen = []
    real = forecast.LOSSES[loss]

    def spy(pred, true):
        value = real(pred, true)
        assert torch.allclose(value, getattr(F, reference)(pred, true))
        seen.append(value.item())
        return value

    monkeypatch.setitem(forecast.LOSSES, loss, spy)
    assert forecast.main(_short_custom_run(tmp_path, "--loss", loss)) == 0
    assert len(seen) == 6  # one call per training batch: validation and test never use the training loss
    row = _last_row(tmp_path)
    assert row["loss"] == loss and np.isfinite(row["best_val_loss"])


def test_frequency_loss_is_the_mean_absolute_spectrum_difference():
    """FreDF's term against an explicit DFT over the horizon (dim 1), and its mix with the --loss."""
    torch.manual_seed(0)
    pred, true = torch.randn(3, 10, 2, dtype=torch.float64), torch.randn(3, 10, 2, dtype=torch.float64)
    steps = np.arange(10)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(6), steps) / 10)  # the 6 = 10 // 2 + 1 one-sided frequencies
    spectrum = np.einsum("kt,btc->bkc", dft, (pred - true).numpy())
    expected = np.abs(spectrum).mean()
    assert forecast.frequency_loss(pred, true).item() == pytest.approx(expected, rel=1e-12)
    mse = torch.nn.functional.mse_loss(pred, true).item()
    assert forecast.criterion(pred, true).item() == pytest.approx(mse, rel=1e-12)
    assert forecast.criterion(pred, true, "MSE", 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert forecast.criterion(pred, true, "MSE", 0.25).item() == pytest.approx(0.75 * mse + 0.25 * expected, rel=1e-12)
    mae = torch.nn.functional.l1_loss(pred, true).item()
    assert forecast.criterion(pred, true, "MAE", 0.5).item() == pytest.approx(0.5 * mae + 0.5 * expected, rel=1e-12)
    # A forecast that is right up to a constant offset is penalised at frequency 0 only.
    assert forecast.frequency_loss(true + 1.0, true).item() == pytest.approx(10 / 6, rel=1e-12)


def test_freq_loss_weight_reaches_training_and_the_results_row(tmp_path, monkeypatch):
    """--freq_loss_weight is passed to every training loss call and recorded; validation stays MSE."""
    assert forecast.parse_args([]).freq_loss_weight == 0.0
    seen = []
    real = forecast.criterion

    def spy(pred, true, loss="MSE", freq_weight=0.0, horizon_decay=0.0):
        seen.append((loss, freq_weight, horizon_decay))
        return real(pred, true, loss, freq_weight, horizon_decay)

    monkeypatch.setattr(forecast, "criterion", spy)
    assert forecast.main(_short_custom_run(tmp_path, "--freq_loss_weight", "0.8", "--horizon_decay", "0.5")) == 0
    assert seen == [("MSE", 0.8, 0.5)] * 6  # one call per training batch
    row = _last_row(tmp_path)
    assert row["freq_loss_weight"] == 0.8 and row["horizon_decay"] == 0.5 and np.isfinite(row["best_val_loss"])


@pytest.mark.parametrize("loss", ["MSE", "MAE", "Huber"])
def test_horizon_decay_weighs_step_t_by_t_to_the_minus_decay(loss):
    """CARD's signal-decay loss: step t's elementwise loss times t^-a / mean(t^-a); 0 is the plain loss."""
    torch.manual_seed(0)
    pred, true = torch.randn(3, 8, 2, dtype=torch.float64), 2 * torch.randn(3, 8, 2, dtype=torch.float64)
    weights = np.arange(1, 9) ** -0.5
    weights /= weights.mean()
    elementwise = forecast.LOSSES[loss](pred, true, reduction="none").numpy()
    expected = (elementwise * weights[None, :, None]).mean()
    assert forecast.criterion(pred, true, loss, 0.0, 0.5).item() == pytest.approx(expected, rel=1e-12)
    assert forecast.criterion(pred, true, loss, 0.0, 0.0).item() == forecast.LOSSES[loss](pred, true).item()
    assert forecast.horizon_weights(8, 0.5).mean().item() == pytest.approx(1.0, rel=1e-12)
    # The step weights fall with t, and only the time-domain term is weighed.
    assert (forecast.horizon_weights(8, 0.5).diff(dim=1) < 0).all()
    spectrum = forecast.frequency_loss(pred, true).item()
    mixed = forecast.criterion(pred, true, loss, 0.5, 0.5).item()
    assert mixed == pytest.approx(0.5 * expected + 0.5 * spectrum, rel=1e-12)


@pytest.mark.parametrize("method", ["freq_mask", "freq_mix"])
def test_aug_method_doubles_training_batches_only(tmp_path, monkeypatch, method):
    """--aug_method trains on each batch plus its augmented copy; validation and test see the data as is."""
    sizes = []
    real = forecast.criterion

    def spy(pred, true, *options):
        sizes.append(pred.shape[0])
        return real(pred, true, *options)

    monkeypatch.setattr(forecast, "criterion", spy)
    assert forecast.main(_short_custom_run(tmp_path, "--aug_method", method, "--aug_rate", "0.3")) == 0
    assert len(sizes) == 6 and sizes[0] == 128 and all(size % 2 == 0 for size in sizes)
    row = _last_row(tmp_path)
    assert (row["aug_method"], row["aug_rate"]) == (method, 0.3) and row["test_windows"] > 0


def test_weight_average_warm_up():
    """--ema_decay's average copies the weights at step 1, then decays by min(ema_decay, 1 - k^(-2/3))."""
    args = forecast.parse_args(["--ema_decay", "0.9"])
    model = torch.nn.Linear(2, 1)
    ema = forecast.weight_average(model, args)
    assert forecast.weight_average(model, forecast.parse_args([])) is None
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=2)
    decay = 1 - 2 ** (-2 / 3)  # 0.37 < 0.9
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, decay * 1 + (1 - decay) * 3))
    for step in range(3, 200):
        ema.update(model, step=step)  # the decay reaches 0.9 from step 32 on
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model, step=200)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * 5.0)


def test_ema_run_validates_saves_and_tests_the_average(tmp_path, capsys, monkeypatch):
    """With --ema_decay the average is updated once per training step, validated, checkpointed and tested."""
    made = []
    real = forecast.weight_average

    def spy(model, args):
        ema = real(model, args)
        steps, raw = [], {}

        def update(m, step):
            steps.append(step)
            raw.update({k: v.clone() for k, v in m.state_dict().items()})  # the trained weights, last step
            real_update(m, step=step)

        real_update, ema.update = ema.update, update
        made.append((ema, steps, raw))
        return ema

    monkeypatch.setattr(forecast, "weight_average", spy)
    common = _short_custom_run(tmp_path, "--ema_decay", "0.99")
    assert forecast.main(common) == 0
    first = _last_json(capsys)
    (ema, steps, raw), = made
    assert steps == list(range(1, 7))  # 6 training batches
    row = _last_row(tmp_path)
    assert row["ema_decay"] == 0.99 and row["best_epoch"] == 1
    saved = torch.load(row["checkpoint"], weights_only=False)["model"]
    for name, value in ema.module.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[name], value) for name, value in raw.items())  # not the raw weights
    assert forecast.main(common + ["--is_training", "0"]) == 0  # test-only reloads the averaged weights
    assert _last_json(capsys)["mse"] == pytest.approx(first["mse"], rel=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real = forecast.criterion
    calls = {"n": 0}

    def flaky(pred, true, *options):
        calls["n"] += 1
        loss = real(pred, true, *options)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(forecast, "criterion", flaky)
    args = _short_custom_run(tmp_path, "--train_epochs", "3")
    assert forecast.main(args) == 1  # 6 batches per epoch: epoch 1 is fine, epoch 2 hits NaN
    captured = capsys.readouterr()
    assert "stopping" in captured.err and "checkpoint" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["stopped"] == "nan_loss" and np.isfinite(summary["mse"])
    # NaN from the first batch: no good checkpoint of this run, so the old one is not tested either
    calls["n"] = 100
    assert forecast.main(args) == 1
    assert "no finite validation loss" in capsys.readouterr().err


class _Killed(Exception):
    """Stands for the process being killed (not caught by the CLI, like KeyboardInterrupt)."""


def _kill_at_epoch(monkeypatch, epoch: int) -> None:
    """Make training die as epoch ``epoch`` starts, i.e. after epoch - 1 finished and saved its state."""
    real = forecast.adjust_learning_rate

    def adjust(optimizer, e, args):
        if e == epoch:
            raise _Killed
        return real(optimizer, e, args)

    monkeypatch.setattr(forecast, "adjust_learning_rate", adjust)


def _run_folder(tmp_path: Path) -> Path:
    (folder,) = (tmp_path / "ckpt").iterdir()
    return folder


# A short first stage (--linear_epochs); 2 epochs, so that _kill_at_epoch(m, 3) hits the second stage,
# whose schedule calls the same function.
LINEAR_STAGE = ["--linear_skip", "1", "--linear_epochs", "2", "--linear_batch_size", "64", "--linear_patience", "2"]


@pytest.mark.parametrize("extra", [[], ["--ema_decay", "0.9", "--dropout", "0.3", "--aug_method", "freq_mix"],
                                   LINEAR_STAGE + ["--ema_decay", "0.9"]])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, extra):
    """Killed after epoch 2 of 4, then --resume: the same validation history and the same test metrics, bit
    for bit, as a run never interrupted (the state restores optimizer, weight average and random generators;
    dropout and augmentation make the generators matter; with --linear_epochs the first stage is not rerun)."""
    options = ["--train_epochs", "4", "--patience", "10", "--lradj", "type3", *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert forecast.main(_short_custom_run(straight, *options)) == 0
    expected = _last_row(straight)

    with monkeypatch.context() as m:
        _kill_at_epoch(m, 3)
        with pytest.raises(_Killed):
            forecast.main(_short_custom_run(killed, *options))
    folder = _run_folder(killed)
    assert (folder / "last.pth").exists()
    first = 0 if "--linear_epochs" in extra else 1  # epoch 0: the linear stage's forecaster
    assert [int(r["epoch"]) for r in csv.DictReader(open(folder / "epochs.csv"))] == list(range(first, 3))
    real_stage = forecast.fit_linear_part
    with monkeypatch.context() as m:
        m.setattr(forecast, "fit_linear_part", lambda *a: pytest.fail("the linear stage ran again on resume"))
        assert forecast.main(_short_custom_run(killed, *options, "--resume")) == 0
    assert forecast.fit_linear_part is real_stage
    row = _last_row(killed)
    keys = ("mse", "mae", "best_val_loss", "best_epoch", "epochs", "stopped")
    if first == 0:
        keys += ("linear_val_mse", "linear_best_epoch", "linear_epochs_run", "linear_mse", "linear_mae")
    for key in keys:
        assert row[key] == expected[key], key
    assert not (folder / "last.pth").exists()
    resumed_log = list(csv.DictReader(open(folder / "epochs.csv")))
    straight_log = list(csv.DictReader(open(_run_folder(straight) / "epochs.csv")))
    assert [r["val_mse"] for r in resumed_log] == [r["val_mse"] for r in straight_log]
    assert len(resumed_log) == 5 - first


def test_resume_refuses_other_options_and_bad_state_files(tmp_path, monkeypatch, capsys):
    options = ["--train_epochs", "3", "--patience", "10"]
    with monkeypatch.context() as m:
        _kill_at_epoch(m, 2)
        with pytest.raises(_Killed):
            forecast.main(_short_custom_run(tmp_path, *options))
    state = _run_folder(tmp_path) / "last.pth"
    assert forecast.main(_short_custom_run(tmp_path, *options, "--learning_rate", "0.01", "--resume")) == 1
    err = capsys.readouterr().err
    assert "other options" in err and "learning_rate: 0.001 -> 0.01" in err and state.exists()  # nothing lost
    state.write_bytes(b"not a checkpoint")
    assert forecast.main(_short_custom_run(tmp_path, *options, "--resume")) == 1
    assert f"checkpoint {state} is corrupt" in capsys.readouterr().err


def test_resume_without_a_state_trains_from_the_start(tmp_path, capsys):
    assert forecast.main(_short_custom_run(tmp_path, "--resume")) == 0
    assert "no interrupted run" in capsys.readouterr().out
    assert np.isfinite(_last_row(tmp_path)["mse"])


def test_load_results_reads_json_lines_and_names_bad_files(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text('{"des": "table", "mse": 1}\n\n{"des": "vs_x", "mse": 2}\n')
    assert [r["mse"] for r in forecast.load_results([good])] == [1, 2]
    assert forecast.load_results([good], des="table") == [{"des": "table", "mse": 1}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"des": "table"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        forecast.load_results([good, bad])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        forecast.load_results([tmp_path / "missing.jsonl"])
    (tmp_path / "r.csv").write_text("des,mse\ntable,1\n")
    with pytest.raises(ValueError, match="r.csv: CSV results"):
        forecast.load_results([tmp_path / "r.csv"])


def test_time_tokens_train_on_the_loader_calendar_features(tmp_path, capsys):
    """--time_tokens 1 feeds x_mark to the variate model (recorded in the row); with patches it is refused."""
    assert forecast.parse_args([]).time_tokens == 0
    assert forecast.main(_short_custom_run(tmp_path, "--tokenization", "variate", "--time_tokens", "1")) == 0
    row = _last_row(tmp_path)
    assert row["time_tokens"] == 1 and row["tokenization"] == "variate" and np.isfinite(row["mse"])
    assert forecast.main(_short_custom_run(tmp_path, "--time_tokens", "1")) == 1
    assert "time_tokens needs tokenization='variate'" in capsys.readouterr().err


def test_decomp_kernel_reaches_the_model_and_the_results_row(tmp_path, capsys):
    assert forecast.parse_args([]).decomp_kernel == 0
    assert forecast.main(_short_custom_run(tmp_path, "--decomp_kernel", "25", "--linear_skip", "1")) == 0
    row = _last_row(tmp_path)
    assert row["decomp_kernel"] == 25 and np.isfinite(row["mse"])
    assert forecast.main(_short_custom_run(tmp_path, "--decomp_kernel", "24")) == 1
    assert "decomp_kernel must be 0 (off) or an odd window" in capsys.readouterr().err


def test_test_only_names_a_mismatched_or_corrupt_checkpoint(tmp_path, capsys):
    """--is_training 0 reloads the run's checkpoint; options that build another model (not part of the run's
    folder name, e.g. --linear_skip) or a damaged file give an error naming the file, not a traceback."""
    assert forecast.main(_short_custom_run(tmp_path)) == 0
    checkpoint = _run_folder(tmp_path) / "checkpoint.pth"
    assert forecast.main(_short_custom_run(tmp_path, "--is_training", "0", "--linear_skip", "1")) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint}" in err and "unexpected keys (0)" in err and "model.skip.weight" in err
    assert forecast.main(_short_custom_run(tmp_path, "--is_training", "0", "--d_conv", "2")) == 1
    assert "does not fit the EMamba-TS these options build" in capsys.readouterr().err  # same keys, other shapes
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert forecast.main(_short_custom_run(tmp_path, "--is_training", "0")) == 1
    assert f"checkpoint {checkpoint} is corrupt" in capsys.readouterr().err


def test_linear_stage_trains_only_the_linear_part_then_everything_from_it(tmp_path, monkeypatch):
    """--linear_epochs: stage 1 changes only the linear path / cycle / RevIN affine; stage 2 starts from that
    forecaster (epoch 0 of epochs.csv, the blocks' head zeroed) and keeps it unless an epoch beats it."""
    real_stage, seen = forecast.fit_linear_part, {}

    def watched(model, *args):
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        info = real_stage(model, *args)
        seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        return info

    monkeypatch.setattr(forecast, "fit_linear_part", watched)
    options = [*LINEAR_STAGE, "--cycle_len", "24", "--train_epochs", "2", "--patience", "5"]
    assert forecast.main(_short_custom_run(tmp_path, *options)) == 0
    linear = ("skip.", "cycle", "revin.")
    for name, before in seen["before"].items():
        changed = not torch.equal(before, seen["after"][name])
        assert changed == name.removeprefix("model.").startswith(linear), name
    row = _last_row(tmp_path)
    assert 1 <= row["linear_best_epoch"] <= row["linear_epochs_run"] <= 2
    assert row["best_val_loss"] <= row["linear_val_mse"] and np.isfinite(row["linear_mse"])
    log = list(csv.DictReader(open(Path(row["epoch_log"]))))
    assert [int(r["epoch"]) for r in log] == [0, 1, 2] and float(log[0]["val_mse"]) == row["linear_val_mse"]
    zero_head = torch.load(Path(row["checkpoint"]).with_name("linear.pth"), weights_only=False)["model"]
    assert not zero_head["model.head.weight"].any() and not zero_head["model.head.bias"].any()

    # a second stage that cannot move (learning rate 0) keeps epoch 0: the test scores the linear forecaster
    assert forecast.main(_short_custom_run(tmp_path, *options, "--learning_rate", "0", "--lradj", "constant",
                                           "--des", "frozen")) == 0
    row = _last_row(tmp_path)
    assert row["best_epoch"] == 0 and row["best_val_loss"] == row["linear_val_mse"]
    assert row["mse"] == row["linear_mse"] and row["mae"] == row["linear_mae"]


def test_linear_stage_nan_loss_stops_with_a_named_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(forecast, "criterion", lambda pred, true, *options: (pred - true).sum() * float("nan"))
    assert forecast.main(_short_custom_run(tmp_path, *LINEAR_STAGE)) == 1
    err = capsys.readouterr().err
    assert "linear stage" in err and "--linear_lr" in err and "no finite validation loss" in err
