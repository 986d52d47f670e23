"""Transfer datasets through ``build_dataset`` on tiny copies of their real on-disk formats.

Each writer below produces the files exactly as torchvision's dataset class reads them (pickled CIFAR
batches, Flowers-102 / Stanford Cars ``.mat`` files written with scipy). Every image is one solid colour,
unique per image, so a test can tell that image ``i`` arrives with label ``i``. torchvision checks md5
sums of the CIFAR and Flowers files; the tests replace the class's expected sums with those of the
synthetic files, so the integrity check still runs.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torchvision import transforms as T

from emamba.data.images import DataError, build_dataset

scipy_io = pytest.importorskip("scipy.io")


@dataclass
class Expected:
    classes: list[str]
    train_labels: list[int]
    val_labels: list[int]
    train_colors: list[tuple[int, int, int]]
    val_colors: list[tuple[int, int, int]]
    folder: str  # the folder torchvision looks for inside --data-path


def colors(start: int, n: int) -> list[tuple[int, int, int]]:
    """Solid RGB colours, distinct per image (also in grayscale) and unequal channels (catches a mix-up)."""
    return [(10 + 17 * i, 35 + 15 * i, 200 - 12 * i) for i in range(start, start + n)]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def save_jpg(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


def cifar_rows(cols) -> np.ndarray:
    """CIFAR's row layout: 3072 uint8 per image, the 1024 red, then green, then blue values."""
    return np.stack([np.repeat(np.array(c, dtype=np.uint8), 32 * 32) for c in cols])


def dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, monkeypatch) -> Expected:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train_labels, train_colors = [], colors(0, 10)
    for b in range(5):  # data_batch_1..5 with 2 images each
        labels = [(2 * b + 3) % 10, (2 * b + 7) % 10]
        cols = train_colors[2 * b: 2 * b + 2]
        dump(base / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5", "labels": labels,
                                            "data": cifar_rows(cols), "filenames": ["a.png", "b.png"]})
        train_labels += labels
    val_labels, val_colors = [9, 0, 4], colors(10, 3)
    dump(base / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": val_labels,
                               "data": cifar_rows(val_colors), "filenames": ["a.png", "b.png", "c.png"]})
    dump(base / "batches.meta", {"num_cases_per_batch": 2, "label_names": CIFAR10_CLASSES, "num_vis": 3072})
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{b}", md5(base / f"data_batch_{b}")]
                                                    for b in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5(base / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5(base / "batches.meta")})
    return Expected(CIFAR10_CLASSES, train_labels, val_labels, train_colors, val_colors, base.name)


CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]


def write_cifar100(root: Path, monkeypatch) -> Expected:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    train_labels, val_labels, train_colors, val_colors = [5, 99, 0, 42], [99, 7, 5], colors(0, 4), colors(4, 3)
    for name, labels, cols in (("train", train_labels, train_colors), ("test", val_labels, val_colors)):
        dump(base / name, {"filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": f"{name} batch",
                           "fine_labels": labels, "coarse_labels": [lab // 5 for lab in labels],
                           "data": cifar_rows(cols)})
    dump(base / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": [f"c{i}" for i in range(20)]})
    # CIFAR100 inherits from CIFAR10: set its own class attributes, as torchvision defines them there
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", md5(base / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", md5(base / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {**tvd.CIFAR100.meta, "md5": md5(base / "meta")})
    return Expected(CIFAR100_CLASSES, train_labels, val_labels, train_colors, val_colors, base.name)


def write_flowers102(root: Path, monkeypatch) -> Expected:
    """Image ids are 1-based and shuffled across the splits, labels in imagelabels.mat 1-based too."""
    base = root / "flowers-102"
    labels_1based = [77, 1, 102, 50, 77, 3, 1]  # image_00001 .. image_00007
    cols = colors(0, 7)
    for i, col in enumerate(cols, 1):
        save_jpg(base / "jpg" / f"image_{i:05d}.jpg", col)
    scipy_io.savemat(base / "imagelabels.mat", {"labels": np.array([labels_1based], dtype=np.uint8)})
    ids = {"trnid": [3, 6], "valid": [1, 7], "tstid": [2, 4, 5]}
    scipy_io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    monkeypatch.setattr(tvd.Flowers102, "_file_dict", {
        **tvd.Flowers102._file_dict, "label": ("imagelabels.mat", md5(base / "imagelabels.mat")),
        "setid": ("setid.mat", md5(base / "setid.mat"))})
    train_ids, val_ids = ids["trnid"] + ids["valid"], ids["tstid"]  # train+val for training, test for eval
    return Expected(list(tvd.Flowers102.classes), [labels_1based[i - 1] - 1 for i in train_ids],
                    [labels_1based[i - 1] - 1 for i in val_ids], [cols[i - 1] for i in train_ids],
                    [cols[i - 1] for i in val_ids], base.name)


CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]


def cars_annotations(fnames, classes_1based) -> np.ndarray:
    """A 1 x N MATLAB struct array with the devkit's fields."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    rec = np.zeros((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(zip(fnames, classes_1based)):
        rec[0, i] = (np.uint16(2), np.uint16(3), np.uint16(30), np.uint16(20), np.uint8(cls), fname)
    return rec


def write_stanford_cars(root: Path, monkeypatch) -> Expected:
    base = root / "stanford_cars"
    train_cls, test_cls = [3, 1, 2, 3], [2, 1, 3]  # 1-based, as in the devkit
    train_cols, test_cols = colors(0, 4), colors(4, 3)
    for folder, cols in (("cars_train", train_cols), ("cars_test", test_cols)):
        for i, col in enumerate(cols, 1):
            save_jpg(base / folder / f"{i:05d}.jpg", col)
    (base / "devkit").mkdir()
    scipy_io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS_CLASSES], dtype=object)})
    scipy_io.savemat(base / "devkit" / "cars_train_annos.mat",
                     {"annotations": cars_annotations([f"{i:05d}.jpg" for i in range(1, 5)], train_cls)})
    scipy_io.savemat(base / "cars_test_annos_withlabels.mat",
                     {"annotations": cars_annotations([f"{i:05d}.jpg" for i in range(1, 4)], test_cls)})
    return Expected(CARS_CLASSES, [c - 1 for c in train_cls], [c - 1 for c in test_cls], train_cols, test_cols,
                    base.name)


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "flowers102": write_flowers102,
           "stanford_cars": write_stanford_cars}


def expected_pixel(color, in_chans: int) -> torch.Tensor:
    """The colour as the dataset should deliver it in ``in_chans`` channels, in [0, 1]."""
    img = Image.new("RGB", (1, 1), color).convert("L" if in_chans == 1 else "RGB")
    return T.functional.to_tensor(img).flatten()


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("name", list(WRITERS))
def test_transfer_dataset_splits_classes_and_items(tmp_path, monkeypatch, name, in_chans):
    expected = WRITERS[name](tmp_path, monkeypatch)
    transform = T.Compose([T.Resize((48, 48)), T.ToTensor()])
    for split, labels, cols in (("train", expected.train_labels, expected.train_colors),
                                ("val", expected.val_labels, expected.val_colors)):
        dataset = build_dataset(name, str(tmp_path), split, transform, in_chans=in_chans)
        assert len(dataset) == len(labels)
        assert dataset.classes == expected.classes and len(dataset.classes) == len(set(expected.classes))
        assert dataset.targets == labels and all(type(t) is int for t in dataset.targets)
        for i, (label, color) in enumerate(zip(labels, cols)):
            img, target = dataset[i]
            assert type(target) is int and target == label
            assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
            assert img.shape == (in_chans, 48, 48)
            # JPEG keeps a solid colour within a few levels; CIFAR's pickled pixels are exact
            tol = 1e-6 if name.startswith("cifar") else 4 / 255
            torch.testing.assert_close(img.mean(dim=(1, 2)), expected_pixel(color, in_chans), atol=tol, rtol=0)


@pytest.mark.parametrize("name", list(WRITERS))
def test_transfer_dataset_wrong_layout_names_expected_one(tmp_path, monkeypatch, name):
    """Pointing --data-path at the dataset folder itself, or a folder without it, names the layout."""
    expected = WRITERS[name](tmp_path / "data", monkeypatch)
    inner = tmp_path / "data" / expected.folder
    with pytest.raises(DataError, match="pass its parent directory") as info:
        build_dataset(name, str(inner), "train")
    assert f"DIR/{expected.folder}/" in str(info.value) and "Nothing is downloaded" in str(info.value)
    with pytest.raises(DataError, match=f"DIR/{expected.folder}/") as info:
        build_dataset(name, str(tmp_path), "train")
    assert "parent directory" not in str(info.value)


@pytest.mark.parametrize("name, missing", [("cifar10", "data_batch_5"), ("cifar100", "meta"),
                                           ("flowers102", "setid.mat"), ("stanford_cars", "devkit/cars_meta.mat")])
def test_transfer_dataset_missing_file(tmp_path, monkeypatch, name, missing):
    expected = WRITERS[name](tmp_path, monkeypatch)
    (tmp_path / expected.folder / missing).unlink()
    with pytest.raises(DataError, match=f"{name} not found under"):
        build_dataset(name, str(tmp_path), "train")


def test_cifar_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    """A changed batch file fails torchvision's md5 check instead of loading wrong data."""
    write_cifar10(tmp_path, monkeypatch)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="corrupted"):
        build_dataset("cifar10", str(tmp_path), "train")


@pytest.mark.parametrize("name, image", [("flowers102", "jpg/image_00003.jpg"), ("stanford_cars", "cars_train/00001.jpg")])
def test_transfer_dataset_corrupt_image_names_file(tmp_path, monkeypatch, name, image):
    """Truncated JPEGs raise DataError naming the file, like the ImageFolder datasets."""
    path = tmp_path / WRITERS[name](tmp_path, monkeypatch).folder / image
    path.write_bytes(path.read_bytes()[:200])
    dataset = build_dataset(name, str(tmp_path), "train")
    with pytest.raises(DataError, match=re.escape(f"cannot read image file {path}")):
        dataset[0]


@pytest.mark.parametrize("name", ["flowers102", "stanford_cars"])
def test_mat_datasets_without_scipy(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match="needs scipy"):
        build_dataset(name, str(tmp_path), "train")
