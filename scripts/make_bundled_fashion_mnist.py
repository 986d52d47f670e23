"""Rebuild the bundled Fashion-MNIST subset (src/emamba/data/bundled/fashion_mnist_small/fashion_mnist_small.npz).

Usage: python scripts/make_bundled_fashion_mnist.py [--source /work/shared/data/fashion-mnist]
Selection: a fixed permutation (numpy default_rng(0)) of each split, then the first TRAIN_PER_CLASS images
of every class from the 60k training split and the first VAL_PER_CLASS images of every class from the
10k test split, in their original order within each class.
"""

import argparse
import gzip
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 400
VAL_PER_CLASS = 100
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
OUT = Path(__file__).resolve().parents[1] / "src/emamba/data/bundled/fashion_mnist_small/fashion_mnist_small.npz"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(len(labels))
    chosen = [np.sort(order[labels[order] == c][:per_class]) for c in range(len(CLASSES))]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="/work/shared/data/fashion-mnist")
    src = Path(parser.parse_args().source)
    rng = np.random.default_rng(0)
    xtr, ytr = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    itr, ite = pick(ytr, TRAIN_PER_CLASS, rng), pick(yte, VAL_PER_CLASS, rng)
    np.savez_compressed(
        OUT, x_train=xtr[itr], y_train=ytr[itr], x_val=xte[ite], y_val=yte[ite],
        train_source_index=itr.astype(np.int32), val_source_index=ite.astype(np.int32), classes=np.array(CLASSES),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(itr)} train, {len(ite)} val")


if __name__ == "__main__":
    main()
