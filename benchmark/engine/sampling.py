"""Resumable, rank-sharded batch sampling: batch ``s`` is a pure function of (seed, s)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ResumableBatchSampler:
    """Infinite batch sampler over ``n`` items yielding lists of ``(epoch, index)``.

    Epoch ``e`` is a permutation drawn from ``Generator(seed, e)``; the stream is the
    concatenation of the epochs, and global batch ``s`` is items ``[s*B, (s+1)*B)`` of it
    (``B = global_batch``), so starting at any step reproduces the same batches, whatever the
    process count: process ``rank`` of ``world_size`` takes its contiguous slice of B / W.
    Datasets derive their augmentation RNG from ``(seed, epoch, index)``: results do not
    depend on the DataLoader workers or the rank.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise ValueError("ResumableBatchSampler: the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"ResumableBatchSampler: global batch {global_batch} is not divisible by "
                             f"{world_size} processes")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.batch_size = global_batch // world_size   # this process's
        self.start_step, self.shuffle = start_step, shuffle
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_b = self.global_batch
        pos = self.start_step * global_b
        epoch, off = divmod(pos, self.n)
        perm = self._perm(epoch)
        while True:
            items = []
            while len(items) < global_b:
                take = min(global_b - len(items), self.n - off)
                items += [(epoch, int(i)) for i in perm[off:off + take]]
                off += take
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    perm = self._perm(epoch)
            yield items[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:  # DataLoader needs it for nothing; infinite stream
        return 2 ** 62


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])
