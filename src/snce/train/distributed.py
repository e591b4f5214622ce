"""Process-group set-up for single-process and ``torchrun`` runs (NCCL on GPU, gloo on CPU), and FSDP2 sharding.

The same script runs either way: without ``WORLD_SIZE`` in the environment it is one process; under
``torchrun --nproc_per_node N`` every process joins one group and only rank 0 writes files.

Sharding (``train.parallel: fsdp``, :func:`shard_model`) uses FSDP2 (``torch.distributed.fsdp.fully_shard``):
each parameter is split along its first dimension over the ranks (a DTensor), the optimizer and the EMA hold
only the local shards, and a unit's parameters are all-gathered when its forward starts and reduce-scattered
after its backward. A model names its units with ``shard_units()`` (a generator: one per transformer block);
everything else is the root unit. The root is gathered once per forward and, unlike the blocks, kept gathered
until its backward ends (``reshard_after_forward=False``): a generator's output head lives there, so the
chunked fused loss, which runs after the forward and reads ``head.weight`` block of rows after block of rows,
sees one full (K, H) tensor gathered once per micro-step, and its weight gradient is reduce-scattered once,
after the backward. It works on CPU with gloo (tested there) as on GPU with NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (idempotent); else a 1-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            # Evaluations run on rank 0 while the other ranks wait at the next collective: allow them hours.
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT
            )
    return DistInfo(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks (see the module docstring); returns it.

    Rank 0's parameters and buffers are broadcast first (as DDP does), so every rank shards the same weights.
    Parameter names, and so state dicts, stay as they were. Apply activation checkpointing and compilation
    before, and build the optimizer after (over the sharded parameters).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    units = model.shard_units() if hasattr(model, "shard_units") else []
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter, its gradient or optimizer state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (collective: every rank calls it), or ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out as ``like``: sharded the same way when ``like`` is a DTensor."""
    if not is_sharded(like):
        return full.to(device=like.device, dtype=like.dtype)
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global 2-norm of the gradients of ``params`` to ``max_norm``; returns the norm before clipping.

    Sharded gradients contribute their full norm (the total is reduced over ranks); plain ones as in
    ``torch.nn.utils.clip_grad_norm_``, which this equals for them.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = full_tensor(torch.nn.utils.get_total_norm(grads, 2.0))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
