"""The executors that run a plan on this machine: ``local`` (this process, or a few spawned
processes at once, each run in N processes wired as torchrun wires them) and
``submitit-local`` (each run a job of submitit's LocalExecutor through the Slurm job
wrapper: the cluster's code path without a cluster)."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import submitit

from benchmark.common.fs import disk_full, fullest, no_space
from benchmark.common.paths import cache_root, results_root
from benchmark.engine.loop import Diverged
from benchmark.runs.job import Job
from benchmark.experiments.plan import Plan
from benchmark.reporting.progress import TableProgress
from benchmark.runner import run_job
from benchmark.runs.store import RESULTS, RunStore
from slurm.orchestrate import job_environment
from slurm.rank import DISK_FULL_EXIT, rank_main
from slurm.submit import StageJob


def run_plan_local(plan: Plan, store_root: str | None = None, *, device: str | None = None,
                   progress: bool = True, jobs: int = 1, nproc: int = 1, executor: str = "local") -> dict[str, str]:
    """Run the plan's missing runs on this machine, parents first, and wait.

    ``jobs`` independent runs at once; each run in ``nproc`` processes (torch.distributed,
    gloo on CPU / NCCL on GPU). ``executor="local"``: one run in this process when
    ``jobs == nproc == 1`` (progress bars), else each run in freshly spawned processes with
    one torch thread each (on 2 cores two tiny runs at once nearly halve a table);
    ``"submitit-local"``: each run as a job of submitit's LocalExecutor through the Slurm job
    wrapper (the cluster's code path, without a cluster). A failed or diverged run skips its
    descendants; the rest of the table goes on. A stored diverged run is a result, like a
    done one: it is not run again. Returns key -> status."""
    store = RunStore(store_root)
    launch = _launcher(plan, store, device=device, progress=progress, jobs=jobs, nproc=nproc, executor=executor)
    status = {j.key: st for j in plan.jobs if (st := store.status(j.key)) in RESULTS}
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
                    if no_space(e):   # a full disk does: every later run would fail the same way
                        raise
                    status[job.key], err = "failed", f"{type(e).__name__}: {e}"
                tp.finish(job, status[job.key], err)
    return status


def _launcher(plan: Plan, store: RunStore, *, device, progress, jobs, nproc, executor):
    """``launch(job) -> (status, error)``: "done" | "failed" | "diverged", blocking until the run ends."""
    store_root = str(store.root)
    if executor == "submitit-local":
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
                if no_space(e):   # ... but a full disk does: every later run would fail the same way
                    raise
                return "failed", f"{type(e).__name__}: {e}"
        return launch
    runtime = {"torch_threads": 1, "num_workers": 0} if nproc == 1 and jobs > 1 else None
    return lambda job: run_processes(job, store_root, nproc=nproc, device=device, runtime=runtime)


def run_processes(job: Job, store_root: str, *, nproc: int, device: str | None = None,
                  runtime: dict | None = None) -> tuple[str, str | None]:
    """Run one job in ``nproc`` freshly spawned processes on this machine, wired as torchrun
    wires them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free local port)."""
    ctx = mp.get_context("spawn")   # a forked child would inherit this process's thread pools
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(job, store_root, rank, nproc, port, device, runtime),
                         name=f"{job.label}/rank{rank}") for rank in range(nproc)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:   # Ctrl-C reached the children too: they save at the end of their step
        for p in procs:
            p.join()
        raise
    codes = [p.exitcode for p in procs]
    if DISK_FULL_EXIT in codes:   # stop the table: every later write would fail the same way
        raise disk_full(fullest([store_root, cache_root(), results_root()]), f"run {job.label} ({job.key})")
    store = RunStore(store_root)
    st = _final_status(store, job)
    err = None
    if st != "done":
        marker = store.run_dir(job.key) / ("DIVERGED" if st == "diverged" else "FAILED")
        last = marker.read_text().strip().splitlines()[-1:] if marker.exists() else []
        err = last[0] if last else f"process exit codes {codes}"
    return st, err


def _final_status(store: RunStore, job: Job) -> str:
    st = store.status(job.key)
    return st if st in ("done", "diverged") else "failed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
