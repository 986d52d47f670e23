"""End-to-end tests of ``emamba train`` (in-process, tiny runs) and one 2-process torchrun job."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from emamba import train
from emamba.engine.classification import ShardSampler

from engine_helpers import FAST, make_image_folder

SMALL = FAST + ["--max-train-samples", "32", "--max-val-samples", "24", "--batch-size", "8"]
TINY = FAST + ["--max-train-samples", "16", "--max-val-samples", "8", "--batch-size", "4"]
# exercise every random source: Mixup/CutMix, random erasing, drop path, EMA
RANDOM_RECIPE = ["--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop-path", "0.1", "--model-ema",
                 "--model-ema-decay", "0.9"]


def rows(out: Path) -> list[dict]:
    with open(out / "summary.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`emamba train --output_dir DIR --epochs 1` on the bundled data (small subset), with EMA."""
    out = tmp_path_factory.mktemp("default") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train.main(["--output_dir", str(out), "--epochs", "1", "--model-ema"] + SMALL) == 0
    return out, buf.getvalue()


def test_bundled_default_run(default_run):
    out, printed = default_run
    assert "top-1" in printed and "best val top-1" in printed
    with open(out / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["epoch"]) == 1 and 0.0 <= float(last["val_top1"]) <= 100.0
    assert rows(out)[-1]["val_images"] == 24
    for name in ("last.pth", "best.pth", "checkpoint-1.pth", "best.safetensors", "best_ema.safetensors",
                 "last.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "emamba_tiny" and config["dataset"] == "bundled" and config["batch_size"] == 8
    state = torch.load(out / "last.pth", weights_only=True)
    for key in ("model", "model_ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "rng", "args"):
        assert key in state
    assert state["epoch"] == 1 and state["global_step"] == 4 and state["args"]["batch_size"] == 8
    from safetensors.torch import load_file

    assert set(load_file(out / "last.safetensors")) == set(state["model"])


def test_config_file_and_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: emamba_tiny\nepochs: 7\nbatch-size: 8\nlr: 0.5\nsmoothing: 0.2\n")
    args = train.parse_args(["--config", str(cfg), "--data-path", "x", "--epochs", "2", "--lr=0.1"])
    assert (args.epochs, args.batch_size, args.lr, args.smoothing, args.dataset) == (2, 8, 0.1, 0.2, "imagefolder")
    cfg.write_text("epochz: 3\n")
    assert train.main(["--config", str(cfg)]) == 2
    for name in ("emamba_s", "emamba_b", "emamba_l", "emamba_s_mlp", "emamba_b_mlp", "emamba_l_mlp", "finetune",
                 "bundled_tiny"):
        path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
        args = train.parse_args(["--config", str(path)])  # every shipped config parses
        assert args.model.startswith("emamba")
    bundled = train.parse_args(["--config", str(path)])
    default = train.parse_args([])
    assert {k: v for k, v in vars(bundled).items() if k != "config"} == {
        k: v for k, v in vars(default).items() if k != "config"}


COMMON = SMALL + RANDOM_RECIPE + ["--epochs", "2", "--seed", "3"]
KEYS = ("epoch", "train_loss", "val_loss", "val_top1", "ema_val_loss", "ema_val_top1", "lr")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 2 epochs that were never stopped."""
    out = tmp_path_factory.mktemp("full")
    assert train.main(COMMON + ["--output_dir", str(out)]) == 0
    return [[r[k] for k in KEYS] for r in rows(out)]


def test_resume_reports_same_losses(tmp_path, uninterrupted):
    """Stop after epoch 1, resume, and compare with a run that never stopped (CPU, fixed seed)."""
    split = tmp_path / "split"
    assert train.main(COMMON + ["--output_dir", str(split), "--stop-epoch", "1"]) == 0
    assert [r["epoch"] for r in rows(split)] == [1]
    assert train.main(COMMON + ["--output_dir", str(split), "--resume", str(split / "last.pth")]) == 0
    assert [[r[k] for k in KEYS] for r in rows(split)] == uninterrupted


def test_interrupt_mid_epoch_then_resume_matches(tmp_path, monkeypatch, uninterrupted):
    """SIGTERM in the middle of an epoch writes a resumable checkpoint; resuming gives the same losses."""
    cut = tmp_path / "cut"
    import emamba.engine.classification as engine

    real = engine.train_one_epoch

    def interrupted_after_two_updates(**kw):
        calls = {"n": 0}

        def stop():
            calls["n"] += 1
            if calls["n"] == 2 and kw["state"].epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler turns it into the stop flag
            return kw["stop_requested"]()

        return real(**{**kw, "stop_requested": stop})

    monkeypatch.setattr(train, "train_one_epoch", interrupted_after_two_updates)
    assert train.main(COMMON + ["--output_dir", str(cut)]) == 128 + signal.SIGTERM
    state = torch.load(cut / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert train.main(COMMON + ["--output_dir", str(cut), "--resume", str(cut / "last.pth")]) == 0
    assert [[r[k] for k in KEYS] for r in rows(cut)] == uninterrupted


def test_eval_and_finetune(tmp_path, capsys, default_run):
    src, _ = default_run
    assert train.main(["--output_dir", str(tmp_path / "ev"), "--eval", "--resume", str(src / "last.pth")] + SMALL) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed and "loss" in printed
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["top1"] == pytest.approx(rows(src)[-1]["val_top1"]) and result["count"] == 24

    # fine-tune the 10-class checkpoint on a 3-class ImageFolder: the classifier is replaced and reported
    data = make_image_folder(tmp_path / "folder", per_class=4, val_per_class=2, rgb=False)
    args = ["--data-path", str(data), "--model", "emamba_tiny", "--img-size", "32", "--in-chans", "1",
            "--epochs", "1", "--batch-size", "6", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--warmup-epochs", "0"]
    assert train.main(args + FAST + ["--output_dir", str(tmp_path / "ft"), "--finetune",
                                     str(src / "best.safetensors")]) == 0
    assert "dropped keys: head.bias, head.weight" in capsys.readouterr().out


def test_shard_sampler_counts_each_image_once():
    for length in (0, 1, 7, 32, 33):
        for world in (1, 2, 3, 8):
            shards = [list(ShardSampler(length, world, r)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(length))


def torchrun_cpu(args: list[str], timeout: int = 300) -> tuple[str, str]:
    """Run a 2-process torchrun job on the CPU (gloo, one thread each); fail the test on timeout or error.

    ``args`` follow torchrun's own options: ``["-m", "emamba.train", ...]`` or ``[script, ...]``.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMAMBA_SCAN_BACKEND": "torch"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0"] + args
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the workers run in sessions of their own: SIGTERM makes torchrun stop them (SIGKILL after its grace
        # period) before it exits; SIGKILL the launcher only if that does not happen
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"the 2-process torchrun job did not finish in {timeout} s")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout, stderr


def test_two_process_torchrun_cpu(tmp_path):
    out = tmp_path / "ddp"
    torchrun_cpu(["-m", "emamba.train", "--output_dir", str(out), "--epochs", "1", "--max-train-samples", "32",
                  "--max-val-samples", "37", "--batch-size", "4", "--no-progress", "--num_workers", "0"])
    last = rows(out)[-1]
    assert last["epoch"] == 1 and last["val_images"] == 37  # every val image exactly once, no padding
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and state["global_step"] == 4  # 32 images / (2 processes x 4)


# 16 images = 2 processes x batch 4 x 2 accumulation steps: 1 update per epoch; 9 val images: 2 batches on
# rank 0, 1 on rank 1 (the sharded model must still run as many forwards on both); EMA, clipping, drop path
FSDP_COMMON = ["--epochs", "2", "--max-train-samples", "16", "--max-val-samples", "9", "--batch-size", "4",
               "--no-progress", "--num_workers", "0", "--seed", "7", "--accum-steps", "2", "--clip-grad", "1.0",
               "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--threads", "1"]
LOSS_KEYS = ("train_loss", "val_loss", "ema_val_loss")


def assert_same_checkpoint_layout(a: dict, b: dict) -> None:
    """Same keys, and the same tensor shapes and dtypes in the model, EMA and optimizer states."""
    assert set(a) == set(b)
    for key in ("model", "model_ema"):
        assert list(a[key]) == list(b[key]), key
        for name in a[key]:
            assert (a[key][name].shape, a[key][name].dtype) == (b[key][name].shape, b[key][name].dtype), name
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert set(opt_a["state"]) == set(opt_b["state"])
    assert len(opt_a["state"]) == sum(len(g["params"]) for g in opt_a["param_groups"])  # every parameter
    for index, entry in opt_a["state"].items():
        assert set(entry) == set(opt_b["state"][index])
        for k, v in entry.items():
            assert v.shape == opt_b["state"][index][k].shape, (index, k)
    assert opt_a["param_groups"] == opt_b["param_groups"]


def test_two_process_fsdp_matches_ddp_and_resumes(tmp_path):
    """2 CPU processes (gloo): --fsdp gives DDP's losses, a DDP-format checkpoint, and resumes exactly.

    All runs go through one torchrun launch (tests/engine/torchrun_sequence.py) to pay the start-up once:
    DDP and FSDP for 2 epochs; FSDP stopped after epoch 1 and resumed; FSDP resumed from the DDP run's
    epoch-1 checkpoint and DDP from the FSDP one.
    """
    runs = {name: tmp_path / name for name in ("ddp", "fsdp", "split", "ddp2fsdp", "fsdp2ddp")}
    sequence = [
        FSDP_COMMON + ["--output_dir", str(runs["ddp"])],
        FSDP_COMMON + ["--output_dir", str(runs["fsdp"]), "--fsdp"],
        FSDP_COMMON + ["--output_dir", str(runs["split"]), "--fsdp", "--stop-epoch", "1"],
        FSDP_COMMON + ["--output_dir", str(runs["split"]), "--fsdp", "--resume", str(runs["split"] / "last.pth")],
        FSDP_COMMON + ["--output_dir", str(runs["ddp2fsdp"]), "--fsdp", "--resume",
                       str(runs["ddp"] / "checkpoint-1.pth")],
        FSDP_COMMON + ["--output_dir", str(runs["fsdp2ddp"]), "--resume", str(runs["fsdp"] / "checkpoint-1.pth")],
    ]
    script = Path(__file__).with_name("torchrun_sequence.py")
    torchrun_cpu([str(script), json.dumps(sequence)], timeout=400)

    ddp, fsdp = rows(runs["ddp"]), rows(runs["fsdp"])
    assert [r["epoch"] for r in fsdp] == [1, 2] and fsdp[-1]["val_images"] == 9
    for r_ddp, r_fsdp in zip(ddp, fsdp):  # the same averaged gradients: equal up to float rounding
        for key in LOSS_KEYS:
            assert r_fsdp[key] == pytest.approx(r_ddp[key], rel=1e-5), (r_ddp["epoch"], key)
    assert [r["val_top1"] for r in fsdp] == [r["val_top1"] for r in ddp]

    state_ddp = torch.load(runs["ddp"] / "last.pth", weights_only=True)
    state_fsdp = torch.load(runs["fsdp"] / "last.pth", weights_only=True)
    assert_same_checkpoint_layout(state_fsdp, state_ddp)
    assert state_fsdp["world_size"] == 2 and state_fsdp["global_step"] == 2 and state_fsdp["args"]["fsdp"]
    for name, tensor in state_fsdp["model"].items():
        assert torch.allclose(tensor, state_ddp["model"][name].cpu(), rtol=1e-3, atol=1e-5), name
    from safetensors.torch import load_file

    assert set(load_file(runs["fsdp"] / "last.safetensors")) == set(state_ddp["model"])
    assert set(load_file(runs["fsdp"] / "best_ema.safetensors")) == set(state_ddp["model_ema"])

    # stopped after epoch 1 and resumed: the same epochs as the uninterrupted FSDP run. (Not the EMA's: as
    # with DDP, only rank 0's EMA BatchNorm statistics are saved, and rank 1 evaluates its shard with them.)
    split = rows(runs["split"])
    assert [r["epoch"] for r in split] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "lr"):
        assert [r[key] for r in split] == [r[key] for r in fsdp], key
    # either format resumes into the other kind of run
    for name, reference in (("ddp2fsdp", ddp), ("fsdp2ddp", fsdp)):
        resumed = rows(runs[name])
        assert [r["epoch"] for r in resumed] == [2], name
        for key in ("train_loss", "val_loss"):
            assert resumed[0][key] == pytest.approx(reference[1][key], rel=1e-4), (name, key)


def test_validate_command(tmp_path, capsys, default_run):
    from emamba import validate

    out, _ = default_run
    results = tmp_path / "v.json"
    assert validate.main(["--checkpoint", str(out / "last.pth"), "--max-samples", "24", "--num-workers", "0",
                          "--no-progress", "--results-file", str(results)]) == 0
    assert "top-1" in capsys.readouterr().out
    metrics = json.loads(results.read_text())
    assert metrics["count"] == 24 and metrics["top1"] == pytest.approx(rows(out)[-1]["val_top1"])
    assert validate.main(["--checkpoint", str(out / "best.safetensors"), "--model", "emamba_tiny", "--img-size", "32",
                          "--in-chans", "1", "--num-classes", "10", "--use-ema", "--no-progress"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert validate.main(["--checkpoint", str(out / "last.pth"), "--use-ema", "--max-samples", "24",
                          "--num-workers", "0", "--no-progress"]) == 0


def test_amp_fp16_accumulation_and_clipping(tmp_path):
    out = tmp_path / "amp"
    args = TINY + ["--epochs", "1", "--amp", "fp16", "--accum-steps", "2", "--clip-grad", "1.0", "--output_dir",
                   str(out)]
    assert train.main(args) == 0
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["global_step"] == 2 and state["scaler"]["scale"] > 0  # 4 batches / 2 accumulation steps
    assert train.parse_args(["--amp"]).amp == "bf16"
    assert (out / "last.pth").is_file()


TB_TAGS = {"train_loss", "val_loss", "val_top1", "val_top5", "lr", "val_images", "train_time_s", "eval_time_s",
           "train_imgs_per_s"}


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) per tag, read back the way TensorBoard reads OUT/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_each_epoch(tmp_path):
    """--tensorboard writes the summary.csv columns as scalars, one point per epoch, also across a resume."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert train.main(TINY + ["--epochs", "1", "--tensorboard", "--output_dir", str(out)]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = tb_scalars(out)
    assert set(scalars) == TB_TAGS  # no EMA columns without --model-ema
    row = rows(out)[0]
    for tag, points in scalars.items():
        assert [step for step, _ in points] == [1], tag
        assert points[0][1] == pytest.approx(row[tag], rel=1e-6), tag  # float32 in the event file

    # two epochs, then resume from epoch 1: the re-run epoch 2 replaces the first run's point, not a duplicate
    assert train.main(TINY + ["--epochs", "2", "--tensorboard", "--output_dir", str(out)]) == 0
    assert train.main(TINY + ["--epochs", "2", "--tensorboard", "--output_dir", str(out),
                              "--resume", str(out / "checkpoint-1.pth")]) == 0
    scalars = tb_scalars(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3
    for tag in ("train_loss", "val_loss", "val_top1", "val_top5", "lr"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in rows(out)], rel=1e-6), tag


def test_tensorboard_missing_warns_and_trains(tmp_path, monkeypatch, capsys):
    """Without the tensorboard package the run still finishes; it only prints a warning."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)  # re-import it, so that its `import tensorboard` runs
    out = tmp_path / "no_tb"
    assert train.main(TINY + ["--epochs", "1", "--tensorboard", "--output_dir", str(out)]) == 0
    assert "warning: --tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (out / "tensorboard").exists() and rows(out)[0]["epoch"] == 1


def test_transfer_datasets_local_only(tmp_path):
    from emamba.data.images import DataError, build_dataset

    for name, layout in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                         ("flowers102", "flowers-102"), ("stanford_cars", "stanford_cars")):
        with pytest.raises(DataError, match=layout):
            build_dataset(name, str(tmp_path), "train")
        assert not any(tmp_path.iterdir())  # nothing downloaded
    folder = make_image_folder(tmp_path / "flowers", per_class=2, val_per_class=1)
    dataset = build_dataset("flowers102", str(folder), "train")
    assert len(dataset) == 6 and dataset.classes == ["class_0", "class_1", "class_2"]


def test_fsdp_refuses_what_it_cannot_do(tmp_path, capsys):
    """Early, clear errors (exit code 2) before any data is read or process group is made."""
    assert train.main(TINY + ["--fsdp", "--model", "resnet18", "--output_dir", str(tmp_path / "a")]) == 2
    assert "--fsdp shards EMamba models" in capsys.readouterr().err
    assert train.main(TINY + ["--fsdp", "--clip-grad", "0.01", "--clip-mode", "agc",
                              "--output_dir", str(tmp_path / "b")]) == 2
    assert "--clip-mode agc is not supported with --fsdp" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not torch.distributed.is_initialized()


def test_fsdp_single_process(tmp_path):
    """--fsdp without torchrun runs on a one-process group: same losses and checkpoint layout as without it,
    here with fp16 (ShardedGradScaler), accumulation, clipping, gradient checkpointing and EMA; then --eval."""
    args = TINY + ["--epochs", "1", "--amp", "fp16", "--accum-steps", "2", "--clip-grad", "1.0",
                   "--grad-checkpointing", "--model-ema", "--model-ema-decay", "0.9", "--seed", "4"]
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    assert train.main(args + ["--output_dir", str(plain)]) == 0
    assert train.main(args + ["--output_dir", str(sharded), "--fsdp"]) == 0
    assert not torch.distributed.is_initialized()  # the one-process group is torn down again
    for key in LOSS_KEYS:
        assert rows(sharded)[0][key] == pytest.approx(rows(plain)[0][key], rel=1e-4), key
    state = torch.load(sharded / "last.pth", weights_only=True)
    reference = torch.load(plain / "last.pth", weights_only=True)
    assert_same_checkpoint_layout(state, reference)
    assert state["global_step"] == 2 and state["scaler"]["scale"] > 0 and state["world_size"] == 1
    assert train.main(["--output_dir", str(tmp_path / "ev"), "--eval", "--fsdp", "--resume",
                       str(sharded / "last.pth"), "--amp", "fp16"] + TINY) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["loss"] == pytest.approx(rows(sharded)[0]["val_loss"], rel=1e-5) and result["count"] == 8
