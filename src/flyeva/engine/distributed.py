"""torchrun-style process groups and model wrapping: DDP, ZeRO stage 1, FSDP2."""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "zero1", "fsdp")


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR); a no-op for one process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a copy; identity for one process)."""
    values = values.clone()
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's shard units: every block of every ModuleList named `*blocks` (an encoder's `blocks`, a
    detector's `backbone.net.blocks`, a CLIP text tower's `resblocks`); the root is wrapped last."""
    return [
        block
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1].endswith("blocks") and isinstance(module, (nn.ModuleList, nn.Sequential))
        for block in module
    ]


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP for `ddp`/`zero1` (ZeRO-1 shards only the optimizer), FSDP2 `fully_shard` for `fsdp`."""
    model.to(device)
    if not dist.is_initialized():
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in shard_units(model):
            fully_shard(block)  # one shard unit per transformer block, as FSDP users do for ViTs
        return fully_shard(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_sync_context(model: nn.Module, sync: bool) -> Any:
    """Skip the gradient all-reduce on micro-steps that are not the last of an accumulation."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)  # FSDP2
    return nullcontext()
