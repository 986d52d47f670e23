"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``emamba train --fsdp``.

* :func:`shard_model` makes every residual block of an EMamba model (the blocks of the four stages and the
  class block) one FSDP unit and the root module (stem, downsamplers, stage norms, final norm, heads) the
  last one, on a 1-D device mesh over all processes.
* Checkpoints keep the single-file format a DDP run writes: :func:`full_model_state_dict` and
  :func:`full_optimizer_state_dict` gather full, unsharded CPU tensors on rank 0 through
  ``torch.distributed.checkpoint.state_dict`` (a collective: every rank must call them; ranks other
  than 0 get empty dicts). The optimizer state is re-keyed from parameter names to the integer ids of
  ``optimizer.state_dict()``, so the file is indistinguishable from a DDP one and either kind of run
  resumes from the other (:func:`load_full_optimizer_state_dict`).
* Buffers (the stem's BatchNorm statistics) are not sharded. DDP broadcasts rank 0's buffers before a
  training forward that follows a gradient-syncing one; the trainer calls :func:`broadcast_buffers` at
  the same points, so running statistics, evaluation and the saved buffers follow DDP's.
* EMA (:func:`sharded_model_ema`): timm's ModelEmaV3 built from the unsharded model, its copy then
  sharded like the model, so each update lerps matching local shards without communication.
* Every forward of a sharded model is a collective (the blocks all-gather their parameters), so ranks
  must run the same number of forwards; the evaluation loop pads with dummy batches (see
  :func:`emamba.engine.classification.evaluate`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["fsdp_unavailable_reason", "is_fsdp", "shard_model", "reshard", "broadcast_buffers", "sharded_model_ema",
           "full_model_state_dict", "full_optimizer_state_dict", "load_full_optimizer_state_dict"]


def fsdp_unavailable_reason() -> str | None:
    """None when this torch build has FSDP2, else why not."""
    if not dist.is_available():
        return "this PyTorch build has no torch.distributed"
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
        from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        return f"this PyTorch ({torch.__version__}) has no FSDP2 API ({exc}); PyTorch >= 2.6 is needed"
    return None


def is_fsdp(model: nn.Module) -> bool:
    """True for a module sharded by :func:`shard_model` (any ``fully_shard``-ed module)."""
    if not dist.is_available():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard an EMamba model in place: each EMambaBlock and the ClassBlock, then the root module."""
    from torch.distributed.fsdp import fully_shard

    from ..models.emamba import ClassBlock, EMamba, EMambaBlock

    if not isinstance(model, EMamba):
        raise TypeError(f"FSDP sharding is implemented for EMamba models, got {type(model).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, (EMambaBlock, ClassBlock))]
    for block in blocks:  # bottom-up: the blocks first, the root takes the remaining parameters
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Free any unsharded parameters (the root keeps its own after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers to every rank (what DDP does before each training forward)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in model.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for buffers in by_dtype.values():  # one collective per dtype
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def sharded_model_ema(model: nn.Module, **kwargs: Any) -> nn.Module:
    """timm's ModelEmaV3 of the *unsharded* ``model``, for an EMA copy that is to be sharded like the model.

    Call it before sharding the model (FSDP modules cannot be deep-copied), load any EMA weights into its
    ``.module``, then ``shard_model(ema.module, mesh)``. The EMA parameters are then DTensors laid out exactly
    like the model's, so an update is a local lerp of matching shards (no communication; the EMA takes
    1/world-size of the memory too). Parameters (DTensors) and buffers (plain tensors) are lerped in
    separate foreach calls, which cannot mix the two.
    """
    from timm.utils import ModelEmaV3
    from torch.distributed.tensor import DTensor

    class ShardedModelEmaV3(ModelEmaV3):
        @torch.no_grad()
        def apply_update_(self, model: nn.Module, decay: float) -> None:
            groups: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {True: ([], []), False: ([], [])}
            for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
                if ema_v.is_floating_point():
                    ema_values, model_values = groups[isinstance(ema_v, DTensor)]
                    ema_values.append(ema_v)
                    model_values.append(model_v)
                else:
                    ema_v.copy_(model_v)
            for ema_values, model_values in groups.values():
                if ema_values:
                    self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)

    return ShardedModelEmaV3(model, **kwargs)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 (``{}`` on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of ``optimizer.state_dict()``'s integer ids."""
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state on CPU in ``optimizer.state_dict()``'s layout (integer parameter ids).

    Rank 0 gets it, other ranks ``{}``; every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    names = _param_names(model, optimizer)
    full = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in full["state"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state_dict: Mapping[str, Any]) -> None:
    """Load a full optimizer state (the layout of ``optimizer.state_dict()``) into a sharded model's optimizer.

    Every rank passes the full state (each rank reads the checkpoint); each keeps its own shards.
    Raises ValueError when the state does not fit the optimizer (another model or optimizer).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    saved_groups = list(state_dict["param_groups"])
    saved_sizes = [len(g["params"]) for g in saved_groups]
    own_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise ValueError(f"the saved optimizer has parameter groups of sizes {saved_sizes}, this one {own_sizes}")
    saved_ids = [i for g in saved_groups for i in g["params"]]
    rename = dict(zip(saved_ids, names))  # as Optimizer.load_state_dict: matched by position
    if set(state_dict["state"]) - set(rename):
        raise ValueError("the saved optimizer state refers to parameters that its groups do not list")
    by_name = {
        "state": {rename[i]: value for i, value in state_dict["state"].items()},
        "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in saved_groups],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options(full_state_dict=True))
