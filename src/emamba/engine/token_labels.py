"""Token labeling (LV-ViT / TokenLabeling): dense label maps, their transforms, the loss and a generator.

**Map format** (the TokenLabeling repository's): one file per training image,
``LABEL_DIR/<class folder>/<image file stem>.pt``, holding a float tensor of shape ``(2, K, H, W)``:
``[0]`` the top-K class scores and ``[1]`` the matching class indices (stored as floats) at every cell of
an H x W grid over the *whole* image. Scores may be probabilities (what ``emamba make-token-labels``
writes) or logits; ``--token-label-scores auto`` treats a map with negative values or top-K sums above 1
as logits (softmax over the K entries), anything else as probabilities (renormalised over the K entries).

**Transforms**: the image's random crop and horizontal flip are recorded per sample as
``(top, left, height, width, flipped)`` in fractions of the image; :func:`dense_targets` applies the same
flip and crop to the dense map with ``roi_align`` and resamples it to the model's last-stage grid. The
photometric augmentations (colour jitter, RandAugment's colour ops, random erasing) leave labels as they
are; RandAugment's geometric ops (rotate, shear, translate) are left out under token labeling because
they would move pixels without moving the labels.

**Loss** (:class:`TokenLabelLoss`): ``cls_weight * CE(cls_logits, cls_target) + dense_weight *
mean_tokens CE(aux_logits, dense_target)``, both soft-target cross-entropies with label smoothing. The
class target is the ground-truth label (smoothed); MixToken's box (from the model) mixes it with the
flipped batch in proportion to the box area. The model already swaps the aux outputs of the box back, so
each token is scored against its own image's dense label. Without label maps, each token's target is its
image's class target (token labeling with hard labels).

``emamba make-token-labels --teacher MODEL [--checkpoint CKPT] --data-path DIR --out DIR`` writes maps in
this format from any timm model: the teacher sees each whole image resized to its input size, its
classifier is applied to every position of the final feature map, and the top-K softmax scores are kept.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data.images import DataError, ImageFolderDataset

__all__ = [
    "TokenLabelTransform",
    "TokenLabelDataset",
    "label_path",
    "dense_targets",
    "soft_cross_entropy",
    "TokenLabelLoss",
    "teacher_dense_logits",
    "main",
]

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


# ------------------------------------------------------------------------------------------ transforms
class TokenLabelTransform:
    """Train transform that reports its crop and flip: ``img -> (tensor, coords)``.

    ``coords = [top, left, height, width, flipped]`` (fractions of the source image; the flip is applied
    first, then the crop, in the flipped frame). Built from timm's pieces: RandomResizedCrop parameters,
    colour jitter or a photometric-only RandAugment, ToTensor/Normalize and RandomErasing.
    """

    def __init__(self, img_size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, color_jitter: Optional[float] = 0.4, auto_augment: Optional[str] = None,
                 interpolation: str = "bicubic", mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), re_prob: float = 0.0, re_mode: str = "pixel",
                 re_count: int = 1) -> None:
        from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, rand_augment_transform
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
        from torchvision import transforms as T

        self.size = (img_size, img_size)
        self.crop = RandomResizedCropAndInterpolation(img_size, scale=tuple(scale), ratio=tuple(ratio),
                                                      interpolation=interpolation)
        self.hflip = hflip
        self.interp = str_to_interp_mode(interpolation if interpolation != "random" else "bicubic")
        self.photometric: Optional[Callable] = None
        if auto_augment:
            if not auto_augment.startswith("rand"):
                raise ValueError("under token labeling only RandAugment ('rand-...') is supported as --aa")
            ops = _RAND_INCREASING_TRANSFORMS if "inc1" in auto_augment else _RAND_TRANSFORMS
            hparams = dict(translate_const=int(img_size * 0.45),
                           img_mean=tuple(min(255, round(255 * x)) for x in mean))
            self.photometric = rand_augment_transform(auto_augment, hparams,
                                                      transforms=[o for o in ops if o not in GEOMETRIC_OPS])
        elif color_jitter:
            self.photometric = T.ColorJitter(*(float(color_jitter),) * 3)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(torch.tensor(mean), torch.tensor(std))])
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu") if re_prob > 0 else None

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        from torchvision.transforms import functional as TF

        flipped = random.random() < self.hflip
        if flipped:
            img = TF.hflip(img)
        if self.photometric is not None:
            img = self.photometric(img)
        top, left, height, width = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        img_w, img_h = img.size
        img = TF.resized_crop(img, top, left, height, width, list(self.size), self.interp)
        x = self.to_tensor(img)
        if self.erase is not None:
            x = self.erase(x)
        coords = torch.tensor([top / img_h, left / img_w, height / img_h, width / img_w, float(flipped)])
        return x, coords


def label_path(label_root: str | os.PathLike, image_path: str | os.PathLike) -> Path:
    """``LABEL_DIR/<class folder>/<image stem>.pt`` for ``.../<class folder>/<image file>``."""
    image_path = Path(image_path)
    return Path(label_root) / image_path.parent.name / (image_path.stem + ".pt")


class TokenLabelDataset(torch.utils.data.Dataset):
    """An ImageFolder split whose samples come with their dense label maps.

    Items: ``(image, target, label_map (2, K, H, W) or an empty tensor, coords (5,))``. Without
    ``label_root`` the label map is empty and the loss uses the class label for every token.
    """

    def __init__(self, base: torch.utils.data.Dataset, transform: TokenLabelTransform,
                 label_root: Optional[str | os.PathLike] = None) -> None:
        self.base, self.transform = base, transform
        base.transform = None  # this dataset applies the (coordinate-reporting) transform itself
        self.label_root = Path(label_root) if label_root else None
        self.classes, self.targets = base.classes, base.targets
        if self.label_root is not None:
            if not hasattr(base, "samples"):
                raise DataError("--token-label-data needs an ImageFolder dataset (maps are stored per image file)")
            if not self.label_root.is_dir():
                raise DataError(f"token-label directory {self.label_root} does not exist (expected "
                                f"{self.label_root}/<class>/<image stem>.pt; write one with `emamba make-token-labels`)")
            missing = [p for p, _ in base.samples[:1] if not label_path(self.label_root, p).is_file()]
            if missing:
                raise DataError(f"no token-label map for {missing[0]}: expected {label_path(self.label_root, missing[0])}")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor, Tensor]:
        from ..data.images import load_image

        if self.label_root is None:  # any dataset that returns (PIL image, target) without a transform
            img, target = self.base[index]
            x, coords = self.transform(img)
            return x, target, torch.empty(0), coords
        path, target = self.base.samples[index]
        img = load_image(path, self.base.mode)
        x, coords = self.transform(img)
        lpath = label_path(self.label_root, path)
        try:
            label_map = torch.load(lpath, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read token-label map {lpath}: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(label_map, Tensor) and label_map.dim() == 4 and label_map.shape[0] == 2):
            raise DataError(f"token-label map {lpath} must be a (2, K, H, W) tensor, got "
                            f"{getattr(label_map, 'shape', type(label_map).__name__)}")
        return x, target, label_map.float(), coords


# -------------------------------------------------------------------------------------- dense targets
def _scores_to_probs(scores: Tensor, mode: str) -> Tensor:
    """(B, K, H, W) top-K scores -> probabilities over the K entries."""
    if mode == "auto":
        mode = "logit" if bool((scores < 0).any()) or bool((scores.sum(1) > 1.0 + 1e-3).any()) else "prob"
    if mode == "logit":
        return scores.softmax(dim=1)
    if mode != "prob":
        raise ValueError(f"token-label score type must be auto, prob or logit, not {mode!r}")
    return scores.clamp_min(0) / scores.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)


def dense_targets(label_maps: Tensor, coords: Tensor, num_classes: int, grid: tuple[int, int],
                  score_type: str = "auto") -> Tensor:
    """Crop/flip the dense maps like the images and resample to ``grid``: (B, grid_h * grid_w, classes).

    ``label_maps``: (B, 2, K, H, W) top-K scores and indices over the whole image; ``coords``: (B, 5)
    ``[top, left, height, width, flipped]`` from :class:`TokenLabelTransform`.
    """
    from torchvision.ops import roi_align

    batch, _, _, height, width = label_maps.shape
    probs = _scores_to_probs(label_maps[:, 0], score_type)
    index = label_maps[:, 1].round().long()
    if int(index.min()) < 0 or int(index.max()) >= num_classes:
        raise ValueError(f"token-label maps hold class indices up to {int(index.max())}, but the model has "
                         f"{num_classes} classes")
    full = torch.zeros(batch, num_classes, height, width, dtype=probs.dtype, device=probs.device)
    full.scatter_add_(1, index, probs)
    flipped = coords[:, 4] > 0.5
    if bool(flipped.any()):
        full = torch.where(flipped[:, None, None, None], full.flip(-1), full)
    top, left, crop_h, crop_w = (coords[:, i].to(full) for i in range(4))
    boxes = torch.stack([torch.arange(batch, device=full.device, dtype=full.dtype), left * width, top * height,
                         (left + crop_w) * width, (top + crop_h) * height], dim=1)
    out = roi_align(full, boxes, output_size=grid, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    out = out / out.sum(1, keepdim=True).clamp_min(1e-12)
    return out.flatten(2).transpose(1, 2)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of -sum(target * log_softmax(logits)); any leading shape."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(target: Tensor, num_classes: int, smoothing: float) -> Tensor:
    off = smoothing / num_classes
    return torch.full((target.shape[0], num_classes), off, device=target.device).scatter_(
        1, target.view(-1, 1), 1.0 - smoothing + off)


class TokenLabelLoss(nn.Module):
    """cls_weight * soft CE(class output) + dense_weight * soft CE(aux tokens), label smoothing, MixToken."""

    def __init__(self, num_classes: int, cls_weight: float = 1.0, dense_weight: float = 0.5, smoothing: float = 0.1,
                 score_type: str = "auto", grid: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.num_classes, self.cls_weight, self.dense_weight = num_classes, cls_weight, dense_weight
        self.grid = grid
        self.smoothing, self.score_type = smoothing, score_type

    def forward(self, output: tuple[Tensor, Tensor, tuple[int, int, int, int]], target: Tensor,
                label_maps: Optional[Tensor] = None, coords: Optional[Tensor] = None) -> Tensor:
        """``output`` = the model's train-mode (cls_logits, aux_logits (B, N, C), box); ``target`` = class
        indices (B,) or soft class targets (B, C)."""
        cls_logits, aux_logits, box = output
        batch, tokens, classes = aux_logits.shape
        if target.dim() == 1:
            cls_target = smooth_one_hot(target, classes, self.smoothing)
        else:
            cls_target = target.float()
        if label_maps is not None and label_maps.numel() > 0:
            grid = self.grid or _square_grid(tokens)
            dense = dense_targets(label_maps, coords, classes, grid, self.score_type)
            dense = dense * (1.0 - self.smoothing) + self.smoothing / classes
        else:
            dense = cls_target[:, None, :].expand(batch, tokens, classes)
        top, left, bottom, right = box
        area = max(bottom - top, 0) * max(right - left, 0)
        if area > 0:
            lam = 1.0 - area / tokens
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        loss_cls = soft_cross_entropy(cls_logits, cls_target)
        loss_dense = soft_cross_entropy(aux_logits, dense.to(aux_logits.device))
        return self.cls_weight * loss_cls + self.dense_weight * loss_dense


def _square_grid(tokens: int) -> tuple[int, int]:
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise ValueError(f"cannot infer the token grid of {tokens} aux tokens; use square images")
    return side, side


# ------------------------------------------------------------------------------------- teacher labels
def teacher_dense_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Class logits at every position of the teacher's final feature map: (B, C, h, w).

    Works for timm models whose ``forward_features`` returns a (B, C, h, w) map (CNNs: the head is
    applied per position through ``forward_head`` on 1x1 maps) or a token sequence (ViTs, EMamba: the
    classifier - EMamba's token-label aux head when present - is applied to the patch tokens).
    """
    feats = model.forward_features(x)
    if feats.dim() == 4:
        batch, channels, h, w = feats.shape
        cells = feats.permute(0, 2, 3, 1).reshape(batch * h * w, channels, 1, 1)
        logits = model.forward_head(cells)
        return logits.reshape(batch, h, w, -1).permute(0, 3, 1, 2)
    if feats.dim() == 3:
        from ..models import EMamba

        prefix = getattr(model, "num_prefix_tokens", None)
        prefix = int(prefix) if prefix is not None else (1 if isinstance(model, EMamba) else 0)
        tokens = feats[:, prefix:]
        side = int(round(math.sqrt(tokens.shape[1])))
        if side * side != tokens.shape[1]:
            raise ValueError(f"teacher gives {tokens.shape[1]} tokens; token labels need a square grid")
        head = getattr(model, "aux_head", None)
        head = head if head is not None else model.get_classifier()
        if hasattr(model, "fc_norm") and not isinstance(model.fc_norm, nn.Identity):
            tokens = model.fc_norm(tokens)
        logits = head(tokens)
        return logits.transpose(1, 2).reshape(x.shape[0], -1, side, side)
    raise ValueError(f"teacher forward_features returned shape {tuple(feats.shape)}; need (B,C,h,w) or (B,N,C)")


def _parse_make_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emamba make-token-labels",
                                description="Write TokenLabeling-format dense label maps from a timm teacher.")
    p.add_argument("--teacher", required=True, help="timm model name, e.g. resnet50 or emamba_s")
    p.add_argument("--checkpoint", default=None, help="teacher weights (.pth training state/state dict or "
                   ".safetensors); without it the teacher is randomly initialised (only useful for testing)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--data-path", required=True, help="ImageFolder root with train/<class>/*")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output directory: OUT/<class>/<image stem>.pt")
    p.add_argument("--img-size", type=int, default=None, help="teacher input size (default: the teacher's)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=None, help="default: number of class folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--grid", type=int, default=None, help="resample the maps to GRID x GRID (default: the "
                   "teacher's own feature grid)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", "--num_workers", type=int, default=2, dest="num_workers")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="rewrite maps that already exist")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """``emamba make-token-labels``."""
    import timm
    from torchvision import transforms as T

    import emamba  # noqa: F401  (registers the EMamba models)

    from .checkpoint import CheckpointError, describe_key_mismatch, load_weights

    args = _parse_make_args(argv)
    try:
        dataset = ImageFolderDataset(Path(args.data_path) / args.split, in_chans=args.in_chans)
        num_classes = args.num_classes or len(dataset.classes)
        if args.teacher not in timm.list_models():
            raise ValueError(f"unknown teacher model {args.teacher!r} (see timm.list_models())")
        model = timm.create_model(args.teacher, pretrained=False, num_classes=num_classes, in_chans=args.in_chans)
        if args.checkpoint:
            state = load_weights(args.checkpoint, trusted=args.trust_checkpoint)
            if args.teacher.startswith("emamba"):
                from ..models import checkpoint_filter_fn

                state = checkpoint_filter_fn(state, model)
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise CheckpointError(f"teacher checkpoint {args.checkpoint} does not fit {args.teacher}: "
                                      + describe_key_mismatch(result.missing_keys, result.unexpected_keys))
        else:
            print("warning: no --checkpoint given; the teacher is randomly initialised (maps are only good for "
                  "testing the pipeline)", file=sys.stderr)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"emamba make-token-labels: error: {exc}", file=sys.stderr)
        return 2
    cfg = model.pretrained_cfg
    size = args.img_size or cfg.get("input_size", (3, 224, 224))[-1]
    mean = tuple(args.mean or cfg.get("mean", (0.485, 0.456, 0.406)))[: args.in_chans]
    std = tuple(args.std or cfg.get("std", (0.229, 0.224, 0.225)))[: args.in_chans]
    dataset.transform = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                                   T.Normalize(mean, std)])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    index_loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    out_root = Path(args.out)
    written = skipped = 0
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    iterator = tqdm(index_loader, desc="token labels", unit="batch") if tqdm else index_loader
    with torch.inference_mode():
        for x, indices in iterator:
            logits = teacher_dense_logits(model, x.to(device)).float()
            if args.grid:
                logits = F.interpolate(logits, size=(args.grid, args.grid), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            k = min(args.topk, probs.shape[1])
            scores, classes = probs.topk(k, dim=1)
            maps = torch.stack([scores, classes.float()], dim=1).cpu()  # (B, 2, K, h, w)
            for label_map, i in zip(maps, indices.tolist()):
                dst = label_path(out_root, dataset.samples[i][0])
                if dst.exists() and not args.overwrite:
                    skipped += 1
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                torch.save(label_map.clone(), dst)
                written += 1
    grid = tuple(maps.shape[-2:]) if written or skipped else None
    print(f"wrote {written} token-label maps ({skipped} existing kept) to {out_root}: shape (2, {k}, "
          f"{grid[0] if grid else '?'}, {grid[1] if grid else '?'}) per image, teacher {args.teacher} at {size}px")
    return 0


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, base: ImageFolderDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.base[i][0], i


if __name__ == "__main__":
    sys.exit(main())
