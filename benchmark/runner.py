"""The one way through a run: ``run_job(job)`` takes the run's lock, checks its parents, builds
its stage from the registry (``benchmark.stages``), runs it and records the metrics. Every
executor (``slurm/``: local, submitit-local, Slurm) calls it, in one process or in each of N."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmark.common.device import resolve_device
from benchmark.common.fs import DiskFull, disk_full, no_space, sha256_file
from benchmark.data.errors import SkipLog, TooManyUnreadable
from benchmark.engine.checkpoint import previous_checkpoint
from benchmark.engine.distributed import (barrier, broadcast_object, distributed_env, init_distributed_from_env,
                                          is_main_process, process_hosts)
from benchmark.engine.loop import Diverged
from benchmark.runs.job import Job
from benchmark.runs.store import RunStore
from benchmark.stages import STAGES, StageContext, get_stage

log = logging.getLogger(__name__)


class ParentNotDone(RuntimeError):
    pass


def run_job(job: Job, store_root: str | None = None, resume: bool = True, *, device: str | None = None,
            progress: bool = True, stop_after: int | None = None, runtime: dict | None = None) -> dict:
    """Run one stage, idempotently: a finished run returns its stored metrics; an unfinished
    one resumes from its last checkpoint. A NaN loss marks the run diverged.

    One process computes a run at a time (``RunStore.lock``): a second identical command waits
    and then reuses the result. A parent's weights are checked against their recorded sha256
    before use; missing or mismatched weights recompute the parent (same key) first.

    Launched as N processes (torchrun, ``--nproc N``, or N Slurm tasks through the job
    wrapper), every process calls this: torch.distributed is set up from the environment,
    all ranks train and resume from the same checkpoint, only rank 0 writes the run store
    (and holds the lock), and evaluation runs on rank 0 alone (its metrics equal a
    one-process evaluation)."""
    init_distributed_from_env()
    main = is_main_process()
    store = RunStore(store_root)
    if store.status(job.key) == "done":
        return store.metrics(job.key)
    for p, st in broadcast_object({p: store.status(p) for p in job.parents} if main else None).items():
        if st in ("running", "interrupted"):   # being (re)computed elsewhere, e.g. by a sibling that found
            # its weights missing, or killed: wait for it under its lock, or finish it from its checkpoint
            run_job(_stored_job(store, p), store_root, resume=True, device=device, progress=progress, runtime=runtime)
        elif st != "done":
            raise ParentNotDone(f"{job.label}: parent run {p} is {st}")
    for p, why in broadcast_object(_unusable_parents(store, job) if main else None):
        print(f"{job.label}: parent run {p}: {why}; recomputing it (same config, same key)",
              file=sys.stderr, flush=True)
        if main:
            store.invalidate(p, why)
        barrier()
        run_job(_stored_job(store, p), store_root, resume=True, device=device, progress=progress, runtime=runtime)
    lock = store.lock(job.key) if main else contextlib.nullcontext()
    with lock:
        barrier()   # rank 0 holds the lock: the store is settled for every rank
        if store.status(job.key) == "done":   # the other command finished it meanwhile
            return store.metrics(job.key)
        return _run_locked(job, store, resume=resume, device=device, progress=progress,
                           stop_after=stop_after, runtime=runtime, main=main)


def _run_locked(job: Job, store: RunStore, *, resume, device, progress, stop_after, runtime, main) -> dict:
    cfg = dict(job.config)
    stage = get_stage(job.stage)()
    hosts = process_hosts()   # a collective: every rank, before rank 0 alone writes
    if main:
        store.begin(job.key, cfg, extra_env={"distributed": distributed_env(), **_split(cfg, hosts)})
        gone = store.clean_temporaries(job.key)
        if gone:
            log.warning("%s: removed temporaries a killed writer left: %s", job.key, ", ".join(gone))
    barrier()   # the run directory exists before any rank reads or resumes from it
    run_dir = store.run_dir(job.key)
    skips = SkipLog(run_dir / "skipped_images.jsonl")
    if not resume:
        Path(skips.path).unlink(missing_ok=True)
    effective_runtime = {**cfg.get("runtime", {}), **(runtime or {})}
    if effective_runtime.get("torch_threads"):
        torch.set_num_threads(int(effective_runtime["torch_threads"]))
    parent_dir = store.run_dir(cfg["parent"]) if cfg.get("parent") else None
    ctx = StageContext(config=cfg, run_dir=run_dir, parent_dir=parent_dir, device=device or str(resolve_device()),
                       resume=resume, stop_after=stop_after, progress=progress, runtime=effective_runtime, main=main)
    t0 = time.time()
    try:
        with skips.activate():
            m, complete = stage.run(ctx)
        skips.check()   # the threshold over the skips of every process together
    except Diverged as e:
        if main:
            store.fail(job.key, f"diverged: {e}", diverged=True)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if no_space(e):   # nothing is wrong with the run: it reads interrupted and resumes
            raise e if isinstance(e, DiskFull) else disk_full(run_dir) from None
        if main:
            store.fail(job.key, traceback.format_exc())
        if not isinstance(e, TooManyUnreadable):
            skips.check()   # a loader worker's TooManyUnreadable arrives wrapped in a RuntimeError: say it plainly
        raise
    if complete and main:
        m = {**m, **skips.summary(), "wall_s": round(time.time() - t0, 1)}
        _finish(store, job.key, run_dir, m)
    barrier()   # no rank leaves before the run is recorded
    return m


def _split(cfg: dict, hosts: list[str]) -> dict:
    """What ``env.json`` records of how the run was split: nodes, each process's host, and a
    training stage's global batch (the recipe's) and per-process share of it."""
    out: dict = {"nodes": len(set(hosts)), "hosts": hosts}
    batch = (cfg.get("recipe") or {}).get("batch_size")
    if cfg.get("stage") in ("pretrain", "finetune") and batch:
        out["batch"] = {"global": batch, "per_process": batch // len(hosts)}
    return out


def _finish(store: RunStore, key: str, run_dir: Path, m: dict) -> None:
    """Record a complete run (``m`` gains the final model's sha256); the resumable state is dropped."""
    if (run_dir / "model_final.pt").exists():
        m["model_sha256"] = sha256_file(run_dir / "model_final.pt")
    ck = run_dir / "checkpoint.pt"
    if ck.exists():
        m["checkpoint_sha256"] = sha256_file(ck)
        ck.unlink()
    previous_checkpoint(ck).unlink(missing_ok=True)
    store.clean_temporaries(key)
    try:   # TensorBoard's hparams view: the run's config beside its final metrics
        from benchmark.engine.tb import write_hparams
        write_hparams(run_dir, store.config(key) or {}, m)
    except OSError as e:
        log.warning("%s: TensorBoard hparams not written: %s", key, e)
    store.finish(key, m)   # metrics.json last: it marks the run done


def _unusable_parents(store: RunStore, job: Job) -> list[tuple[str, str]]:
    """``[(parent key, why)]`` for done parents whose output this run reads but cannot trust:
    missing (committed runs keep metrics, not weights: git ignores them) or not matching the
    sha256 recorded when the parent finished (a truncated or replaced file)."""
    bad = []
    for p in job.parents:
        stage = (store.config(p) or {}).get("stage")
        output = get_stage(stage).output if stage in STAGES.names() else None
        if output is None:
            continue
        name, field = output
        path = store.run_dir(p) / name
        recorded = (store.metrics(p) or {}).get(field)
        if not path.is_file():
            bad.append((p, f"{path} is missing (a run from git keeps its metrics, not its weights)"))
        elif recorded and sha256_file(path) != recorded:
            bad.append((p, f"{path} does not match its recorded {field} (truncated or replaced)"))
    return bad


def _stored_job(store: RunStore, key: str) -> Job:
    """The job that computes run ``key`` again from its stored config."""
    cfg = store.config(key)
    parent = cfg.get("parent")
    return Job(cfg["stage"], key, cfg, (parent,) if parent else (), cfg.get("label") or key)


