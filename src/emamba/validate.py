"""``emamba validate``: top-1 / top-5 / loss of a checkpoint on a validation split (like timm's validate.py).

The model, input size, channels, normalisation and eval crop default to what the training run used when
the checkpoint is an ``emamba train`` training state (they are stored in it); pass them explicitly for a
plain state dict or safetensors file. Runs on one process or under torchrun (every image counted once).

    emamba validate --checkpoint OUT/best.pth --data-path IMAGENET
    emamba validate --model emamba_s --checkpoint weights.safetensors --data-path IMAGENET --img-size 224
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .data.images import DATASETS, DataError, build_dataset
from .engine.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .engine.classification import ShardSampler, cleanup_distributed, evaluate, init_distributed

__all__ = ["main"]

# options that default to the training run's value when the checkpoint carries its args
_FROM_TRAINING = ("model", "dataset", "img_size", "in_chans", "num_classes", "mean", "std", "crop_pct",
                  "interpolation", "token_label")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emamba validate", description=__doc__.split("\n")[0], allow_abbrev=False)
    a = p.add_argument
    a("--checkpoint", required=True, help="training state (.pth), state dict or .safetensors")
    a("--data-path", "--data_path", "--data-dir", dest="data_path", default=None,
      help="dataset root (DIR/<split>/<class>/*); omit for the bundled Fashion-MNIST subset")
    a("--dataset", default=None, choices=DATASETS)
    a("--split", default="val")
    a("--model", default=None)
    a("--img-size", type=int, default=None)
    a("--in-chans", type=int, default=None)
    a("--num-classes", type=int, default=None)
    a("--mean", type=float, nargs="+", default=None)
    a("--std", type=float, nargs="+", default=None)
    a("--crop-pct", type=float, default=None)
    a("--interpolation", default=None)
    a("--use-ema", action="store_true", help="evaluate the EMA weights of a training state")
    a("--batch-size", "-b", type=int, default=128)
    a("--num-workers", "--num_workers", "-j", dest="num_workers", type=int, default=4)
    a("--max-samples", type=int, default=None)
    a("--amp", nargs="?", const="bf16", default="none", choices=["none", "bf16", "fp16"])
    a("--device", default=None)
    a("--trust-checkpoint", action="store_true")
    a("--results-file", default=None, help="also write the metrics as JSON here")
    a("--no-progress", dest="progress", action="store_false", default=True)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .train import _mean_std, build_transforms, create_model

    state = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}
    defaults = {"model": "emamba_s", "dataset": None, "img_size": 224, "in_chans": 3, "num_classes": None,
                "mean": None, "std": None, "crop_pct": 0.96, "interpolation": "bicubic", "token_label": False}
    cfg = argparse.Namespace(**{k: getattr(args, k, None) if getattr(args, k, None) is not None
                                else saved.get(k, defaults[k]) for k in _FROM_TRAINING})
    cfg.drop_path = cfg.drop = None
    cfg.grad_checkpointing = False
    dataset_name = args.dataset or ("imagefolder" if args.data_path else (cfg.dataset or "bundled"))
    if dataset_name == "imagefolder" and not args.data_path:
        dataset_name = "bundled"
    dataset = build_dataset(dataset_name, args.data_path, args.split, None, cfg.in_chans)
    num_classes = cfg.num_classes or len(dataset.classes)
    model = create_model(cfg, num_classes)
    weights_key = "model_ema" if args.use_ema else "model"
    load_model_weights(model, state, args.checkpoint, use_ema=args.use_ema)
    dist_info = init_distributed("auto", args.device)
    model.to(dist_info.device)
    cfg.mean, cfg.std = args.mean or cfg.mean, args.std or cfg.std
    mean, std = _mean_std(cfg, model)
    dataset.transform = build_transforms(cfg, mean, std, train=False)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(args.max_samples))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         sampler=ShardSampler(len(dataset), dist_info.world_size, dist_info.rank))
    metrics = evaluate(model, loader, dist_info, args.amp, progress=args.progress, desc="validate")
    result_row = {"model": cfg.model, "checkpoint": str(args.checkpoint), "weights": weights_key,
                  "dataset": dataset_name, "split": args.split, "img_size": cfg.img_size, **metrics}
    if dist_info.is_main:
        print(f"* {cfg.model} ({weights_key} weights of {args.checkpoint}) on {dataset_name}/{args.split}, "
              f"{metrics['count']} images: top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  "
              f"loss {metrics['loss']:.4f}", flush=True)
        if args.results_file:
            Path(args.results_file).write_text(json.dumps(result_row, indent=1))
    return result_row


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .train import ConfigError

    try:
        run(args)
        return 0
    except (DataError, CheckpointError, ConfigError) as exc:
        print(f"emamba validate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
