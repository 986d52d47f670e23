"""Image-classification datasets for ``emamba train`` / ``emamba validate``.

* :class:`ImageFolderDataset` - the seed's layout, ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``.
* :class:`ArrayImageDataset` - in-memory uint8 arrays: the bundled Fashion-MNIST subset
  (:func:`bundled_fashion_mnist`) and the full Fashion-MNIST idx(.gz) files (:func:`fashion_mnist_idx`).
* Transfer datasets (:func:`build_dataset`): CIFAR-10/100, Flowers-102 and Stanford Cars, read
  from local paths only through torchvision's dataset classes or an ImageFolder layout. Nothing is ever
  downloaded; missing data raises :class:`DataError` naming the expected layout.

Corrupt or truncated image files: **fail, naming the file**. A silently skipped image changes the
dataset without anyone noticing, so reading a broken file raises :class:`DataError` with its path
(inside a DataLoader worker the message reaches the main process unchanged). Remove or replace the file
and rerun; ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ArrayImageDataset",
    "BUNDLED_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "bundled_fashion_mnist",
    "fashion_mnist_idx",
    "build_dataset",
    "check_same_classes",
    "DATASETS",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "fashion_mnist_small"
BUNDLED_FILE = BUNDLED_DIR / "fashion_mnist_small.npz"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
DATASETS = ("imagefolder", "bundled", "fashion_mnist", "cifar10", "cifar100", "flowers102", "stanford_cars")


class DataError(ValueError):
    """A dataset problem the user has to fix (missing/empty directory, class mismatch, corrupt file)."""


def _image_mode(in_chans: int) -> str:
    if in_chans == 1:
        return "L"
    if in_chans == 3:
        return "RGB"
    raise DataError(f"images can be loaded with 1 (grayscale) or 3 (RGB) channels, not in_chans={in_chans}")


def load_image(path: str, mode: str) -> Image.Image:
    """Open and fully decode one image; a corrupt or truncated file raises DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"cannot read image file {path}: {type(exc).__name__}: {exc}. "
                        "Remove or replace the file (corrupt images are not skipped silently).") from exc


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` with classes sorted by folder name (torchvision's ImageFolder order).

    Args:
        root: the split directory (e.g. ``DIR/train``).
        transform: applied to the PIL image.
        in_chans: 3 -> RGB, 1 -> grayscale.
        class_names: force this class list/order (e.g. the training classes for the val split).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None, in_chans: int = 3,
                 class_names: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data directory {self.root} does not exist. Expected layout: DIR/train/<class>/*.jpg "
                            "and DIR/val/<class>/*.jpg (one sub-folder per class)")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"no class folders in {self.root}: expected one sub-folder per class, e.g. "
                            f"{self.root}/<class>/img.jpg")
        self.classes = list(class_names) if class_names is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for cls in found:
            if cls not in self.class_to_idx:
                continue
            for dirpath, _, files in sorted(os.walk(self.root / cls, followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[cls]))
        if not self.samples:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {self.root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.mode = _image_mode(in_chans)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = load_image(path, self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3), with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 transform: Optional[Callable] = None, in_chans: int = 1) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = [int(t) for t in labels]
        self.classes = list(classes)
        self.transform = transform
        self.mode = _image_mode(in_chans)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def bundled_fashion_mnist(split: str, transform: Optional[Callable] = None, in_chans: int = 1) -> ArrayImageDataset:
    """The bundled Fashion-MNIST subset: 4,000 train / 1,000 val images (see NOTICE.md beside the data)."""
    if split not in ("train", "val"):
        raise DataError(f"the bundled dataset has the splits 'train' and 'val', not {split!r}")
    if not BUNDLED_FILE.is_file():
        raise DataError(f"the bundled dataset is missing from this installation: {BUNDLED_FILE}")
    with np.load(BUNDLED_FILE, allow_pickle=False) as data:
        images, labels, classes = data[f"x_{split}"], data[f"y_{split}"], [str(c) for c in data["classes"]]
    return ArrayImageDataset(images, labels, classes, transform, in_chans)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except Exception as exc:
        raise DataError(f"cannot read idx file {path}: {type(exc).__name__}: {exc}") from exc


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def fashion_mnist_idx(root: str | os.PathLike, split: str, transform: Optional[Callable] = None,
                      in_chans: int = 1) -> ArrayImageDataset:
    """Full Fashion-MNIST (or MNIST) from the original idx files (gzipped or not) in ``root``.

    ``split`` 'train' reads ``train-*``, 'val'/'test' read ``t10k-*``.
    """
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for suffix in (".gz", ""):
            candidate = root / f"{prefix}-{kind}{suffix}"
            if candidate.is_file():
                found[kind] = candidate
                break
        else:
            raise DataError(f"Fashion-MNIST file {root}/{prefix}-{kind}[.gz] not found. Expected the four original "
                            "files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                            f"t10k-labels-idx1-ubyte.gz in {root} (e.g. Debian's dataset-fashion-mnist package)")
    images, labels = _read_idx(found["images-idx3-ubyte"]), _read_idx(found["labels-idx1-ubyte"])
    return ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES, transform, in_chans)


# ------------------------------------------------------------------------------------------ transfer sets
_TRANSFER_LAYOUTS = {
    "cifar10": "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (the python version of CIFAR-10)",
    "cifar100": "DIR/cifar-100-python/{train,test,meta} (the python version of CIFAR-100)",
    "flowers102": "DIR/flowers-102/{jpg/,imagelabels.mat,setid.mat} (needs scipy)",
    "stanford_cars": "DIR/stanford_cars/{cars_train/,cars_test/,devkit/,cars_test_annos_withlabels.mat} (needs scipy)",
}
# the folder torchvision looks for inside --data-path
_TRANSFER_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "flowers102": "flowers-102",
                     "stanford_cars": "stanford_cars"}


class _TorchvisionAdapter(Dataset):
    """Gives a torchvision dataset ``classes``/``targets`` and the wanted image mode."""

    def __init__(self, base: Dataset, classes: Sequence[str], targets: Sequence[int], in_chans: int,
                 transform: Optional[Callable]) -> None:
        self.base, self.classes, self.targets = base, list(classes), [int(t) for t in targets]
        self.mode, self.transform = _image_mode(in_chans), transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self.base[index]
        img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(target)


def _torchvision_transfer(name: str, root: Path, split: str, transform, in_chans: int) -> Dataset:
    import torchvision.datasets as tvd

    train = split == "train"
    # torchvision's default loader does not name a truncated file; ours raises DataError with its path
    loader = functools.partial(load_image, mode=_image_mode(in_chans))
    if name in ("flowers102", "stanford_cars"):
        try:
            import scipy.io  # noqa: F401
        except ImportError as exc:
            raise DataError(f"{name} needs scipy to read its .mat label files: pip install scipy") from exc
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            base = cls(str(root), train=train, download=False)
            return _TorchvisionAdapter(base, base.classes, base.targets, in_chans, transform)
        if name == "flowers102":
            # the paper's protocol trains on train+val (2,040 images) and tests on the 6,149 test images
            parts = ["train", "val"] if train else ["test"]
            bases = [tvd.Flowers102(str(root), split=p, download=False, loader=loader) for p in parts]
            base = torch.utils.data.ConcatDataset(bases)
            targets = [int(t) for b in bases for t in b._labels]
            return _TorchvisionAdapter(base, tvd.Flowers102.classes, targets, in_chans, transform)
        base = tvd.StanfordCars(str(root), split="train" if train else "test", download=False, loader=loader)
        return _TorchvisionAdapter(base, base.classes, [t for _, t in base._samples], in_chans, transform)
    except (RuntimeError, FileNotFoundError, OSError, ImportError) as exc:
        folder = _TRANSFER_FOLDERS[name]
        hint = (f" ({root} is the {folder} folder itself: pass its parent directory as --data-path)"
                if root.name == folder else "")
        raise DataError(
            f"{name} not found under {root} ({type(exc).__name__}: {exc}). Nothing is downloaded: place the data "
            f"as {_TRANSFER_LAYOUTS[name]}, or as an ImageFolder DIR/train/<class>/*.jpg + DIR/val/<class>/*.jpg"
            + hint
        ) from exc


def build_dataset(name: str, data_path: Optional[str], split: str, transform: Optional[Callable] = None,
                  in_chans: int = 3, class_names: Optional[Sequence[str]] = None) -> Dataset:
    """One split ('train' or 'val') of a named dataset; every dataset has ``classes`` and ``targets``.

    ``imagefolder`` reads ``data_path/<split>``; the transfer datasets use an ImageFolder layout when
    ``data_path/train`` exists, torchvision's own layout otherwise.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "bundled":
        return bundled_fashion_mnist(split, transform, in_chans)
    if not data_path:
        raise DataError(f"dataset {name!r} needs --data-path")
    root = Path(data_path)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if name == "fashion_mnist":
        return fashion_mnist_idx(root, split, transform, in_chans)
    if name == "imagefolder" or (root / "train").is_dir():
        split_dir = root / split
        if not split_dir.is_dir() and split == "val" and (root / "test").is_dir():
            split_dir = root / "test"
        if not split_dir.is_dir():
            raise DataError(f"split folder {split_dir} does not exist. Expected layout: {root}/train/<class>/*.jpg "
                            f"and {root}/val/<class>/*.jpg (one sub-folder per class)")
        return ImageFolderDataset(split_dir, transform, in_chans, class_names)
    return _torchvision_transfer(name, root, split, transform, in_chans)


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """Raise DataError when the train and val splits do not have the same class folders."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))

    def show(names: list[str]) -> str:
        return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "") or "none"

    raise DataError(
        f"train and val have different class folders: only in train: {show(only_train)}; only in val: "
        f"{show(only_val)}. Both splits need the same class sub-folders so that labels line up."
    )
