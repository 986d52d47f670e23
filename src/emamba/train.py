"""``emamba train`` / ``torchrun --nproc_per_node=N -m emamba.train``: image-classification training.

Precedence of settings: built-in defaults < ``--config FILE.yaml`` < flags given on the command line.
With neither ``--data-path`` nor ``--config`` (nor a ``--dataset`` other than ``bundled``) the bundled
recipe (:data:`BUNDLED_DEFAULTS`, also in ``configs/bundled_tiny.yaml``) trains ``emamba_tiny`` on the
bundled Fashion-MNIST subset. The effective settings are saved as ``config.yaml`` in the output directory.

Exit codes: 0 done, 1 training failed (NaN/Inf loss), 2 bad input (data, config, checkpoint, output
directory), 128 + signal number after SIGTERM/SIGINT (a resumable ``last.pth`` has been written).
See ``docs/training.md`` for the recipes, the file layout of a run and the multi-node command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import yaml

from .data.images import (DATASETS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, DataError, build_dataset,
                          check_same_classes)
from .engine.checkpoint import (FORMAT, CheckpointError, CheckpointManager, describe_key_mismatch, get_rng_state,
                                load_checkpoint, load_exact, load_weights, save_safetensors, set_rng_state, to_plain)
from .engine.classification import (DistInfo, NonFiniteLossError, ResumableDistributedSampler, SeededDataset,
                                    ShardSampler, TrainState, barrier, cleanup_distributed, derive_seed, evaluate,
                                    init_distributed, seed_everything, train_one_epoch)
from .engine.fsdp import (full_model_state_dict, full_optimizer_state_dict, fsdp_unavailable_reason,
                          load_full_optimizer_state_dict, shard_model, sharded_model_ema)

__all__ = ["main", "build_parser", "parse_args", "BUNDLED_DEFAULTS", "ConfigError"]

# The bundled default run: a small EMamba on 4,000 Fashion-MNIST images, a few minutes on a laptop CPU.
BUNDLED_DEFAULTS: dict[str, Any] = {
    "dataset": "bundled",
    "model": "emamba_tiny",
    "img_size": 32,
    "in_chans": 1,
    "mean": list(FASHION_MNIST_MEAN),
    "std": list(FASHION_MNIST_STD),
    "epochs": 4,
    "batch_size": 64,
    "lr": 0.016,  # x 64/512 -> 2e-3 effective
    "weight_decay": 0.05,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "min_lr": 1e-5,
    "drop_path": 0.0,
    "smoothing": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "aa": None,
    "color_jitter": 0.0,
    "reprob": 0.0,
    "scale": [0.7, 1.0],
    "ratio": [0.9, 1.1111],
    "train_interpolation": "bilinear",
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_workers": 0,
}


class ConfigError(ValueError):
    """A bad option value or config file."""


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emamba train", allow_abbrev=False,
        description="Train, fine-tune or evaluate an image classifier (EMamba or any timm model). "
                    "Without --data-path: the bundled Fashion-MNIST subset.")
    a = p.add_argument
    a("--config", default=None, help="YAML file of option values (keys = option names, '-' or '_')")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", "--data_path", "--data-dir", dest="data_path", default=None,
                   help="dataset root (ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*)")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="default: imagefolder with --data-path, bundled without")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training images")
    g.add_argument("--max-val-samples", type=int, default=None, help="use only the first N validation images")
    g.add_argument("--batch-size", "--batch_size", "-b", dest="batch_size", type=int, default=128,
                   help="per process (global batch = batch-size x processes x accum-steps)")
    g.add_argument("--num_workers", "--num-workers", "-j", dest="num_workers", type=int, default=4)
    g.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", action="store_true", default=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="emamba_s")
    g.add_argument("--num-classes", "--nb_classes", dest="num_classes", type=int, default=None,
                   help="default: the number of class folders")
    g.add_argument("--in-chans", dest="in_chans", type=int, default=3)
    g.add_argument("--img-size", "--input-size", "--input_size", dest="img_size", type=int, default=224,
                   help="square input size (a multiple of 32 for EMamba)")
    g.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=None)
    g.add_argument("--drop", type=float, default=None, help="dropout before the classifier (timm models)")
    g.add_argument("--grad-checkpointing", action="store_true")
    g = p.add_argument_group("optimizer and schedule (lr is scaled by global batch / --lr-base-size)")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs=2, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.05)
    g.add_argument("--layer-decay", type=float, default=None)
    g.add_argument("--lr", type=float, default=1e-3, help="base lr for a global batch of --lr-base-size")
    g.add_argument("--lr-base-size", type=int, default=512)
    g.add_argument("--lr-scale", type=_bool, default=True, help="scale --lr by global batch / --lr-base-size")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", type=_bool, default=True, help="update the lr every optimizer step")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=int, default=5)
    g.add_argument("--warmup-lr", "--warmup_lr", dest="warmup_lr", type=float, default=1e-6)
    g.add_argument("--min-lr", "--min_lr", dest="min_lr", type=float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment spec, or 'none'")
    g.add_argument("--color-jitter", "--color_jitter", dest="color_jitter", type=float, default=0.4)
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--interpolation", default="bicubic", help="eval resize interpolation")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--crop-pct", type=float, default=0.96, help="eval centre-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g = p.add_argument_group("precision and stability")
    g.add_argument("--amp", nargs="?", const="bf16", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast dtype (bare --amp = bf16); fp16 uses a GradScaler")
    g.add_argument("--clip-grad", "--clip_grad", dest="clip_grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    g.add_argument("--accum-steps", "--grad-accum-steps", dest="accum_steps", type=int, default=1)
    g.add_argument("--model-ema", "--model_ema", dest="model_ema", action="store_true", default=False)
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    g.add_argument("--model-ema-decay", "--model_ema_decay", dest="model_ema_decay", type=float, default=0.99996)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)
    g = p.add_argument_group("token labeling")
    g.add_argument("--token-label", "--token_label", dest="token_label", action="store_true", default=False)
    g.add_argument("--token-label-size", "--token_label_size", dest="token_label_size", type=int, default=None,
                   help="label-map grid the model sees (must be img-size / 32; checked)")
    g.add_argument("--token-label-data", "--token_label_data", dest="token_label_data", default=None,
                   help="directory of dense maps DIR/<class>/<image stem>.pt (see make-token-labels)")
    g.add_argument("--token-label-scores", default="auto", choices=["auto", "prob", "logit"])
    g.add_argument("--dense-weight", "--dense_weight", dest="dense_weight", type=float, default=0.5)
    g.add_argument("--cls-weight", "--cls_weight", dest="cls_weight", type=float, default=1.0)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", "--output-dir", "--output", dest="output_dir", default=None,
                   help="default: outputs/<model>-<dataset>-<time>")
    g.add_argument("--resume", default=None, help="training state to continue from (e.g. OUT/last.pth)")
    g.add_argument("--finetune", default=None, help="weights to start from; a differing classifier is replaced")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints with pickled objects (torch.load weights_only=False)")
    g.add_argument("--eval", action="store_true", help="only evaluate (the model of --resume/--finetune)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--keep-checkpoints", type=int, default=3, help="per-epoch checkpoints to keep")
    g.add_argument("--stop-epoch", type=int, default=None,
                   help="stop after this many completed epochs as if interrupted (the schedule still spans --epochs)")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--dist-backend", default="auto", help="auto = nccl on GPU, gloo on CPU")
    g.add_argument("--fsdp", action="store_true", default=False,
                   help="shard the model, gradients and optimizer state with FSDP2 (one unit per residual block) "
                        "instead of replicating it with DDP; EMamba models (see docs/training.md)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no tqdm bars; print a line every --log-interval batches instead")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch compatibility; LOCAL_RANK is used
    return p


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Defaults < config file (or the bundled recipe) < explicit command-line flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--data-path", "--data_path", "--data-dir", dest="data_path")
    pre.add_argument("--dataset")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        config = _load_yaml(known.config)
    elif not known.data_path and known.dataset in (None, "bundled"):
        config = dict(BUNDLED_DEFAULTS)
    else:
        config = {}
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - dests)
    if unknown:
        raise ConfigError(f"unknown option(s) in {known.config or 'the bundled recipe'}: {', '.join(unknown)}")
    config.pop("config", None)
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.config = known.config
    if args.dataset is None:
        args.dataset = "imagefolder" if args.data_path else "bundled"
    if isinstance(args.aa, str) and args.aa.lower() in ("none", "", "null"):
        args.aa = None
    return args


# ----------------------------------------------------------------------------------------- helpers
def _log(dist_info: DistInfo, *msg: Any) -> None:
    if dist_info.is_main:
        print(*msg, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    if args.model.startswith("emamba"):
        from .models.emamba import check_image_size

        check_image_size(args.img_size, args.img_size)
    for name in ("batch_size", "epochs", "accum_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.fsdp and not args.model.startswith("emamba"):
        raise ConfigError(f"--fsdp shards EMamba models (one FSDP unit per residual block); train {args.model} "
                          "with DDP (without --fsdp)")
    if args.fsdp and args.clip_grad and args.clip_mode == "agc":
        raise ConfigError("--clip-mode agc is not supported with --fsdp (use --clip-mode norm or value)")
    if args.token_label and not args.model.startswith("emamba"):
        raise ConfigError("--token-label needs an EMamba model (it uses the token-label aux head and MixToken)")
    if args.token_label and args.token_label_size and args.token_label_size * 32 != args.img_size:
        raise ConfigError(f"--token-label-size {args.token_label_size} does not match the model's last-stage grid "
                          f"{args.img_size // 32} (img-size {args.img_size} / 32)")


def _prepare_output_dir(args: argparse.Namespace, rank: int) -> Path:
    if not args.output_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.output_dir = str(Path("outputs") / f"{args.model}-{args.dataset}-{stamp}")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{rank}-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output directory {out}: {type(exc).__name__}: {exc}") from None
    return out


def _mean_std(args: argparse.Namespace, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(args.mean or cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(args.std or cfg.get("std", (0.229, 0.224, 0.225)))
    if args.in_chans == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) not in (1, args.in_chans) or len(std) not in (1, args.in_chans):
        raise ConfigError(f"--mean/--std need 1 or {args.in_chans} values")
    return mean, std


def build_transforms(args: argparse.Namespace, mean, std, train: bool):
    from timm.data import create_transform

    size = (args.in_chans, args.img_size, args.img_size)
    if not train:
        return create_transform(size, is_training=False, interpolation=args.interpolation, mean=mean, std=std,
                                crop_pct=args.crop_pct)
    if args.token_label:
        from .engine.token_labels import TokenLabelTransform

        return TokenLabelTransform(args.img_size, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                                   color_jitter=args.color_jitter or None, auto_augment=args.aa,
                                   interpolation=args.train_interpolation, mean=mean, std=std, re_prob=args.reprob,
                                   re_mode=args.remode, re_count=args.recount)
    return create_transform(size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
                            hflip=args.hflip, color_jitter=args.color_jitter or None, auto_augment=args.aa,
                            interpolation=args.train_interpolation, mean=mean, std=std, re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount)


def _subset(dataset, n: Optional[int]):
    if n is None or n >= len(dataset):
        return dataset
    sub = torch.utils.data.Subset(dataset, range(n))
    sub.classes, sub.targets = dataset.classes, dataset.targets[:n]
    return sub


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    import timm

    import emamba  # noqa: F401  (registers the EMamba models)

    if args.model not in timm.list_models():
        raise ConfigError(f"unknown model {args.model!r}; EMamba models: {', '.join(timm.list_models('emamba_*'))}")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=args.in_chans)
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    if args.drop is not None:
        kwargs["drop_rate"] = args.drop
    if args.model.startswith("emamba"):
        kwargs["token_label"] = bool(args.token_label)
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    return tuple(f"{n}." for n in names)


def load_finetune_weights(model: nn.Module, path: str, trusted: bool = False) -> list[str]:
    """Load weights for fine-tuning; classifier keys whose shape differs are dropped and returned.

    Anything else that does not fit (missing or unexpected keys, other shape mismatches: a checkpoint
    from another model) raises CheckpointError listing the keys.
    """
    from .models import EMamba, checkpoint_filter_fn

    state = load_weights(path, trusted=trusted)
    if isinstance(model, EMamba):
        state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    heads = _head_prefixes(model)
    dropped, mismatched = [], []
    for key in list(state):
        if key in own and tuple(state[key].shape) != tuple(own[key].shape):
            (dropped if key.startswith(heads) else mismatched).append(key)
        elif key not in own and key.startswith(heads):
            dropped.append(key)  # e.g. an aux_head the model was built without
    if mismatched:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:8])
        raise CheckpointError(f"checkpoint {path} does not fit this model: shape mismatch in {detail}")
    for key in dropped:
        del state[key]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not fit model {type(model).__name__}: "
                              + describe_key_mismatch(missing, result.unexpected_keys))
    return dropped


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the training loop checks between optimizer steps."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step and writing a resumable "
              "checkpoint", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.signum is not None


SUMMARY_FIELDS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_loss", "ema_val_top1",
                  "ema_val_top5", "val_images", "lr", "train_time_s", "eval_time_s", "train_imgs_per_s"]


class SummaryLog:
    """``summary.csv`` + ``summary.jsonl`` (one row per epoch) and ``curves.png`` in the output directory."""

    def __init__(self, out: Path, keep_epochs_up_to: Optional[int]) -> None:
        self.csv, self.jsonl, self.png = out / "summary.csv", out / "summary.jsonl", out / "curves.png"
        self.rows: list[dict[str, Any]] = []
        if keep_epochs_up_to is not None and self.jsonl.exists():
            with open(self.jsonl) as f:
                self.rows = [r for r in (json.loads(line) for line in f if line.strip())
                             if r.get("epoch", 0) <= keep_epochs_up_to]
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        with open(self.jsonl, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore").writerow(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.plot()

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            return
        epochs = [r["epoch"] for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(epochs, [r["train_loss"] for r in self.rows], "o-", label="train loss")
        ax1.plot(epochs, [r["val_loss"] for r in self.rows], "s-", label="val loss")
        ax2.plot(epochs, [r["val_top1"] for r in self.rows], "o-", label="val top-1")
        if any(r.get("ema_val_top1") is not None for r in self.rows):
            ax2.plot(epochs, [r.get("ema_val_top1") for r in self.rows], "s--", label="EMA val top-1")
        for ax, title in ((ax1, "loss"), (ax2, "top-1 (%)")):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".curves.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)

    def table(self) -> str:
        lines = [f"{'epoch':>5} {'train loss':>10} {'val loss':>9} {'top-1':>7} {'top-5':>7} {'EMA top-1':>9} "
                 f"{'lr':>9} {'train s':>8} {'img/s':>7}"]
        for r in self.rows:
            ema = f"{r['ema_val_top1']:9.2f}" if r.get("ema_val_top1") is not None else f"{'-':>9}"
            lines.append(f"{r['epoch']:>5} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['val_top1']:>7.2f} "
                         f"{r['val_top5']:>7.2f} {ema} {r['lr']:>9.2e} {r['train_time_s']:>8.1f} "
                         f"{r['train_imgs_per_s']:>7.1f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fsdp and fsdp_unavailable_reason():
        raise ConfigError(f"--fsdp: {fsdp_unavailable_reason()}")
    dist_info = init_distributed(args.dist_backend, args.device, require_group=args.fsdp)
    device = dist_info.device
    out = _prepare_output_dir(args, dist_info.rank)
    seed_everything(derive_seed("init", args.seed))

    # ---------------------------------------------------------------- data
    train_ds = build_dataset(args.dataset, args.data_path, args.train_split, None, args.in_chans)
    val_ds = build_dataset(args.dataset, args.data_path, args.val_split, None, args.in_chans)
    check_same_classes(train_ds.classes, val_ds.classes)
    num_classes = args.num_classes or len(train_ds.classes)
    if num_classes < len(train_ds.classes):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(train_ds.classes)} classes found")
    args.num_classes = num_classes

    model = create_model(args, num_classes)
    mean, std = _mean_std(args, model)
    val_ds.transform = build_transforms(args, mean, std, train=False)
    if args.token_label:
        from .engine.token_labels import TokenLabelDataset, TokenLabelLoss

        train_ds = TokenLabelDataset(train_ds, build_transforms(args, mean, std, train=True), args.token_label_data)
    else:
        train_ds.transform = build_transforms(args, mean, std, train=True)
    train_ds, val_ds = _subset(train_ds, args.max_train_samples), _subset(val_ds, args.max_val_samples)

    # ---------------------------------------------------------------- weights
    resume_state: Optional[dict[str, Any]] = None
    if args.resume:
        resume_state = load_checkpoint(args.resume, trusted=args.trust_checkpoint)
        if resume_state.get("format") != FORMAT:
            if not args.eval:
                raise CheckpointError(f"checkpoint {args.resume} is not an emamba training state (no optimizer/epoch); "
                                      "use --finetune to start from plain weights")
            load_exact(model, load_weights(args.resume, trusted=args.trust_checkpoint), args.resume)
            resume_state = None
        else:
            saved_from = resume_state.get("model_name")
            what = f"saved from {saved_from!r}, this run builds {args.model!r}" if saved_from != args.model else "model"
            load_exact(model, resume_state["model"], args.resume, what)
    elif args.finetune:
        dropped = load_finetune_weights(model, args.finetune, trusted=args.trust_checkpoint)
        _log(dist_info, f"fine-tuning from {args.finetune}" + (
            f"; classifier replaced, dropped keys: {', '.join(dropped)}" if dropped else ""))
    model.to(device)

    # EMA: a copy of the unsharded model (FSDP modules cannot be deep-copied); under --fsdp that copy is then
    # sharded exactly like the model, so its update is a local lerp of matching shards
    model_ema = None
    if args.model_ema and not args.eval:
        ema_cls = sharded_model_ema if args.fsdp else ModelEmaV3
        model_ema = ema_cls(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if resume_state is not None:
            if resume_state.get("model_ema") is not None:
                load_exact(model_ema.module, resume_state["model_ema"], args.resume, "model_ema")
            else:
                _log(dist_info, "note: the checkpoint has no EMA weights; the EMA starts from the resumed model")
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist_info.world_size,))
        shard_model(model, mesh)
        if model_ema is not None:
            shard_model(model_ema.module, mesh)

    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, pin_memory=args.pin_mem,
        sampler=ShardSampler(len(val_ds), dist_info.world_size, dist_info.rank))

    if args.eval:
        if not (args.resume or args.finetune):
            _log(dist_info, "warning: --eval without --resume/--finetune evaluates a randomly initialised model")
        metrics = evaluate(model, val_loader, dist_info, args.amp, progress=args.progress)
        _log(dist_info, f"* {args.model} on {args.dataset} {args.val_split} ({metrics['count']} images): "
                        f"top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  loss {metrics['loss']:.4f}")
        if dist_info.is_main:
            with open(out / "eval.json", "w") as f:
                json.dump({"model": args.model, "checkpoint": args.resume or args.finetune, **metrics}, f, indent=1)
        return 0

    # ---------------------------------------------------------------- optimisation
    global_batch = args.batch_size * dist_info.world_size * args.accum_steps
    lr = args.lr * global_batch / args.lr_base_size if args.lr_scale else args.lr
    opt_kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    train_sampler = ResumableDistributedSampler(train_ds, dist_info.world_size, dist_info.rank, shuffle=True,
                                                seed=args.seed, drop_last=True)
    num_batches = train_sampler.num_samples // args.batch_size
    if num_batches == 0:
        raise ConfigError(f"batch size {args.batch_size} x {dist_info.world_size} process(es) is larger than the "
                          f"{len(train_ds)} training images")
    updates_per_epoch = math.ceil(num_batches / args.accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    scaler = None
    if args.amp == "fp16":
        if args.fsdp:  # agrees on inf/NaN across ranks: each rank only sees its own gradient shards
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device.type)
        else:
            scaler = torch.amp.GradScaler(device.type)

    mixup_fn = None
    mixup_active = (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and not args.token_label
    if args.token_label and (args.mixup > 0 or args.cutmix > 0):
        _log(dist_info, "note: Mixup/CutMix are off under --token-label (MixToken in the model mixes instead)")
    if mixup_active:
        if args.batch_size % 2:
            raise ConfigError("Mixup/CutMix need an even --batch-size")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    if args.token_label:
        grid = (args.img_size // 32, args.img_size // 32)
        loss_fn: nn.Module = TokenLabelLoss(num_classes, args.cls_weight, args.dense_weight, args.smoothing,
                                            args.token_label_scores, grid)
    elif mixup_active:
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    state = TrainState()
    if resume_state is not None:
        if args.fsdp:
            try:
                load_full_optimizer_state_dict(model, optimizer, resume_state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint {args.resume}: the optimizer state does not fit this run "
                                      f"({type(exc).__name__}: {exc})") from None
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        for key in state.as_dict():
            if key in resume_state:
                setattr(state, key, type(getattr(state, key))(resume_state[key]))
        if "rng" in resume_state:
            set_rng_state(resume_state["rng"])
        if state.step_in_epoch and (resume_state.get("world_size"), resume_state.get("batch_size")) != (
                dist_info.world_size, args.batch_size):
            _log(dist_info, "warning: resuming mid-epoch with a different world size or batch size; the rest of "
                            "this epoch is not the same as in the interrupted run")
        _log(dist_info, f"resumed from {args.resume}: {state.epoch} epoch(s) done"
                        + (f" + {state.step_in_epoch} batches" if state.step_in_epoch else ""))
        if state.epoch >= num_epochs:
            _log(dist_info, f"{args.resume} already finished all {num_epochs} epochs; nothing to do")
            return 0

    if dist_info.distributed and not args.fsdp:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    unwrapped = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    ckpt = CheckpointManager(out, keep=args.keep_checkpoints)
    summary = None
    tb = None
    if dist_info.is_main:
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump(to_plain(vars(args)), f, sort_keys=True)
        summary = SummaryLog(out, keep_epochs_up_to=state.epoch if resume_state is not None else None)
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # like summary.csv: hide points of epochs after the resumed one (or all, on a fresh run) that an
                # earlier run into this directory logged, so a resumed curve has one point per epoch
                tb = SummaryWriter(str(out / "tensorboard"), purge_step=state.epoch + 1)
            except ImportError:
                print("warning: --tensorboard needs the tensorboard package (pip install tensorboard); skipped",
                      file=sys.stderr)
        n_params = sum(p.numel() for p in unwrapped.parameters())
        print(f"model {args.model} ({n_params / 1e6:.2f}M params, {num_classes} classes, {args.in_chans}x"
              f"{args.img_size}x{args.img_size}) | data {args.dataset}: {len(train_ds)} train / {len(val_ds)} val | "
              f"{dist_info.world_size} process(es) on {device.type}, global batch {global_batch}, lr {lr:.3g} | "
              f"output {out}", flush=True)

    def gather_weights(with_optimizer: bool = True) -> dict[str, Any]:
        """Full (unsharded) model, EMA and optimizer states. Under --fsdp a collective: every rank must call it,
        and only rank 0 gets the tensors (on CPU); with DDP they are the live state dicts."""
        if args.fsdp:
            return {"model": full_model_state_dict(model),
                    "model_ema": full_model_state_dict(model_ema.module) if model_ema is not None else None,
                    "optimizer": full_optimizer_state_dict(model, optimizer) if with_optimizer else None}
        return {"model": unwrapped.state_dict(),
                "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                "optimizer": optimizer.state_dict() if with_optimizer else None}

    def training_state(weights: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": 1, "model_name": args.model, "num_classes": num_classes,
            "model": weights["model"], "model_ema": weights["model_ema"],
            "optimizer": weights["optimizer"], "scheduler": to_plain(scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            **state.as_dict(), "world_size": dist_info.world_size, "batch_size": args.batch_size,
            "rng": get_rng_state(), "args": to_plain(vars(args)), "classes": list(train_ds.classes),
        }

    stop = _SignalFlag()
    exit_code = 0
    with stop:
        try:
            for epoch in range(state.epoch, num_epochs):
                train_sampler.set_epoch(epoch)
                train_sampler.set_skip(state.step_in_epoch * args.batch_size)
                seeded = SeededDataset(train_ds, args.seed)
                seeded.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(
                    seeded, batch_size=args.batch_size, sampler=train_sampler, num_workers=args.num_workers,
                    pin_memory=args.pin_mem, drop_last=True, persistent_workers=False)
                steps_before = state.step_in_epoch
                t0 = time.perf_counter()
                finished = train_one_epoch(
                    model=model, loader=loader, num_batches=num_batches, optimizer=optimizer, scheduler=scheduler,
                    loss_fn=loss_fn, state=state, dist_info=dist_info, seed=args.seed, mixup_fn=mixup_fn,
                    token_label=args.token_label, amp=args.amp, scaler=scaler, clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode, accum_steps=args.accum_steps, model_ema=model_ema,
                    stop_requested=stop, progress=args.progress, desc=f"epoch {epoch + 1}/{num_epochs}",
                    log_interval=args.log_interval)
                train_time = time.perf_counter() - t0
                if not finished:
                    weights = gather_weights()
                    if dist_info.is_main:
                        path = ckpt.save(training_state(weights), epoch_end=False, is_best=False)
                        print(f"interrupted in epoch {epoch + 1} after {state.step_in_epoch}/{num_batches} batches; "
                              f"resumable checkpoint: {path} (continue with --resume {path})", flush=True)
                    barrier()
                    return 128 + (stop.signum or signal.SIGTERM)
                train_loss = state.epoch_loss_sum / max(state.epoch_loss_count, 1)
                images = (num_batches - steps_before) * args.batch_size * dist_info.world_size
                scheduler.step(epoch + 1)
                t1 = time.perf_counter()
                metrics = evaluate(model, val_loader, dist_info, args.amp, progress=args.progress)
                ema_metrics = (evaluate(model_ema.module, val_loader, dist_info, args.amp)
                               if model_ema is not None else None)
                eval_time = time.perf_counter() - t1
                state.epoch, state.step_in_epoch = epoch + 1, 0
                state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
                is_best = metrics["top1"] > state.best_top1
                if is_best:
                    state.best_top1, state.best_epoch = metrics["top1"], epoch + 1
                weights = gather_weights()
                if dist_info.is_main:
                    ckpt.save(training_state(weights), epoch_end=True, is_best=is_best)
                    if is_best:
                        meta = {"model": args.model, "epoch": str(epoch + 1), "val_top1": f"{metrics['top1']:.3f}"}
                        save_safetensors(weights["model"], out / "best.safetensors", meta)
                        if model_ema is not None:
                            save_safetensors(weights["model_ema"], out / "best_ema.safetensors", meta)
                    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": metrics["loss"],
                           "val_top1": metrics["top1"], "val_top5": metrics["top5"],
                           "ema_val_loss": ema_metrics["loss"] if ema_metrics else None,
                           "ema_val_top1": ema_metrics["top1"] if ema_metrics else None,
                           "ema_val_top5": ema_metrics["top5"] if ema_metrics else None,
                           "val_images": metrics["count"], "lr": optimizer.param_groups[0]["lr"],
                           "train_time_s": train_time,
                           "eval_time_s": eval_time, "train_imgs_per_s": images / max(train_time, 1e-9)}
                    summary.add(row)
                    if tb is not None:
                        for key, value in row.items():
                            if key != "epoch" and value is not None:
                                tb.add_scalar(key, value, epoch + 1)
                    ema_note = f" | EMA top-1 {ema_metrics['top1']:.2f}" if ema_metrics else ""
                    print(f"epoch {epoch + 1}/{num_epochs}: train loss {train_loss:.4f} | val loss "
                          f"{metrics['loss']:.4f} top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}{ema_note} | "
                          f"{train_time:.1f}s train, {eval_time:.1f}s eval", flush=True)
                barrier()
                if stop():
                    _log(dist_info, f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch + 1}; "
                                    f"resume with --resume {ckpt.last}")
                    return 128 + stop.signum
                if args.stop_epoch is not None and epoch + 1 >= args.stop_epoch and epoch + 1 < num_epochs:
                    _log(dist_info, f"stopping after epoch {epoch + 1} as asked by --stop-epoch; resume with "
                                    f"--resume {ckpt.last}")
                    return 0
        except NonFiniteLossError as exc:
            good = ckpt.last if ckpt.last.exists() else None
            _log(dist_info, f"error: {exc}. " + (f"The last good checkpoint is {good} (epoch {state.epoch}); it was "
                                                 "not overwritten." if good else "No checkpoint was written yet."))
            exit_code = 1
        finally:
            if tb is not None:
                tb.close()
    if exit_code:
        return exit_code
    weights = gather_weights(with_optimizer=False)
    if dist_info.is_main:
        save_safetensors(weights["model"], out / "last.safetensors", {"model": args.model})
        print("\n" + summary.table())
        print(f"best val top-1 {state.best_top1:.2f} at epoch {state.best_epoch} | files in {out}: last.pth, best.pth, "
              f"best.safetensors, last.safetensors, summary.csv, summary.jsonl, curves.png, config.yaml", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"emamba train: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (DataError, CheckpointError, ConfigError) as exc:
        print(f"emamba train: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if "multiples of" in str(exc):  # EMamba's image-size check
            print(f"emamba train: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
