"""Shuffle-BN (methods/shuffle_bn.py): images and their boxes permuted together, the result
back in the original order; in one process split into groups, across real processes (gloo)
each process's BN sees rows of the other."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.shuffle_bn import gather, shuffle_bn


def _rows(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.arange(n, dtype=torch.float32)[:, None] + offset) * 10
    b = torch.arange(n, dtype=torch.float32)[:, None] + offset
    return x, b


def test_one_process_groups_keep_images_and_boxes_together_and_restore_the_order():
    x, b = _rows(8)
    seen = []

    def fn(xs, bs):
        seen.append(len(xs))
        return xs - bs           # 9 * row id only if x and b were permuted together

    torch.manual_seed(0)
    out = shuffle_bn(fn, x, b, splits=2)
    assert seen == [4, 4] and torch.equal(out, x - b)


def _worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)                       # different local permutations: rank 0's wins
    x, b = _rows(4, offset=4 * rank)
    got = []

    def fn(xs, bs):
        got.append(bs[:, 0].clone())
        return xs - bs

    out = shuffle_bn(fn, x, b)
    results.put((rank, (torch.equal(out, x - b), got[0].tolist(), gather(b)[:, 0].tolist())))
    dist.destroy_process_group()


def test_across_processes_each_rank_sees_a_shuffled_slice_of_the_global_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")                  # no re-import of torch in the children
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (ok0, seen0, all0), (ok1, seen1, all1) = got[0], got[1]
    assert ok0 and ok1                                          # back in each rank's own order
    assert all0 == all1 == [float(i) for i in range(8)]        # gather concatenates in rank order
    assert sorted(seen0 + seen1) == all0 and len(seen0) == len(seen1) == 4
    assert seen0 != [0.0, 1.0, 2.0, 3.0] or seen1 != [4.0, 5.0, 6.0, 7.0]   # rows did move
