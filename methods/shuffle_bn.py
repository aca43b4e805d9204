"""Shuffle-BN (He et al. 2020, MoCo Sec. 3.3): the key encoder sees its batch in a random
order so that a query and its key never share BatchNorm statistics. Used by MoCo v2 (images)
and InsLoc (images and their boxes, official ``shuffle_data=['img', 'bbox']``).

Distributed: the batch is gathered, permuted (rank 0's permutation, broadcast) and split
back, as the official MoCo ``_batch_shuffle_ddp``. One process: the batch is permuted and
split into ``splits`` groups normalised separately."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' ``x`` concatenated in rank order (``x`` itself in one process)."""
    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def shuffle_across_processes(*xs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This process's slice of the globally permuted batch, for every tensor in ``xs`` (same
    permutation), and the index that undoes it."""
    n_local = xs[0].shape[0]
    gathered = [gather(x) for x in xs]
    perm = torch.randperm(gathered[0].shape[0], device=xs[0].device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    r = dist.get_rank()
    return [g[perm][r * n_local:(r + 1) * n_local] for g in gathered], unshuffle


@torch.no_grad()
def unshuffle_across_processes(k: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    n_local = k.shape[0]
    ks = gather(k)
    r = dist.get_rank()
    return ks[unshuffle][r * n_local:(r + 1) * n_local]


@torch.no_grad()
def shuffle_bn(fn: Callable[..., torch.Tensor], *xs: torch.Tensor, splits: int = 2) -> torch.Tensor:
    """``fn(*xs)`` computed with Shuffle-BN, returned in the original order. ``xs`` share their
    first (batch) dimension and are permuted together (InsLoc: images and boxes)."""
    if _distributed():
        shuffled, unshuffle = shuffle_across_processes(*xs)
        return unshuffle_across_processes(fn(*shuffled), unshuffle)
    n = xs[0].shape[0]
    splits = max(1, min(splits, n // 2 or 1))
    perm = torch.randperm(n, device=xs[0].device)
    groups = zip(*(x[perm].chunk(splits) for x in xs))
    k = torch.cat([fn(*g) for g in groups])
    out = torch.empty_like(k)
    out[perm] = k
    return out
