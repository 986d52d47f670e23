"""Training checkpoints: atomic writes, ``weights_only``-loadable state, safetensors export, keep-N.

A training state is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects), so
``torch.load(path, weights_only=True)`` reads it. Files written by :func:`atomic_save` appear complete or
not at all: the data goes to a temporary file in the same directory, is fsync'ed, then renamed over the
target with :func:`os.replace`, and the directory entry is fsync'ed. A crash mid-write leaves the
previous checkpoint untouched.

Layout written by the trainer in ``output_dir``::

    last.pth                  newest training state (resume from this)
    checkpoint-<epoch>.pth    one per epoch, the newest ``keep`` kept (hard links to last.pth when possible)
    best.pth                  training state of the best epoch by validation top-1
    best.safetensors          that epoch's model weights (EMA weights in best_ema.safetensors)
    last.safetensors          model weights at the end of training
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "load_checkpoint",
    "save_safetensors",
    "load_weights",
    "CheckpointManager",
    "get_rng_state",
    "set_rng_state",
    "to_plain",
    "describe_key_mismatch",
]

FORMAT = "emamba-train-state"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", trusted: bool = False) -> dict[str, Any]:
    """Read a checkpoint (``.pth``/``.pt`` with ``weights_only=True`` or ``.safetensors``).

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, or (without
    ``trusted``) when it holds pickled Python objects that ``weights_only`` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated, or not a torch.save file "
                              "(not a zip archive; files from PyTorch < 1.6 must be re-saved)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trusted)
    except __import__("pickle").UnpicklingError as exc:
        message = str(exc)
        if "weights_only" in message.lower() or "unsupported global" in message.lower():
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects that torch.load(weights_only=True) refuses "
                f"({message.splitlines()[0]}). If you trust the file, pass --trust-checkpoint to load it anyway."
            ) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> Path:
    """Export model weights as safetensors (atomically); shared/non-contiguous tensors are copied."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    return atomic_write_bytes(save(tensors, metadata=metadata), path)


def load_weights(path: str | os.PathLike, trusted: bool = False) -> dict[str, Tensor]:
    """Model weights from a training state (``model``), a raw state dict or a safetensors file."""
    obj = load_checkpoint(path, trusted=trusted)
    for key in ("model", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    return obj


def describe_key_mismatch(missing: Iterable[str], unexpected: Iterable[str], limit: int = 12) -> str:
    def show(keys: list[str]) -> str:
        if not keys:
            return "none"
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing, unexpected = sorted(missing), sorted(unexpected)
    return f"missing keys ({len(missing)}): {show(missing)}; unexpected keys ({len(unexpected)}): {show(unexpected)}"


def load_exact(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str | os.PathLike,
               what: str = "model", target: str = "this model") -> None:
    """``load_state_dict`` that fails with :class:`CheckpointError` listing missing and unexpected keys."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {source} ({what}) does not fit {target}: "
                              + describe_key_mismatch(result.missing_keys, result.unexpected_keys))


def load_model_weights(model: torch.nn.Module, state: Mapping[str, Any], source: str | os.PathLike,
                       use_ema: bool = False, target: Optional[str] = None) -> None:
    """Load the weights of a training state (``model`` or ``model_ema``) or a plain state dict, strictly.

    EMamba models first pass them through :func:`emamba.models.checkpoint_filter_fn` (original SiMBA
    layout); a mismatch raises :class:`CheckpointError` (see :func:`load_exact`) naming ``target`` (default:
    the model's architecture or class name).
    """
    from ..models import EMamba, checkpoint_filter_fn

    key = "model_ema" if use_ema else "model"
    if use_ema and not isinstance(state.get(key), dict):
        raise CheckpointError(f"checkpoint {source} has no EMA weights (train with --model-ema)")
    weights = state[key] if isinstance(state.get(key), dict) else state
    if isinstance(model, EMamba):
        weights = checkpoint_filter_fn(weights, model)
    name = target or getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    try:
        load_exact(model, weights, source, key, name)
    except CheckpointError:
        raise
    except RuntimeError as exc:  # shape mismatches (e.g. another class count) raise even when not strict
        raise CheckpointError(f"checkpoint {source} ({key}) does not fit {name}: {exc}") from None


# ------------------------------------------------------------------------------------------------ RNG
def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as weights_only-loadable plain types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def to_plain(value: Any) -> Any:
    """Convert argparse values (Paths, tuples, numpy scalars...) to YAML/weights_only-safe plain types."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


# ------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes last / per-epoch (keep newest N) / best checkpoints into one directory."""

    EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pth$")

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.directory / "last.pth"

    @property
    def best(self) -> Path:
        return self.directory / "best.pth"

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"checkpoint-{epoch}.pth"

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self.EPOCH_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        """Make ``dst`` hold ``src``'s bytes, atomically (hard link to a temp name, then rename)."""
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)

    def save(self, state: dict[str, Any], epoch_end: bool, is_best: bool) -> Path:
        """Write ``last.pth``; at an epoch end also ``checkpoint-<epoch>.pth`` (and ``best.pth``)."""
        atomic_save(state, self.last)
        if epoch_end:
            if self.keep > 0:
                self._link_or_copy(self.last, self.epoch_path(int(state["epoch"])))
                for _, old in self.epoch_checkpoints()[: -self.keep]:
                    old.unlink(missing_ok=True)
            if is_best:
                self._link_or_copy(self.last, self.best)
        return self.last

    def others(self, exclude: Path) -> list[Path]:
        """Other readable-looking checkpoints in the directory, newest first (for error messages)."""
        paths = [p for _, p in reversed(self.epoch_checkpoints())] + [self.best, self.last]
        return [p for p in paths if p.exists() and p.resolve() != Path(exclude).resolve()]
