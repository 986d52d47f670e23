"""Shared helpers for the training tests: tiny, fast runs of emamba_tiny at 32x32 on 1 thread."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# every in-process run: small subsets, one thread, no progress bars
FAST = ["--threads", "1", "--no-progress", "--num_workers", "0"]
# the smallest EMamba-TS `emamba forecast` trains in a test, on one thread
FORECAST_TINY = ["--d_model", "8", "--e_layers", "1", "--d_ff", "16", "--d_state", "4", "--num_threads", "1"]


ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundled_arrays():
    from emamba.data.images import BUNDLED_FILE

    with np.load(BUNDLED_FILE) as data:
        return {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val")}


def make_image_folder(root: Path, classes=(0, 1, 2), per_class: int = 6, val_per_class: int = 3,
                      size: int | None = None, rgb: bool = True) -> Path:
    """Write real Fashion-MNIST images from the bundled subset as DIR/{train,val}/class_<k>/*.png."""
    arrays = bundled_arrays()
    for split, count in (("train", per_class), ("val", val_per_class)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for c in classes:
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, idx in enumerate(np.flatnonzero(y == c)[:count]):
                img = Image.fromarray(x[idx])
                if size:
                    img = img.resize((size, size), Image.BILINEAR)
                if rgb:
                    img = img.convert("RGB")
                img.save(folder / f"img_{i:03d}.png")
    return root


def write_custom_csv(path: Path, rows: int = 700) -> None:
    """A small TSLib "custom" CSV (hourly ``date``, two variables and the target ``OT``) with daily cycles."""
    t = np.arange(rows, dtype=np.float64)
    rng = np.random.default_rng(0)
    pd.DataFrame({
        "date": pd.date_range("2021-01-01", periods=rows, freq="h"),
        "load": np.sin(2 * np.pi * t / 24) + 0.05 * rng.standard_normal(rows),
        "temp": np.cos(2 * np.pi * t / 24) + 0.05 * rng.standard_normal(rows),
        "OT": np.sin(2 * np.pi * t / 24 + 1) + 0.01 * t / rows + 0.05 * rng.standard_normal(rows),
    }).to_csv(path, index=False)
