"""Token labeling: label-map transforms, the loss, make-token-labels and a training run on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import emamba  # noqa: F401
from emamba import train
from emamba.engine import token_labels as tl

from engine_helpers import FAST, make_image_folder


def _position_map(h: int, w: int) -> torch.Tensor:
    """(1, 2, 1, h, w): at cell (i, j) class i*w + j with probability 1."""
    idx = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    return torch.stack([torch.ones_like(idx), idx], dim=1)


def test_dense_targets_crop_and_flip():
    maps = _position_map(4, 4)
    crop = torch.tensor([[0.5, 0.0, 0.5, 0.5, 0.0]])  # bottom-left quarter
    out = tl.dense_targets(maps, crop, 16, (2, 2), "prob")
    assert out.shape == (1, 4, 16)
    assert out[0].argmax(-1).tolist() == [8, 9, 12, 13]
    assert torch.allclose(out.sum(-1), torch.ones(1, 4))
    flip = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])  # whole image, mirrored
    out = tl.dense_targets(maps, flip, 16, (4, 4), "prob")
    assert out[0].argmax(-1).reshape(4, 4)[0].tolist() == [3, 2, 1, 0]


def test_transform_moves_labels_with_pixels():
    """Blocks of distinct grey levels labelled by block: after random crops/flips the dense label of each
    output cell is the block its pixels come from."""
    blocks = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16 + 8, np.ones((16, 16), dtype=np.uint8))
    img = Image.fromarray(blocks)
    maps = _position_map(4, 4)
    transform = tl.TokenLabelTransform(64, scale=(0.2, 1.0), hflip=0.5, color_jitter=None,
                                       interpolation="bilinear", mean=(0.0,), std=(1.0,))
    agree = total = 0
    for seed in range(12):
        torch.manual_seed(seed), np.random.seed(seed), __import__("random").seed(seed)
        x, coords = transform(img)
        target = tl.dense_targets(maps, coords[None], 16, (8, 8), "prob")[0].argmax(-1).reshape(8, 8)
        centres = x[0, 4::8, 4::8]  # pixel at each cell centre
        level = torch.div(centres * 255, 16, rounding_mode="floor").long()
        agree += int((level == target).sum())
        total += target.numel()
    assert agree / total > 0.9


def test_loss_mixes_class_target_by_box():
    torch.manual_seed(0)
    cls_logits, aux = torch.randn(4, 5), torch.randn(4, 9, 5)
    target = torch.tensor([0, 1, 2, 3])
    loss = tl.TokenLabelLoss(5, cls_weight=1.0, dense_weight=0.5, smoothing=0.1)
    soft = tl.smooth_one_hot(target, 5, 0.1)
    plain = tl.soft_cross_entropy(cls_logits, soft) + 0.5 * tl.soft_cross_entropy(aux, soft[:, None].expand(4, 9, 5))
    assert torch.allclose(loss((cls_logits, aux, (0, 0, 0, 0)), target), plain)
    boxed = 1 - 4 / 9  # a 2x2 box on a 3x3 grid
    mixed = boxed * soft + (1 - boxed) * soft.flip(0)
    expected = tl.soft_cross_entropy(cls_logits, mixed) + 0.5 * tl.soft_cross_entropy(aux, soft[:, None].expand(4, 9, 5))
    assert torch.allclose(loss((cls_logits, aux, (0, 0, 2, 2)), target), expected)


def test_teacher_dense_logits_shapes():
    x = torch.randn(2, 3, 64, 64)
    for name in ("emamba_tiny", "resnet18"):
        model = timm.create_model(name, num_classes=7).eval()
        with torch.no_grad():
            assert tl.teacher_dense_logits(model, x).shape == (2, 7, 2, 2)
    resnet = timm.create_model("resnet18", num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # on a 1x1 feature map the per-position head is the model's own prediction
        assert torch.allclose(tl.teacher_dense_logits(resnet, x)[:, :, 0, 0], resnet(x), atol=1e-5)


def test_make_token_labels_then_train(tmp_path, capsys):
    """The whole path on real Fashion-MNIST images: teacher checkpoint -> label maps -> token-label training."""
    from safetensors.torch import save_file

    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=64, rgb=False)
    teacher = timm.create_model("resnet18", num_classes=3, in_chans=1)
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    maps = tmp_path / "maps"
    code = tl.main(["--teacher", "resnet18", "--checkpoint", str(tmp_path / "teacher.safetensors"), "--in-chans",
                    "1", "--img-size", "64", "--data-path", str(data), "--out", str(maps), "--num-workers", "0",
                    "--mean", "0.5", "--std", "0.5"])
    assert code == 0
    files = sorted(maps.rglob("*.pt"))
    assert len(files) == 12 and files[0].parent.name == "class_0"
    label_map = torch.load(files[0], weights_only=True)
    assert label_map.shape == (2, 3, 2, 2)
    assert torch.allclose(label_map[0].sum(0), torch.ones(2, 2), atol=1e-5)  # all 3 classes kept: probs sum to 1
    out = tmp_path / "run"
    args = ["--data-path", str(data), "--model", "emamba_tiny", "--img-size", "64", "--in-chans", "1",
            "--token-label", "--token-label-size", "2", "--token-label-data", str(maps), "--epochs", "1",
            "--batch-size", "6", "--output_dir", str(out)] + FAST
    assert train.main(args) == 0
    assert "Mixup/CutMix are off" in capsys.readouterr().out
    state = torch.load(out / "last.pth", weights_only=True)
    assert "aux_head.weight" in state["model"]
    # the same run with FSDP (one process): the token-label heads and MixToken shard like the rest
    with open(out / "summary.jsonl") as f:
        loss = json.loads(f.readline())["train_loss"]
    assert train.main(args + ["--output_dir", str(tmp_path / "fsdp"), "--fsdp"]) == 0
    with open(tmp_path / "fsdp" / "summary.jsonl") as f:
        assert json.loads(f.readline())["train_loss"] == pytest.approx(loss, rel=1e-4)
    assert train.main(args + ["--token-label-size", "3"]) == 2
    assert tl.main(["--teacher", "resnet18", "--data-path", str(tmp_path / "nope"), "--out", str(maps)]) == 2
