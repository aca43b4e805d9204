"""CpuSyncBatchNorm (methods/sync_bn.py): on W gloo processes, each holding a slice of the
batch, forward, input gradients, DDP-averaged parameter gradients and running statistics equal
one BatchNorm over the whole batch in one process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from methods.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm
from tests.inputs import as_tensors, by_value


def _data(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)


def _bn(ndim: int) -> nn.Module:
    torch.manual_seed(1)
    bn = (nn.BatchNorm1d if ndim <= 3 else nn.BatchNorm2d)(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _one(shape):
    x, g = _data(shape)
    x.requires_grad_(True)
    bn = _bn(len(shape))
    y = bn(x)
    (y * g).mean().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank, world, port, shape, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, g = _data(shape)
    n = shape[0] // world
    x, g = x[rank * n:(rank + 1) * n].clone().requires_grad_(True), g[rank * n:(rank + 1) * n]
    bn = convert_sync_batchnorm(_bn(len(shape)))
    assert isinstance(bn, CpuSyncBatchNorm)
    y = bn(x)
    (y * g).mean().backward()                     # this process's mean; DDP averages the gradients
    wg, bg = bn.weight.grad.clone(), bn.bias.grad.clone()
    for t in (wg, bg):
        dist.all_reduce(t)
        t /= world
    q.put(by_value((rank, y.detach().clone(), x.grad.clone() / world, wg, bg, bn.running_mean.clone(),
                    bn.running_var.clone())))
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5, 3)])
def test_two_processes_normalise_and_differentiate_as_one_batchnorm(shape):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, shape, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r[0], r[1:]) for r in (as_tensors(q.get(timeout=120)) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    y, xg, wg, bg, rm, rv = _one(shape)
    assert torch.allclose(torch.cat([got[0][0], got[1][0]]), y, atol=1e-12)
    assert torch.allclose(torch.cat([got[0][1], got[1][1]]), xg, atol=1e-12)    # input gradient
    for r in (0, 1):
        assert torch.allclose(got[r][2], wg, atol=1e-12) and torch.allclose(got[r][3], bg, atol=1e-12)
        assert torch.allclose(got[r][4], rm, atol=1e-12) and torch.allclose(got[r][5], rv, atol=1e-12)


def test_in_one_process_and_in_eval_mode_it_is_a_plain_batchnorm():
    x, _ = _data((6, 4))
    bn = _bn(2)
    sync = convert_sync_batchnorm(nn.Sequential(_bn(2)))[0]
    assert isinstance(sync, CpuSyncBatchNorm) and sync.weight.requires_grad
    assert torch.equal(sync(x), bn(x)) and torch.equal(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    assert torch.equal(sync(x), bn(x))
