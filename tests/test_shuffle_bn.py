"""Per-process BN and Shuffle-BN (methods/shuffle_bn.py) as a number of BatchNorm groups of
the global batch: images and their boxes permuted together, the result back in the original
order, and W processes (gloo) computing exactly what one process computes with the same groups."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from methods.config import ConfigError
from methods.dist import gather
from methods.shuffle_bn import in_bn_groups, shuffle_bn
from tests.inputs import as_tensors, by_value


def _rows(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.arange(n, dtype=torch.float32)[:, None] + offset) * 10
    b = torch.arange(n, dtype=torch.float32)[:, None] + offset
    return x, b


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_one_process_groups_keep_images_and_boxes_together_and_restore_the_order():
    x, b = _rows(8)
    seen = []

    def fn(xs, bs):
        seen.append(len(xs))
        return xs - bs           # 9 * row id only if x and b were permuted together

    torch.manual_seed(0)
    out = shuffle_bn(nn.Identity(), fn, x, b, groups=2)
    assert seen == [4, 4] and torch.equal(out, x - b)


def test_groups_normalise_separately_and_only_the_first_moves_the_running_statistics():
    net = _bn_net()
    x = torch.randn(8, 3)
    out = in_bn_groups(net, net, x, groups=2)
    ref = _bn_net()
    expected = torch.cat([ref(x[:4])])          # the first group: its statistics enter the running ones
    after_first = ref[1].running_mean.clone()
    expected = torch.cat([expected, ref(x[4:])])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(net[1].running_mean, after_first) and not torch.allclose(after_first, ref[1].running_mean)
    assert int(net[1].num_batches_tracked) == 1
    in_bn_groups(net, net, torch.randn(8, 3, requires_grad=True), groups=4)[0].sum().backward()   # autograd-safe
    assert in_bn_groups(net, net, torch.randn(4, 3), groups=4).shape == (4, 4)   # at most n / 2 groups


def test_groups_that_do_not_divide_are_refused_with_the_field():
    net = _bn_net()
    with pytest.raises(ValueError, match="method.bn_groups: 9 images per process cannot form 4"):
        in_bn_groups(net, net, torch.randn(9, 3), groups=4)


def _worker(rank: int, world: int, port: int, groups: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)                      # the RNG stream every process (and one process) shares
    x = torch.randn(8, 3)
    n = len(x) // world
    mine = x[rank * n:(rank + 1) * n]
    net = _bn_net()
    got = []

    def fn(xs, bs):
        got.append(bs[:, 0].tolist())
        return net(xs)

    box = torch.arange(8, dtype=torch.float32)[rank * n:(rank + 1) * n, None]
    try:
        out = shuffle_bn(net, fn, mine, box, groups=groups)
        results.put(by_value((rank, gather(out).clone(), got)))
    except ConfigError as e:
        results.put((rank, str(e), got))
    dist.destroy_process_group()


def _spawn(world: int, groups: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")                 # fork after torch ran here may hang in OpenMP
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, groups, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = {r: (out, seen) for r, out, seen in (as_tensors(results.get(timeout=60)) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("groups", [2, 4])
def test_two_processes_compute_what_one_process_computes_with_the_same_groups(groups):
    two = _spawn(2, groups)
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    net = _bn_net()
    seen_one = []

    def fn(xs, bs):
        seen_one.append(bs[:, 0].tolist())
        return net(xs)

    one = shuffle_bn(net, fn, x, torch.arange(8, dtype=torch.float32)[:, None], groups=groups)
    assert torch.allclose(two[0][0], one, atol=1e-6) and torch.allclose(two[1][0], one, atol=1e-6)
    assert two[0][1] + two[1][1] == seen_one                # the same shuffled groups, rank 0 first
    assert seen_one[0] != [0.0, 1.0, 2.0, 3.0][:8 // groups]  # rows did move


def test_groups_that_are_not_a_multiple_of_the_process_count_are_refused():
    out = _spawn(2, 3)
    assert "method.shuffle_bn_splits: 3 groups of the global batch cannot be split over 2 processes" in out[0][0]
