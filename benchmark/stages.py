"""Running one job of a plan (any executor calls ``run_job``) and a plan locally."""
from __future__ import annotations

import logging
import time
import traceback

from benchmark.plan import Job, Plan
from benchmark.store import RunStore
from benchmark.trainer import Diverged

log = logging.getLogger(__name__)


class ParentNotDone(RuntimeError):
    pass


def run_job(job: Job, store_root: str | None = None, resume: bool = True, *, device: str | None = None,
            progress: bool = True, stop_after: int | None = None, runtime: dict | None = None) -> dict:
    """Run one stage, idempotently: a finished run returns its stored metrics; an unfinished
    one resumes from its last checkpoint. A NaN loss marks the run diverged."""
    store = RunStore(store_root)
    if store.status(job.key) == "done":
        return store.metrics(job.key)
    for p in job.parents:
        st = store.status(p)
        if st != "done":
            raise ParentNotDone(f"{job.label}: parent run {p} is {st}")
    cfg = {k: v for k, v in job.config.items()}
    run_dir = store.begin(job.key, cfg)
    rt = {**cfg.get("runtime", {}), **(runtime or {})}
    if rt.get("torch_threads"):
        import torch
        torch.set_num_threads(int(rt["torch_threads"]))
    t0 = time.time()
    try:
        if job.stage == "pretrain":
            from benchmark.pretrain import run_pretrain
            m = run_pretrain(cfg, run_dir, resume=resume, stop_after=stop_after, device=device,
                             num_workers=rt.get("num_workers", 0), progress=progress)
            complete = m["steps"] >= m["total_steps"]
        elif job.stage == "finetune":
            from benchmark.datasets import resolve_data
            from benchmark.finetune import run_finetune
            weights = None
            if cfg.get("parent"):
                weights = str(store.run_dir(cfg["parent"]) / "weights.pt")
            m = run_finetune(cfg["detector"], {**cfg["recipe"], **_rt(rt)}, resolve_data(cfg["data"]),
                             run_dir=run_dir, weights=weights, seed=cfg["seed"], resume=resume,
                             stop_after=stop_after, **({"device": device} if device else {}))
            complete = (run_dir / "model_final.pt").exists()
        elif job.stage == "evaluate":
            from benchmark.datasets import resolve_data
            from benchmark.evaluate import run_evaluate
            model = store.run_dir(cfg["parent"]) / "model_final.pt"
            m = run_evaluate(str(model), resolve_data(cfg["data"]), run_dir=run_dir,
                             protocol=cfg.get("protocol", "coco"), **({"device": device} if device else {}))
            complete = True
        else:
            raise ValueError(f"{job.label}: unknown stage {job.stage!r}")
    except Diverged as e:
        store.fail(job.key, f"diverged: {e}", diverged=True)
        raise
    except KeyboardInterrupt:
        raise
    except BaseException:
        store.fail(job.key, traceback.format_exc())
        raise
    if not complete:
        return m
    m = {**m, "wall_s": round(time.time() - t0, 1)}
    ck = run_dir / "checkpoint.pt"
    if ck.exists():  # the final weights are kept; the resumable state is no longer needed
        from benchmark.pretrain import sha256_file
        m["checkpoint_sha256"] = sha256_file(ck)
        ck.unlink()
    store.finish(job.key, m)
    return m


def _rt(rt: dict) -> dict:
    """Runtime keys the fine-tuning recipe understands (never part of a run's identity)."""
    return {k: rt[k] for k in ("num_workers",) if k in rt}


def run_plan_local(plan: Plan, store_root: str | None = None, *, device: str | None = None,
                   progress: bool = True, jobs: int = 1) -> dict[str, str]:
    """Run the plan's missing jobs locally, parents first. ``jobs`` > 1 runs that many
    independent runs at once in worker processes (one torch thread each, views built
    in-process: on 2 cores two runs at once nearly halve a tiny table). A failed or diverged
    run skips its descendants; the rest of the table goes on. Returns key -> status."""
    if jobs > 1:
        return _run_plan_parallel(plan, store_root, device=device, jobs=jobs)
    store = RunStore(store_root)
    status: dict[str, str] = {}
    todo = [j for j in plan.jobs if store.status(j.key) != "done"]
    log.info("%s: %d runs planned, %d to run", plan.spec.name, len(plan.jobs), len(todo))
    for i, job in enumerate(plan.jobs):
        st = store.status(job.key)
        if st == "done":
            status[job.key] = "done"
            continue
        bad = [p for p in job.parents if status.get(p, store.status(p)) != "done"]
        if bad:
            status[job.key] = "skipped"
            log.warning("skip %s: parent %s is %s", job.label, bad[0], status.get(bad[0]))
            continue
        print(f"[{i + 1}/{len(plan.jobs)}] {job.stage} {job.label} ({job.key})", flush=True)
        try:
            run_job(job, store_root, device=device, progress=progress)
            status[job.key] = "done"
        except Diverged as e:
            status[job.key] = "diverged"
            print(f"    diverged: {e}", flush=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 — one failed run must not stop the table
            status[job.key] = "failed"
            print(f"    FAILED: {type(e).__name__}: {e} (see {store.run_dir(job.key)}/FAILED)", flush=True)
    return status


def _run_in_worker(job: Job, store_root: str | None, device: str | None) -> str:
    try:
        run_job(job, store_root, device=device, progress=False,
                runtime={"torch_threads": 1, "num_workers": 0})
        return "done"
    except Diverged:
        return "diverged"


def _run_plan_parallel(plan: Plan, store_root: str | None, *, device: str | None, jobs: int) -> dict[str, str]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    store = RunStore(store_root)
    status = {j.key: "done" for j in plan.jobs if store.status(j.key) == "done"}
    waiting = [j for j in plan.jobs if j.key not in status]
    n_total, n_done = len(waiting), 0
    t0 = time.time()
    running: dict = {}
    # spawn: a forked child would inherit the parent's OpenMP thread pool state
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        while waiting or running:
            for job in list(waiting):
                ps = [status.get(p) for p in job.parents]
                if any(s not in (None, "done") for s in ps):
                    status[job.key] = "skipped"
                    waiting.remove(job)
                    log.warning("skip %s: a parent did not finish", job.label)
                elif all(s == "done" for s in ps) and len(running) < jobs:
                    waiting.remove(job)
                    running[ex.submit(_run_in_worker, job, store_root, device)] = job
                    print(f"[start] {job.stage} {job.label} ({job.key})", flush=True)
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    status[job.key] = fut.result()
                except Exception as e:  # noqa: BLE001 — one failed run must not stop the table
                    status[job.key] = "failed"
                    print(f"    FAILED: {job.label}: {type(e).__name__}: {e}", flush=True)
                n_done += 1
                print(f"[{n_done}/{n_total}, {time.time() - t0:.0f} s] {status[job.key]}: {job.label}", flush=True)
    return status
