"""Many processes on PyTorch's own engines: `torchrun` sets the environment, `init()` joins the
process group, `wrap()` hands the trained module to DDP (LoRA, small models) or FSDP2's
`fully_shard` (full fine-tuning of models that do not fit once per GPU).

    torchrun --nproc_per_node 8 --no-python sf train --preset oft-sf-libero-spatial
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc_per_node 8 --no-python sf train ...

One process without `torchrun` is the same code with `world == 1` and no wrapper. FSDP shards
every block the Hugging Face models of the policy name in `_no_split_modules` (decoder layers,
ViT layers), then the rest: no model-specific code here either.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> int:
    """The number of processes `torchrun` started (1 without it), known before any group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str) -> Dist:
    """Join the process group that `torchrun` describes (NCCL on CUDA, gloo on CPU); a no-op alone."""
    world = world_from_env()
    if world == 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while another still talks to it
    can abort at exit ("terminate called without an active exception"), so every rank waits first."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def block_classes(module: nn.Module) -> set[str]:
    """Class names of the blocks to shard: the union of `_no_split_modules` of every HF model inside."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    return names


def wrap(module: nn.Module, parallel: str, ctx: Dist, device: torch.device) -> nn.Module:
    """The module the optimiser and the backward pass see. `world == 1`: the module itself."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, found {parallel!r}")
    if ctx.world == 1:
        return module
    if parallel == "ddp":
        ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = block_classes(module)
    if not blocks:
        raise ValueError("parallel=fsdp: the policy names no blocks to shard (no _no_split_modules)")
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub)
    fully_shard(module)
    return module


def sync_gradients(wrapped: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on the micro-batches of an accumulation that are not the last."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def paused():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if world_from_env() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    if world_from_env() > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world_from_env() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_from_env() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded(wrapped: nn.Module) -> bool:
    return hasattr(wrapped, "set_requires_gradient_sync") and not isinstance(
        wrapped, nn.parallel.DistributedDataParallel)


def full_model_state(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU on rank 0 (a collective under FSDP: every rank must call it)."""
    if not is_sharded(wrapped):
        inner = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
        return inner.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, whole, on rank 0 (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(wrapped, optimizer, options=options)


def load_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `full_optimizer_state`, on every rank (each reads the same file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))
