"""The few collectives a method's forward needs (no-ops in one process): the global batch is
split over processes, and what a method computes over it must not depend on the split."""
from __future__ import annotations

import torch
import torch.distributed as dist

from methods.config import ConfigError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' ``x`` concatenated in rank order (``x`` itself in one process)."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over processes (``x`` in one process). A loss normalised by a count
    of the global batch divides by this mean of the per-process counts: DDP's gradient
    average then equals the one-process loss (mmdet ``reduce_mean(num_pos)``)."""
    if not distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def groups_per_process(groups: int, field: str) -> int:
    """A method's number of groups of the global batch (BatchNorm groups, loss pools) that
    each process holds: ``groups`` must be a multiple of the process count."""
    _, world = rank_and_world()
    if groups % world:
        raise ConfigError(f"method.{field}: {groups} groups of the global batch cannot be split over "
                         f"{world} processes (a multiple of {world} is needed: set --set method.{field}=N)")
    return groups // world
