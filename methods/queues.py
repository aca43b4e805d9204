"""Memory queues of keys (MoCo's dictionary; InsLoc keeps one per pyramid level)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryQueue(nn.Module):
    """A FIFO of ``size`` L2-normalised keys of dimension ``dim`` (He et al. 2020, Sec. 3.2),
    kept as buffers so it is saved with the model and moves with ``.to()``. With ``levels``
    each slot holds one key per level, (size, levels, dim), and one pointer serves them all."""

    def __init__(self, dim: int, size: int, seed: int = 0, levels: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shape = (size, dim) if levels is None else (size, levels, dim)
        self.register_buffer("keys", F.normalize(torch.randn(shape, generator=g), dim=-1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the oldest entries with ``k`` (N, dim) or (N, levels, dim), wrapping
        around the end."""
        k = F.normalize(k.detach(), dim=-1)
        n = k.shape[0]
        if n > self.size:
            k, n = k[-self.size:], self.size
        # the pointer stays a tensor: no host sync, and torch.compile traces it without a break
        idx = (torch.arange(n, device=k.device) + self.ptr) % self.size
        self.keys.index_copy_(0, idx, k.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)


class LevelQueues(MemoryQueue):
    """One queue per feature-pyramid level, advancing together (InsLoc Sec. 3.3; official
    ``insloc_fpn.py``: ``queues`` (levels, dim, K) with one ``queue_ptr``): ``keys`` is
    (size, levels, dim), ``enqueue`` takes (N, levels, dim), ``self[i]`` is level i's (size, dim)."""

    def __init__(self, dim: int, size: int, levels: int, seed: int = 0):
        super().__init__(dim, size, seed=seed, levels=levels)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.keys[:, i]
