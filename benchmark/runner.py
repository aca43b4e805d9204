"""Running one job of a plan (every executor calls ``run_job``, in one process or in each of
N) and the one local scheduler that runs a plan on this machine."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from benchmark.common.device import resolve_device
from benchmark.engine.checkpoint import previous_checkpoint
from benchmark.engine.distributed import barrier, broadcast_object, distributed_env, init_distributed_from_env, is_main_process
from benchmark.data.errors import SkipLog, TooManyUnreadable
from benchmark.experiments.plan import Job, Plan
from benchmark.reporting.progress import TableProgress
from benchmark.runs.store import RunStore
from benchmark.engine.loop import Diverged

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
        if st == "running":   # being (re)computed elsewhere, e.g. by a sibling that found its weights
            # missing: wait for it under its lock, or finish it from its checkpoint
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
    cfg = {k: v for k, v in job.config.items()}
    if main:
        store.begin(job.key, cfg, extra_env={"distributed": distributed_env()})
        gone = store.clean_temporaries(job.key)
        if gone:
            log.warning("%s: removed temporaries a killed writer left: %s", job.key, ", ".join(gone))
    barrier()   # the run directory exists before any rank reads or resumes from it
    run_dir = store.run_dir(job.key)
    skips = SkipLog(run_dir / "skipped_images.jsonl")
    if not resume:
        Path(skips.path).unlink(missing_ok=True)
    rt = {**cfg.get("runtime", {}), **(runtime or {})}
    if rt.get("torch_threads"):
        import torch
        torch.set_num_threads(int(rt["torch_threads"]))
    device = device or str(resolve_device())
    t0 = time.time()
    try:
        with skips.activate():
            if job.stage == "pretrain":
                from benchmark.stages.pretrain import run_pretrain
                parent_weights = store.run_dir(cfg["parent"]) / "weights.pt" if cfg.get("parent") else None
                m = run_pretrain(cfg, run_dir, resume=resume, stop_after=stop_after, device=device,
                                 num_workers=rt.get("num_workers", 0), progress=progress,
                                 parent_weights=parent_weights)
                complete = m["steps"] >= m["total_steps"]
            elif job.stage == "finetune":
                from benchmark.data.resolve import resolve_data
                from benchmark.stages.finetune import run_finetune
                weights = None
                if cfg.get("parent"):
                    weights = str(store.run_dir(cfg["parent"]) / "weights.pt")
                m = run_finetune(cfg["detector"], {**cfg["recipe"], **_rt(rt)}, resolve_data(cfg["data"]),
                                 run_dir=run_dir, weights=weights, seed=cfg["seed"], resume=resume,
                                 stop_after=stop_after, device=device)
                complete = (run_dir / "model_final.pt").exists()
            elif job.stage == "evaluate":
                m, complete = {}, True
                if main:
                    from benchmark.data.resolve import resolve_data
                    from benchmark.stages.evaluate import run_evaluate
                    model = store.run_dir(cfg["parent"]) / "model_final.pt"
                    m = run_evaluate(str(model), resolve_data(cfg["data"]), run_dir=run_dir, device=device,
                                     protocol=cfg.get("protocol", "coco"))
            else:
                raise ValueError(f"{job.label}: unknown stage {job.stage!r}")
        skips.check()   # the threshold over the skips of every process together
    except Diverged as e:
        if main:
            store.fail(job.key, f"diverged: {e}", diverged=True)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if main:
            store.fail(job.key, traceback.format_exc())
        if not isinstance(e, TooManyUnreadable):
            skips.check()   # a loader worker's TooManyUnreadable arrives wrapped in a RuntimeError: say it plainly
        raise
    if complete and main:
        m = {**m, **skips.summary(), "wall_s": round(time.time() - t0, 1)}
        if (run_dir / "model_final.pt").exists():
            from benchmark.common.fs import sha256_file
            m["model_sha256"] = sha256_file(run_dir / "model_final.pt")
        ck = run_dir / "checkpoint.pt"
        if ck.exists():  # the final weights are kept; the resumable state is no longer needed
            from benchmark.common.fs import sha256_file
            m["checkpoint_sha256"] = sha256_file(ck)
            ck.unlink()
        previous_checkpoint(ck).unlink(missing_ok=True)
        store.clean_temporaries(job.key)
        store.finish(job.key, m)
    barrier()   # no rank leaves before the run is recorded
    return m


# what a child run reads from its parent, and the metric that records its sha256
PARENT_OUTPUT = {"pretrain": ("weights.pt", "weights_sha256"), "finetune": ("model_final.pt", "model_sha256")}


def _unusable_parents(store: RunStore, job: Job) -> list[tuple[str, str]]:
    """``[(parent key, why)]`` for done parents whose output this run reads but cannot trust:
    missing (committed runs keep metrics, not weights: git ignores them) or not matching the
    sha256 recorded when the parent finished (a truncated or replaced file)."""
    from benchmark.common.fs import sha256_file
    bad = []
    for p in job.parents:
        stage = (store.config(p) or {}).get("stage")
        if stage not in PARENT_OUTPUT:
            continue
        name, field = PARENT_OUTPUT[stage]
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


def _rt(rt: dict) -> dict:
    """Runtime keys the fine-tuning recipe understands (never part of a run's identity)."""
    return {k: rt[k] for k in ("num_workers",) if k in rt}


# --------------------------------------------------------------------------- the local scheduler
def run_plan_local(plan: Plan, store_root: str | None = None, *, device: str | None = None,
                   progress: bool = True, jobs: int = 1, nproc: int = 1, executor: str = "local") -> dict[str, str]:
    """Run the plan's missing runs on this machine, parents first, and wait.

    ``jobs`` independent runs at once; each run in ``nproc`` processes (torch.distributed,
    gloo on CPU / NCCL on GPU). ``executor="local"``: one run in this process when
    ``jobs == nproc == 1`` (progress bars), else each run in freshly spawned processes with
    one torch thread each (on 2 cores two tiny runs at once nearly halve a table);
    ``"submitit-local"``: each run as a job of submitit's LocalExecutor through the Slurm job
    wrapper (the cluster's code path, without a cluster). A failed or diverged run skips its
    descendants; the rest of the table goes on. Returns key -> status."""
    store = RunStore(store_root)
    launch = _launcher(plan, store, device=device, progress=progress, jobs=jobs, nproc=nproc, executor=executor)
    status = {j.key: "done" for j in plan.jobs if store.status(j.key) == "done"}
    waiting = [j for j in plan.jobs if j.key not in status]
    tp = TableProgress(plan, store_root, jobs=jobs)
    running: dict = {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        while waiting or running:
            for job in list(waiting):
                ps = [status.get(p) for p in job.parents]
                if any(s not in (None, "done") for s in ps):
                    status[job.key] = "skipped"
                    waiting.remove(job)
                    tp.finish(job, "skipped")
                elif all(s == "done" for s in ps) and len(running) < max(1, jobs):
                    waiting.remove(job)
                    tp.start(job)
                    if jobs <= 1 and nproc <= 1 and executor == "local":
                        status[job.key], err = launch(job)    # in this process: progress bars, Ctrl-C
                        tp.finish(job, status[job.key], err)
                    else:
                        running[pool.submit(launch, job)] = job
            if not running:
                if waiting and not any(all(status.get(p) == "done" for p in j.parents) for j in waiting):
                    for job in waiting:   # parents neither done nor running: cannot happen in a sound plan
                        status[job.key] = "skipped"
                    break
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    status[job.key], err = fut.result()
                except Exception as e:  # noqa: BLE001 — one failed run must not stop the table
                    status[job.key], err = "failed", f"{type(e).__name__}: {e}"
                tp.finish(job, status[job.key], err)
    return status


def _launcher(plan: Plan, store: RunStore, *, device, progress, jobs, nproc, executor):
    """``launch(job) -> (status, error)``: "done" | "failed" | "diverged", blocking until the run ends."""
    store_root = str(store.root)
    if executor == "submitit-local":
        import submitit

        from benchmark.common.paths import results_root
        from slurm.orchestrate import job_environment
        from slurm.submit import StageJob
        ex = submitit.LocalExecutor(folder=results_root() / "slurm" / "local" / plan.spec.name)
        ex.update_parameters(timeout_min=24 * 60, tasks_per_node=nproc)
        os.environ.update(job_environment(store.root, results_root()))   # the jobs inherit these

        def launch(job: Job) -> str:
            sjob = ex.submit(StageJob(store_root), job)
            try:
                sjob.results()
                err = None
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e} (log {sjob.paths.stderr})"
            return _final_status(store, job), err
        return launch
    if executor != "local":
        raise ValueError(f"executor: unknown {executor!r} (local | submitit-local | slurm)")
    if jobs <= 1 and nproc <= 1:
        def launch(job: Job) -> tuple[str, str | None]:
            try:
                run_job(job, store_root, device=device, progress=progress)
                return "done", None
            except Diverged as e:
                return "diverged", str(e)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 — one failed run must not stop the table
                return "failed", f"{type(e).__name__}: {e}"
        return launch
    runtime = {"torch_threads": 1, "num_workers": 0} if nproc == 1 and jobs > 1 else None
    return lambda job: run_processes(job, store_root, nproc=nproc, device=device, runtime=runtime)


def run_processes(job: Job, store_root: str, *, nproc: int, device: str | None = None,
                  runtime: dict | None = None) -> tuple[str, str | None]:
    """Run one job in ``nproc`` freshly spawned processes on this machine, wired as torchrun
    wires them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free local port)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")   # a forked child would inherit this process's thread pools
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(job, store_root, rank, nproc, port, device, runtime),
                         name=f"{job.label}/rank{rank}") for rank in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    store = RunStore(store_root)
    st = _final_status(store, job)
    err = None
    if st != "done":
        marker = store.run_dir(job.key) / ("DIVERGED" if st == "diverged" else "FAILED")
        last = marker.read_text().strip().splitlines()[-1:] if marker.exists() else []
        err = last[0] if last else f"process exit codes {codes}"
    return st, err


def _rank_main(job, store_root, rank, nproc, port, device, runtime) -> None:
    if nproc > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        run_job(job, store_root, device=device, progress=False, runtime=runtime)
    except Diverged:
        pass   # recorded in the store
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _final_status(store: RunStore, job: Job) -> str:
    st = store.status(job.key)
    return st if st in ("done", "diverged") else "failed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
