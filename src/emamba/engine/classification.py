"""Image-classification train / eval loops and the distributed helpers behind ``emamba train``.

Reproducibility and exact resume: every random draw of a training step is a pure function of
``(seed, epoch, step, rank)`` and every augmentation of a sample a pure function of ``(seed, epoch,
sample index)``. :func:`seed_step` reseeds Python, NumPy and torch before each step and
:class:`SeededDataset` before each sample (in whichever DataLoader worker loads it), and
:class:`ResumableDistributedSampler` gives a per-epoch permutation that can skip the batches already done.
A run resumed from a checkpoint (end of epoch, or mid-epoch after SIGTERM) therefore sees the same
batches, augmentations, Mixup/MixToken boxes and drop-path masks as a run that never stopped.

Distributed evaluation: :class:`ShardSampler` gives rank r the indices r, r+W, r+2W... without padding,
so each validation image is counted exactly once; per-rank sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .fsdp import broadcast_buffers, is_fsdp, reshard

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "all_reduce_sum",
    "barrier",
    "derive_seed",
    "seed_everything",
    "SeededDataset",
    "ResumableDistributedSampler",
    "ShardSampler",
    "NonFiniteLossError",
    "TrainState",
    "train_one_epoch",
    "evaluate",
    "autocast_context",
]


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", device: Optional[str] = None, require_group: bool = False) -> DistInfo:
    """Set up the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl on GPU, gloo on CPU.

    ``require_group``: also create one for a single process (an in-memory store, no rendezvous), for code
    that needs a process group even then (FSDP).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else local_rank % max(torch.cuda.device_count(), 1)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if (world_size > 1 or require_group) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        if world_size == 1:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """Sum ``tensor`` over all ranks, in place.

    ``device``: where the collective runs (the rank's device). NCCL reduces only CUDA tensors, so CPU
    bookkeeping tensors (loss sums, counters) travel to the GPU and back; gloo takes them as they are.
    """
    if dist.is_available() and dist.is_initialized():
        if device is not None and tensor.device != torch.device(device):
            on_device = tensor.to(device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------- seeding
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends on every part (stable across runs, platforms and processes)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Reseeds Python/NumPy/torch from ``(seed, epoch, index)`` before loading each sample.

    Augmentations then do not depend on worker count, batch order or where a run was resumed.
    ``set_epoch`` must be called before each epoch's DataLoader iterator is created (workers get a copy
    of the dataset when the iterator starts; use non-persistent workers).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = derive_seed("sample", self.seed, self.epoch, index)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.default_generator.manual_seed(seed)  # CPU only: transforms never draw from CUDA generators
        return self.dataset[index]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (also for one process) that can skip the first ``skip`` indices of an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_skip(self, skip: int) -> None:
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Rank r of W gets indices r, r+W, ... in order: every sample on exactly one rank, no padding."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


# ------------------------------------------------------------------------------------------ train loop
class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp in ("", "none", None):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainState:
    """Counters that go into checkpoints alongside the module/optimizer states."""

    epoch: int = 0                 # completed epochs
    step_in_epoch: int = 0         # batches done in the current (incomplete) epoch
    global_step: int = 0           # optimizer updates so far
    epoch_loss_sum: float = 0.0    # sum of per-batch (rank-averaged) losses in the current epoch
    epoch_loss_count: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(
    *,
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_batches: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[..., Tensor],
    state: TrainState,
    dist_info: DistInfo,
    seed: int,
    mixup_fn: Optional[Callable] = None,
    token_label: bool = False,
    amp: str = "none",
    scaler: Optional[torch.amp.GradScaler] = None,
    clip_grad: Optional[float] = None,
    clip_mode: str = "norm",
    accum_steps: int = 1,
    model_ema: Optional[nn.Module] = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_step: Optional[Callable[[TrainState], None]] = None,
    progress: bool = True,
    desc: str = "",
    log_interval: int = 0,
) -> bool:
    """Run the rest of epoch ``state.epoch`` from batch ``state.step_in_epoch``; updates ``state``.

    Returns True when the epoch finished, False when it stopped early because ``stop_requested()`` became
    true on any rank (checked at optimizer-update boundaries, agreed on by all ranks).
    Raises NonFiniteLossError (on every rank) when the loss is NaN/Inf.
    """
    from timm.utils import dispatch_clip_grad

    device = dist_info.device
    fsdp = is_fsdp(model)
    model.train()
    start = state.step_in_epoch
    pbar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=num_batches, initial=start, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    window_loss, window_count = 0.0, 0
    finished = True
    t_start, logged_at = time.perf_counter(), start
    batch_idx = start
    for batch in loader:
        if batch_idx >= num_batches:
            break
        seed_everything(derive_seed("step", seed, state.epoch, batch_idx, dist_info.rank))
        if token_label:
            x, target, label_maps, coords = batch
            label_maps, coords = label_maps.to(device, non_blocking=True), coords.to(device, non_blocking=True)
        else:
            x, target = batch
            label_maps = coords = None
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        window_start = (batch_idx // accum_steps) * accum_steps
        window_len = min(accum_steps, num_batches - window_start)
        is_update = batch_idx + 1 == window_start + window_len
        sync = contextlib.nullcontext()
        if fsdp:
            if accum_steps > 1:  # FSDP2's no_sync: accumulate unsharded local grads, reduce on the last micro-step
                model.set_requires_gradient_sync(is_update)
        elif dist_info.distributed and not is_update:
            sync = model.no_sync()
        if fsdp and dist_info.distributed and batch_idx == window_start:
            # rank 0's buffers (BatchNorm statistics) to all ranks, where DDP does it: before the first forward
            # after a gradient-syncing one, i.e. at the start of each accumulation window
            broadcast_buffers(model)
        with sync:
            with autocast_context(device, amp):
                output = model(x)
                loss = loss_fn(output, target, label_maps, coords) if token_label else loss_fn(output, target)
            scaled = loss / window_len
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        window_loss += float(loss.detach())
        window_count += 1
        batch_idx += 1
        if not is_update:
            continue
        flags = torch.tensor([window_loss, float(window_count), 0.0 if math.isfinite(window_loss) else 1.0,
                              1.0 if stop_requested() else 0.0], dtype=torch.float64)
        all_reduce_sum(flags, device)
        if flags[2] > 0:
            if pbar is not None:
                pbar.close()
            raise NonFiniteLossError(
                f"loss is {window_loss if not math.isfinite(window_loss) else 'NaN/Inf on another rank'} at epoch "
                f"{state.epoch + 1}, batch {batch_idx}; stopping. Lower --lr, add --clip-grad, or use --amp bf16 "
                "instead of fp16")
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad:
            dispatch_clip_grad(_unwrap(model).parameters(), clip_grad, mode=clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        if model_ema is not None:
            model_ema.update(_unwrap(model), step=state.global_step)
        if scheduler is not None:
            scheduler.step_update(num_updates=state.global_step)
        state.epoch_loss_sum += float(flags[0]) / dist_info.world_size
        state.epoch_loss_count += int(flags[1]) // dist_info.world_size
        state.step_in_epoch = batch_idx
        window_loss, window_count = 0.0, 0
        if pbar is not None:
            pbar.update(int(flags[1]) // dist_info.world_size)
            pbar.set_postfix(loss=f"{state.epoch_loss_sum / max(state.epoch_loss_count, 1):.4f}",
                             lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if pbar is None and log_interval and dist_info.is_main and batch_idx - logged_at >= log_interval:
            rate = (batch_idx - start) * x.shape[0] * dist_info.world_size / (time.perf_counter() - t_start)
            print(f"{desc} batch {batch_idx}/{num_batches}: loss {state.epoch_loss_sum / max(state.epoch_loss_count, 1):.4f}"
                  f" lr {optimizer.param_groups[0]['lr']:.2e} {rate:.1f} img/s", flush=True)
            logged_at = batch_idx
        if on_step is not None:
            on_step(state)
        if flags[3] > 0 and batch_idx < num_batches:
            finished = False
            break
    if pbar is not None:
        pbar.close()
    return finished


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, dist_info: DistInfo, amp: str = "none",
             progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy over the whole (sharded) validation set.

    An FSDP-sharded model's forward is a collective, so there every rank runs as many forwards as the rank
    with the most batches (a rank that runs out forwards a dummy batch and drops the result); the forwards
    run under ``no_grad`` rather than ``inference_mode`` (FSDP keeps its unsharded parameters between calls).
    """
    model = _unwrap(model)
    fsdp = is_fsdp(model)
    was_training = model.training
    model.eval()
    device = dist_info.device
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct1, correct5, count
    pbar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=len(loader), desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    extra = 0
    if fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        # agree on the number of forwards *before* the first one (each forward is itself a collective)
        most = torch.tensor([len(loader)], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        extra = int(most) - len(loader)
    with torch.no_grad() if fsdp else torch.inference_mode():
        for x, target in loader:
            x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = model(x)
            logits = logits.float()
            sums[0] += float(F.cross_entropy(logits, target, reduction="sum"))
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk.eq(target[:, None])
            sums[1] += float(hits[:, :1].sum())
            sums[2] += float(hits.sum())
            sums[3] += target.shape[0]
            if pbar is not None:
                pbar.update(1)
        if extra > 0:  # this rank's shard has fewer batches: forward a dummy one to keep the collectives in step
            dummy = loader.dataset[0][0].unsqueeze(0).to(device)
            for _ in range(extra):
                with autocast_context(device, amp):
                    model(dummy)
    if fsdp:
        reshard(model)
    if pbar is not None:
        pbar.close()
    all_reduce_sum(sums, device)
    model.train(was_training)
    count = max(float(sums[3]), 1.0)
    return {"loss": float(sums[0]) / count, "top1": 100.0 * float(sums[1]) / count,
            "top5": 100.0 * float(sums[2]) / count, "count": int(sums[3])}
