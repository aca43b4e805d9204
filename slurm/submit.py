"""Submit a planned table or grid to Slurm with submitit, without waiting for it.

``submit_jobs(jobs, name=..., results_dir=..., store_root=..., profile=...)``

* runs already ``done`` in the run store are skipped, and so are runs whose Slurm job is
  still pending or running according to the state file and ``squeue``/``sacct``; failed,
  cancelled, timed-out or lost runs are submitted again;
* independent jobs of one stage go out as job arrays, in chunks no larger than the
  cluster's MaxArraySize, with ``slurm_array_parallelism`` from the profile;
* a job whose parents are queued gets ``--dependency=afterok:<parent ids>``, so a whole
  table is submitted at once in topological order;
* the code runs from a snapshot of the repository (``<snapshot_dir>/<id>/``), made once per
  distinct working tree, so editing the checkout does not change queued jobs;
* every job is a :class:`StageJob` (``submitit.helpers.Checkpointable``): on preemption or
  timeout it asks the running stage for a checkpoint and is requeued; the stage is then
  called again with ``resume=True``.
"""
from __future__ import annotations

import getpass
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import submitit

from slurm.profile import SlurmProfile
from slurm.state import SlurmState, now_iso
from benchmark.engine.signals import REQUESTS

log = logging.getLogger(__name__)

DEFAULT_STAGE_FN = "benchmark.runner:run_job"

# Slurm job states in which a job still holds its place in the queue
ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING",
    "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED", "RESV_DEL_HOLD",
}
# pending reasons that mean the job will never start
DEAD_REASONS = {"DependencyNeverSatisfied", "InvalidAccount", "InvalidQOS", "PartitionDown"}


class SlurmUnavailable(RuntimeError):
    """squeue/sacct cannot be run or answer with an error."""


# ====================================================================== code snapshot
_ALWAYS_SKIP = (".git/", ".venv/", "venv/", "results/", "__pycache__/", ".pytest_cache/", ".hypothesis/")


@dataclass(frozen=True)
class Snapshot:
    path: Path
    id: str
    sha: str | None  # git HEAD of the source checkout (None without commits)
    dirty: bool  # working tree differed from HEAD
    files: int

    def as_dict(self) -> dict:
        return {"path": str(self.path), "id": self.id, "sha": self.sha, "dirty": self.dirty}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=False)


def repo_files(repo_root: str | os.PathLike, max_file_mb: float = 50) -> list[str]:
    """Tracked files plus untracked, not-ignored ones, as they are in the working tree.

    Virtualenvs, results and caches are always left out; so are files over ``max_file_mb``.
    """
    repo = Path(repo_root)
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out.returncode != 0:
        raise RuntimeError(f"{repo}: not a git checkout ({out.stderr.decode(errors='replace').strip()})")
    names = sorted({n for n in out.stdout.decode().split("\0") if n})
    keep = []
    for name in names:
        if any(name.startswith(p) or f"/{p}" in f"/{name}" for p in _ALWAYS_SKIP) or name.endswith(".pyc"):
            continue
        if ".egg-info/" in name:
            continue
        path = repo / name
        if not path.is_file() or path.is_symlink():
            continue  # deleted in the working tree, a submodule or a link
        if path.stat().st_size > max_file_mb * 2**20:
            log.warning("snapshot: leaving out %s (over %s MB)", name, max_file_mb)
            continue
        keep.append(name)
    return keep


def snapshot_code(repo_root: str | os.PathLike, snapshot_dir: str | os.PathLike) -> Snapshot:
    """Copy the repository's files into ``<snapshot_dir>/<id>/`` once; reuse it afterwards.

    ``id`` is ``<git sha[:12]>-<content hash[:12]>`` (``nogit-…`` without commits), so two
    different working trees never share a snapshot and an unchanged one is reused.
    """
    repo = Path(repo_root).resolve()
    names = repo_files(repo)
    head = _git(repo, "rev-parse", "HEAD")
    sha = head.stdout.decode().strip() if head.returncode == 0 else None
    # dirty: a tracked file differs from HEAD, or an untracked file goes into the snapshot
    changed = _git(repo, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    tracked = set(_git(repo, "ls-files", "-z", "--cached").stdout.decode().split("\0"))
    dirty = sha is None or bool(changed) or any(n not in tracked for n in names)
    digest = hashlib.sha256()
    for name in names:
        path = repo / name
        digest.update(name.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-"))
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    snap_id = f"{sha[:12] if sha else 'nogit'}-{digest.hexdigest()[:12]}"
    root = Path(snapshot_dir).resolve()
    dest = root / snap_id
    if not (dest / "SNAPSHOT.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{snap_id}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in names:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, target)
        meta = {"id": snap_id, "sha": sha, "dirty": dirty, "source": str(repo), "files": len(names),
                "created": now_iso()}
        (tmp / "SNAPSHOT.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another submission made the same snapshot first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / "SNAPSHOT.json").exists():
                raise
    return Snapshot(path=dest, id=snap_id, sha=sha, dirty=dirty, files=len(names))


# ====================================================================== the job callable
def _num_tasks() -> int:
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:   # not inside a submitit job (a direct call)
        return 1


def _resolve(fn: Callable | str) -> Callable:
    if callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class StageJob(submitit.helpers.Checkpointable):
    """What runs on the cluster: ``StageJob(store_root)(job)`` → ``fn(job, store_root, resume=True)``
    in each of the job's tasks.

    With several tasks (``gpus_per_node`` > 1 or several nodes) it exports torchrun's
    variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) from Slurm's through submitit,
    so the stage joins one torch.distributed group (``benchmark.runner.run_job``).
    With ``threaded=True`` (default) the stage runs in a worker thread while the main thread
    waits, so that the preemption signal handler (which submitit runs in the main thread)
    can ask the trainer for a checkpoint and wait for it while training goes on.
    """

    def __init__(self, store_root: str, fn: Callable | str = DEFAULT_STAGE_FN, threaded: bool = True,
                 checkpoint_wait_s: float = 20.0):
        self.store_root = str(store_root)
        self.fn = fn
        self.threaded = threaded
        self.checkpoint_wait_s = checkpoint_wait_s

    def __call__(self, job: Any) -> Any:
        if _num_tasks() > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        fn = _resolve(self.fn)
        if not self.threaded:
            return fn(job, self.store_root, resume=True)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn(job, self.store_root, resume=True)
            except BaseException as err:  # re-raised in the main thread
                box["error"] = err

        worker = threading.Thread(target=target, name=f"detbench-{getattr(job, 'stage', 'stage')}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)  # short joins: signals are handled between them
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def checkpoint(self, job: Any, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """On preemption or timeout: ask the training loop to save at the end of its current
        step, wait for it (at most ``checkpoint_wait_s``), then requeue."""
        REQUESTS.request_checkpoint()
        deadline = time.monotonic() + self.checkpoint_wait_s
        while REQUESTS.checkpoint_pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        if REQUESTS.checkpoint_pending():
            log.warning("checkpoint not saved within %.0f s; requeueing from the last saved one",
                        self.checkpoint_wait_s)
        return submitit.helpers.DelayedSubmission(self, job)


# ====================================================================== Slurm queries
def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmUnavailable(f"{cmd[0]}: {err}") from None
    if out.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(cmd[:2])}… failed: {out.stderr.strip()}")
    return out.stdout


def slurm_job_states(job_ids: Iterable[str]) -> dict[str, dict]:
    """``{job_id: {"state": "PENDING", "reason": "Dependency"}}`` for the given ids
    (array tasks as ``<array id>_<task id>``).  Queued jobs come from ``squeue``, finished
    ones from ``sacct``; ids Slurm no longer knows are left out.
    """
    wanted = {str(j) for j in job_ids if j}
    if not wanted:
        return {}
    found: dict[str, dict] = {}
    for line in _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"]).splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in wanted:
            found[parts[0]] = {"state": parts[1], "reason": parts[2]}
    rest = sorted(wanted - set(found))
    if rest:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason", "-j", ",".join(rest)])
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0] in wanted and parts[0] not in found:
                state = parts[1].split()[0] if parts[1] else "UNKNOWN"  # "CANCELLED by 0"
                found[parts[0]] = {"state": state, "reason": parts[2] if len(parts) > 2 else ""}
    return found


def _is_alive(info: dict | None) -> bool:
    return bool(info) and info["state"] in ACTIVE_STATES and info.get("reason") not in DEAD_REASONS


def cancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])


# ====================================================================== submission
@dataclass
class SubmitSummary:
    name: str
    state_path: Path
    snapshot: Snapshot | None = None
    submitted: list[dict] = field(default_factory=list)  # {key, label, stage, job_id, dependency}
    skipped: list[dict] = field(default_factory=list)  # {key, label, stage, reason, job_id?}
    cancelled: list[str] = field(default_factory=list)  # stale job ids cancelled before resubmitting
    arrays: list[dict] = field(default_factory=list)  # {stage, array_job_id, size, dependency}

    @property
    def job_ids(self) -> dict[str, str]:
        """Run key → Slurm job id of what this call submitted."""
        return {s["key"]: s["job_id"] for s in self.submitted}

    def __str__(self) -> str:
        lines = [f"{self.name}: submitted {len(self.submitted)} job(s) in {len(self.arrays)} array(s), "
                 f"skipped {len(self.skipped)}; state: {self.state_path}"]
        for a in self.arrays:
            dep = f" after {a['dependency']}" if a.get("dependency") else ""
            lines.append(f"  {a['stage']:<9} {a['array_job_id']} × {a['size']}{dep}")
        reasons: dict[str, int] = defaultdict(int)
        for s in self.skipped:
            reasons[s["reason"]] += 1
        for reason, n in sorted(reasons.items()):
            lines.append(f"  skipped {n}: {reason}")
        return "\n".join(lines)


def _topological(jobs: Sequence[Any], known_done: Callable[[str], bool]) -> list[Any]:
    by_key: dict[str, Any] = {}
    for job in jobs:
        if job.key in by_key:
            raise ValueError(f"run key {job.key} appears twice in the plan ({by_key[job.key].label!r}, {job.label!r})")
        by_key[job.key] = job
    for job in jobs:
        for parent in job.parents:
            if parent not in by_key and not known_done(parent):
                raise ValueError(f"{job.label!r} depends on run {parent}, which is neither in the plan nor done in the store")
    order, mark = [], {}

    def visit(job: Any, path: tuple) -> None:
        if mark.get(job.key) == 2:
            return
        if mark.get(job.key) == 1:
            cycle = " -> ".join(by_key[k].label for k in (*path, job.key))
            raise ValueError(f"dependency cycle in the plan: {cycle}")
        mark[job.key] = 1
        for parent in job.parents:
            if parent in by_key:
                visit(by_key[parent], (*path, job.key))
        mark[job.key] = 2
        order.append(job)

    for job in jobs:
        visit(job, ())
    return order


def _default_store(store_root: str):
    from benchmark.runs.store import RunStore  # the harness's run store

    return RunStore(store_root)


def _find_repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def submit_jobs(
    jobs: Sequence[Any],
    *,
    name: str,
    results_dir: str | os.PathLike,
    store_root: str | os.PathLike,
    profile: SlurmProfile,
    store: Any = None,
    fn: Callable | str = DEFAULT_STAGE_FN,
    repo_root: str | os.PathLike | None = None,
    threaded: bool = True,
    env: Mapping[str, str] | None = None,
) -> SubmitSummary:
    """Submit what the plan still needs and return at once (never waits for jobs).

    ``jobs``: ``benchmark.experiments.plan.Job``-like objects (``stage``, ``key``, ``config``,
    ``parents``, ``label``).  ``store``: anything with ``status(key)``; by default
    ``benchmark.runs.store.RunStore(store_root)``.  ``fn``: the stage function (or its
    ``"module:attr"`` path, imported inside the job, i.e. from the snapshot).  ``env``:
    variables exported in the job script (after the snapshot's, before the stage runs),
    e.g. absolute ``DETBENCH_RUNS``/``DETBENCH_CACHE``/``DETBENCH_RESULTS``: the jobs run
    from the snapshot directory, where relative defaults would point elsewhere.
    """
    results_dir = Path(results_dir).resolve()
    store_root = str(Path(store_root).resolve())
    store = store if store is not None else _default_store(store_root)
    state = SlurmState.for_name(results_dir, name)
    summary = SubmitSummary(name=name, state_path=state.path)

    statuses: dict[str, str] = {}

    def status(key: str) -> str:
        if key not in statuses:
            statuses[key] = store.status(key)
        return statuses[key]

    order = _topological(list(jobs), lambda k: status(k) == "done")
    previous = state.runs
    slurm = slurm_job_states(e.get("job_id") for k, e in previous.items() if k in {j.key for j in order})

    to_submit: list[Any] = []
    submit_keys: set[str] = set()
    queued: dict[str, str] = {}  # key -> job id of a live job kept as it is
    blocked: set[str] = set()
    stale: list[str] = []
    for job in order:
        st = status(job.key)
        skip = lambda reason, **kw: summary.skipped.append(  # noqa: E731
            {"key": job.key, "label": job.label, "stage": job.stage, "reason": reason, **kw})
        if st == "done":
            skip("done")
            continue
        if st == "diverged":  # a deterministic outcome: resubmitting would diverge again
            skip("diverged")
            blocked.add(job.key)
            continue
        if any(p in blocked for p in job.parents):
            skip("blocked: a parent run diverged")
            blocked.add(job.key)
            continue
        entry = previous.get(job.key) or {}
        info = slurm.get(str(entry.get("job_id")))
        parent_resubmitted = any(p in submit_keys for p in job.parents)
        if _is_alive(info) and not (parent_resubmitted and info["state"] == "PENDING"):
            skip(f"already {info['state'].lower()}", job_id=entry["job_id"])
            queued[job.key] = entry["job_id"]
            continue
        if info and info["state"] in ACTIVE_STATES:
            stale.append(entry["job_id"])  # waits forever or on a parent that is replaced
        to_submit.append(job)
        submit_keys.add(job.key)

    if stale:
        cancel(stale)
        summary.cancelled = stale
        state.record_many({k: {"cancelled": True} for k, e in previous.items() if e.get("job_id") in stale})
    if not to_submit:
        state.record_many({}, submission={"at": now_iso(), "submitted": 0, "skipped": len(summary.skipped)})
        return summary

    repo = Path(repo_root) if repo_root else _find_repo_root()
    snap_root = Path(profile.snapshot_dir) if profile.snapshot_dir else results_dir / "slurm" / "snapshots"
    if not snap_root.is_absolute():
        snap_root = repo / snap_root
    snapshot = snapshot_code(repo, snap_root)
    summary.snapshot = snapshot
    setup = [
        f"export PYTHONPATH={shlex.quote(str(snapshot.path))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export DETBENCH_SNAPSHOT={shlex.quote(str(snapshot.path))}",
        f"export DETBENCH_SOURCE_ROOT={shlex.quote(str(repo.resolve()))}",
        f"cd {shlex.quote(str(snapshot.path))}",
    ]
    if snapshot.sha:  # the snapshot has no .git: the run store's env.json reads the sha from here
        setup.append(f"export DETBENCH_SNAPSHOT_SHA={shlex.quote(snapshot.sha)}")
    for var, value in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise ValueError(f"env: {var!r} is not a valid environment variable name")
        setup.append(f"export {var}={shlex.quote(str(value))}")
    log_folder = results_dir / "slurm" / "logs" / name
    callable_ = StageJob(store_root, fn=fn, threaded=threaded)

    # level = 1 + deepest parent submitted in this call: parents go out before children
    level: dict[str, int] = {}
    for job in to_submit:  # topological order
        level[job.key] = 1 + max((level[p] for p in job.parents if p in level), default=-1)
    new_ids: dict[str, str] = {}
    for lvl in sorted(set(level.values())):
        groups: dict[tuple, list[Any]] = defaultdict(list)
        for job in to_submit:
            if level[job.key] != lvl:
                continue
            deps = tuple(sorted({new_ids.get(p) or queued[p] for p in job.parents if p in new_ids or p in queued}))
            groups[(job.stage, deps)].append(job)
        for (stage, deps), group in groups.items():
            stage_profile = profile.for_stage(stage)
            chunk_size = stage_profile.resolved_max_array_size()
            for start in range(0, len(group), chunk_size):
                chunk = group[start:start + chunk_size]
                _submit_chunk(chunk, stage, deps, stage_profile, log_folder, setup, callable_, name,
                              snapshot, state, summary, new_ids)
    state.record_many({}, submission={"at": now_iso(), "submitted": len(summary.submitted),
                                      "skipped": len(summary.skipped), "snapshot": snapshot.as_dict()})
    return summary


def _submit_chunk(chunk, stage, deps, profile, log_folder, setup, callable_, name, snapshot, state, summary, new_ids):
    executor = submitit.AutoExecutor(folder=log_folder / "%j", cluster="slurm")
    params = profile.executor_parameters()
    extra = dict(params.pop("slurm_additional_parameters", {}))
    dependency = f"afterok:{':'.join(deps)}" if deps else None
    if dependency:
        extra["dependency"] = dependency
        extra.setdefault("kill-on-invalid-dep", "no")  # keep it visible as DependencyNeverSatisfied
    executor.update_parameters(name=f"detbench-{name}-{stage}", slurm_setup=list(setup),
                               slurm_additional_parameters=extra, **params)
    submitted = []
    with executor.batch():
        for job in chunk:
            submitted.append(executor.submit(callable_, job))
    entries = {}
    at = now_iso()
    for job, sjob in zip(chunk, submitted):
        job_id = str(sjob.job_id)
        array_id, _, task = job_id.partition("_")
        new_ids[job.key] = job_id
        entries[job.key] = {
            "stage": job.stage, "label": job.label, "job_id": job_id, "array_job_id": array_id,
            "array_task_id": int(task) if task else None, "submitted_at": at,
            "stdout": str(sjob.paths.stdout), "stderr": str(sjob.paths.stderr),
            "parents": list(job.parents), "dependency": dependency, "profile": profile.name,
            "snapshot": snapshot.as_dict(), "cancelled": False,
        }
        summary.submitted.append({"key": job.key, "label": job.label, "stage": stage, "job_id": job_id,
                                  "dependency": dependency})
    state.record_many(entries)  # recorded chunk by chunk: a later failure loses nothing
    summary.arrays.append({"stage": stage, "array_job_id": str(submitted[0].job_id).partition("_")[0],
                           "size": len(chunk), "dependency": dependency})
