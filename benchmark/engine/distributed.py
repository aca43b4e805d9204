"""torch.distributed from the environment, and the collectives the harness needs (no-ops in
one process)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from methods.dist import rank_and_world


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in one process."""
    return rank_and_world()


def init_distributed_from_env() -> bool:
    """torch.distributed from the environment when the job has several processes: torchrun's
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), which the Slurm
    job wrapper exports from Slurm's through submitit. NCCL on GPU, gloo on CPU; each process
    takes GPU ``LOCAL_RANK``. Returns True when distributed (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or (int(os.environ["WORLD_SIZE"]) <= 1 and "RANK" not in os.environ):
        return False   # (torchrun with one process still takes the distributed path: RANK is set)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch "
                           f"with torchrun, `detbench ... --nproc N`, or the Slurm executor")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return True


def distributed_env() -> dict:
    """What a run records about its processes (``env.json``)."""
    rank, world_size = world()
    on = dist.is_available() and dist.is_initialized()
    return {"world_size": world_size, "backend": dist.get_backend() if on else None}


def process_hosts() -> list[str]:
    """Each process's host name, in rank order (a collective; one entry in one process)."""
    name = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [name]
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return names


@torch.no_grad()
def replicas_in_sync(model: torch.nn.Module) -> bool:
    """Whether every process holds the same parameters (a checksum compared across ranks):
    DDP keeps them equal; a method that updates state outside it must too."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])   # on the model's device (NCCL)
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
