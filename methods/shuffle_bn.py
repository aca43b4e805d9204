"""Per-process BatchNorm as a method fact, not a side effect of the process count.

MoCo v2 and InsLoc normalise each GPU's batch on its own (per-process BN), and Shuffle-BN
(He et al. 2020, MoCo Sec. 3.3) gives the key encoder its batch in a random order so that a
query and its key never share BatchNorm statistics (InsLoc permutes images and boxes together,
official ``shuffle_data=['img', 'bbox']``). The papers' GPU count is thus part of the training:
here a method value, ``groups`` BatchNorm groups of the global batch, of which each of the W
processes holds ``groups / W`` (``methods.dist.groups_per_process``), so 1, 2 or 8 processes
train alike. Group g is rows ``[g n / groups, (g + 1) n / groups)`` of the global batch (after
the shuffle, for keys); the shuffle is rank 0's permutation of the global batch (official
``_batch_shuffle_ddp``). The running statistics follow the first group only, as with DDP,
which broadcasts rank 0's buffers at every forward."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from methods.dist import distributed, gather, groups_per_process, rank_and_world


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics of ``module`` left as they are inside (a group after the
    first): momentum 0 instead of restoring them, which autograd would see as an in-place edit
    of tensors that the first group's backward reads."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, n) in zip(bns, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(n)


def in_bn_groups(module: nn.Module, fn: Callable[..., torch.Tensor], *xs: torch.Tensor, groups: int,
                 field: str = "bn_groups") -> torch.Tensor:
    """``fn(*xs)`` with this process's share of ``groups`` BatchNorm groups: its rows split
    into ``groups / W`` consecutive groups normalised separately, outputs concatenated in order.
    ``module`` owns the BatchNorms (running statistics from the process's first group only).
    A global batch of n takes at most n / 2 groups (BatchNorm needs two rows)."""
    n = xs[0].shape[0]
    groups = max(1, min(groups, n * rank_and_world()[1] // 2))   # BatchNorm needs 2 rows per group
    local = groups_per_process(groups, field)
    if n % local:
        raise ValueError(f"method.{field}: {n} images per process cannot form {local} equal BatchNorm groups")
    if local == 1:
        return fn(*xs)
    chunks = list(zip(*(x.chunk(local) for x in xs)))
    out = [fn(*chunks[0])]
    with running_stats_kept(module):
        out += [fn(*c) for c in chunks[1:]]
    return torch.cat(out)


@torch.no_grad()
def shuffle_bn(module: nn.Module, fn: Callable[..., torch.Tensor], *xs: torch.Tensor, groups: int,
               field: str = "shuffle_bn_splits") -> torch.Tensor:
    """``fn(*xs)`` computed with Shuffle-BN over ``groups`` BatchNorm groups of the global
    batch, returned in the original order. ``xs`` share their first (batch) dimension and are
    permuted together (InsLoc: images and boxes)."""
    n_local = xs[0].shape[0]
    full = [gather(x) for x in xs]
    perm = torch.randperm(full[0].shape[0], device=xs[0].device)   # every rank draws (same RNG stream)
    rank, _ = rank_and_world()
    if distributed():
        dist.broadcast(perm, src=0)
    mine = perm[rank * n_local:(rank + 1) * n_local]                 # this process's rows of the shuffle
    k = gather(in_bn_groups(module, fn, *(g[mine] for g in full), groups=groups, field=field))
    out = torch.empty_like(k)
    out[perm] = k                                                    # back in the global batch's order
    return out[rank * n_local:(rank + 1) * n_local]
