"""Checkpoint files: atomic writes, weights_only loading, keep-N, clear errors; NaN and bad-input handling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from emamba import train
from emamba.engine.checkpoint import (CheckpointError, CheckpointManager, atomic_save, get_rng_state, load_checkpoint,
                                      save_safetensors, set_rng_state)

from engine_helpers import FAST, make_image_folder

SMALL = FAST + ["--max-train-samples", "32", "--max-val-samples", "16", "--batch-size", "16"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "last.pth"
    atomic_save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_corrupt_and_missing_files_are_named(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"x": torch.arange(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    text, noise = tmp_path / "text.pth", tmp_path / "noise.pth"
    text.write_bytes(b"not a checkpoint")  # torch.load: "Unsupported operand" (read as a pickle of objects)
    noise.write_bytes(bytes(range(256)) * 2)  # torch.load: a bare IndexError
    for bad in (truncated, tmp_path / "missing.pth", text, noise):
        with pytest.raises(CheckpointError, match=str(bad)):
            load_checkpoint(bad)
    for bad in (text, noise):  # not mistaken for a file of pickled objects
        with pytest.raises(CheckpointError, match="is corrupt or truncated"):
            load_checkpoint(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(junk)
    weights = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.ones(2, 2).t()}, weights)  # non-contiguous input is fine
    assert torch.equal(load_checkpoint(weights)["w"], torch.ones(2, 2))


def test_pickled_objects_need_trust(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"args": __import__("argparse").Namespace(a=1), "model": {}}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert "args" in load_checkpoint(path, trusted=True)


def test_keep_n_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for epoch in range(1, 5):
        manager.save({"epoch": epoch}, epoch_end=True, is_best=epoch == 2)
    assert [e for e, _ in manager.epoch_checkpoints()] == [3, 4]
    assert load_checkpoint(manager.best)["epoch"] == 2 and load_checkpoint(manager.last)["epoch"] == 4


def test_rng_state_roundtrip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": get_rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert train.main(["--output_dir", str(out), "--epochs", "2", "--stop-epoch", "1"] + SMALL) == 0
    return out


def test_resume_from_corrupt_file_names_it_and_keeps_others(tmp_path, trained, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes((trained / "last.pth").read_bytes()[:1000])
    before = (trained / "last.pth").read_bytes()
    assert train.main(["--output_dir", str(trained), "--epochs", "2", "--resume", str(corrupt)] + SMALL) == 2
    assert "corrupt.pth" in capsys.readouterr().err
    assert (trained / "last.pth").read_bytes() == before


def test_checkpoint_from_another_model_lists_keys(tmp_path, trained, capsys):
    args = ["--output_dir", str(tmp_path / "o"), "--model", "resnet18", "--epochs", "2"] + SMALL
    assert train.main(args + ["--resume", str(trained / "last.pth")]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "unexpected keys" in err and "'emamba_tiny'" in err and "conv1.weight" in err
    assert train.main(args + ["--finetune", str(trained / "last.pth")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, trained, monkeypatch, capsys):
    from timm.loss import LabelSmoothingCrossEntropy

    out = tmp_path / "nan"
    out.mkdir()
    (out / "last.pth").write_bytes((trained / "last.pth").read_bytes())
    before = (out / "last.pth").read_bytes()
    monkeypatch.setattr(LabelSmoothingCrossEntropy, "forward", lambda self, x, t: x.sum() * float("nan"))
    code = train.main(["--output_dir", str(out), "--epochs", "2", "--resume", str(out / "last.pth")] + SMALL)
    assert code == 1
    printed = capsys.readouterr().out
    assert "loss is nan" in printed and "last good checkpoint" in printed
    assert (out / "last.pth").read_bytes() == before


@pytest.mark.parametrize("case", ["missing", "empty", "class_mismatch", "corrupt_image", "img_size", "output_dir"])
def test_bad_input_gives_clear_error(tmp_path, capsys, case):
    data = tmp_path / "data"
    args = ["--model", "emamba_tiny", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--aa", "none",
            "--output_dir", str(tmp_path / "out")] + FAST
    expect = {"missing": "does not exist", "empty": "no class folders", "class_mismatch": "only in val: class_9",
              "corrupt_image": "cannot read image file", "img_size": "multiples of 32",
              "output_dir": "cannot write to output directory"}[case]
    if case != "missing":
        make_image_folder(data, per_class=4, val_per_class=2)
    if case == "empty":
        for split in ("train", "val"):
            for sub in (data / split).iterdir():
                for f in sub.iterdir():
                    f.unlink()
                sub.rmdir()
    elif case == "class_mismatch":
        (data / "val" / "class_9").mkdir()
        (data / "val" / "class_9" / "x.png").write_bytes((data / "val" / "class_0" / "img_000.png").read_bytes())
    elif case == "corrupt_image":
        bad = data / "train" / "class_1" / "img_002.png"
        bad.write_bytes(bad.read_bytes()[:40])
        expect = "img_002.png"
    elif case == "img_size":
        args += ["--img-size", "40"]
    elif case == "output_dir":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args += ["--output_dir", str(blocker / "sub")]
    assert train.main(args + ["--data-path", str(data)]) == 2
    assert expect in capsys.readouterr().err
