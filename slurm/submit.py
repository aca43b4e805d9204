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
import functools
import hashlib
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

from benchmark.engine.signals import REQUESTS
from benchmark.runs.store import RunStore
from slurm.profile import SlurmProfile
from slurm.state import now_iso, SlurmState

log = logging.getLogger(__name__)

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


def run_stage(job: Any, store_root: str, resume: bool = True) -> dict:
    """The default stage function: ``benchmark.runner.run_job``, imported when the job runs
    (from the snapshot; submitting loads no torch)."""
    from benchmark.runner import run_job

    return run_job(job, store_root, resume=resume)


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

    def __init__(self, store_root: str, fn: Callable = run_stage, threaded: bool = True,
                 checkpoint_wait_s: float = 20.0):
        self.store_root = str(store_root)
        self.fn = fn
        self.threaded = threaded
        self.checkpoint_wait_s = checkpoint_wait_s

    def __call__(self, job: Any) -> Any:
        if _num_tasks() > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        fn = self.fn
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
    fn: Callable = run_stage,
    repo_root: str | os.PathLike | None = None,
    threaded: bool = True,
    env: Mapping[str, str] | None = None,
) -> SubmitSummary:
    """Submit what the plan still needs and return at once (never waits for jobs).

    ``jobs``: ``benchmark.experiments.plan.Job``-like objects (``stage``, ``key``, ``config``,
    ``parents``, ``label``).  ``store``: anything with ``status(key)``; by default
    ``benchmark.runs.store.RunStore(store_root)``.  ``fn``: the stage function
    ``fn(job, store_root, resume=True)``, pickled by reference (its module is imported in the
    job, from the snapshot).  ``env``: variables exported in the job script (after the
    snapshot's, before the stage runs), e.g. absolute ``DETBENCH_RUNS``/``DETBENCH_CACHE``/
    ``DETBENCH_RESULTS``: the jobs run from the snapshot directory, where relative defaults
    would point elsewhere.
    """
    results_dir = Path(results_dir).resolve()
    store_root = str(Path(store_root).resolve())
    status = functools.lru_cache(maxsize=None)((store if store is not None else _default_store(store_root)).status)
    state = SlurmState.for_name(results_dir, name)
    order = _topological(list(jobs), lambda k: status(k) == "done")
    previous = state.runs
    planned = {j.key for j in order}
    triage = _triage(order, status, previous, slurm_job_states(e.get("job_id") for k, e in previous.items()
                                                               if k in planned))
    if triage.stale:
        cancel(list(triage.stale))
        state.record_many({k: {"cancelled": True} for k, e in previous.items() if e.get("job_id") in triage.stale})
    if not triage.submit:
        state.record_many({}, submission={"at": now_iso(), "submitted": 0, "skipped": len(triage.skipped)})
        return SubmitSummary(name, state.path, skipped=list(triage.skipped), cancelled=list(triage.stale))
    repo = Path(repo_root) if repo_root else _find_repo_root()
    snapshot = snapshot_code(repo, _snapshot_root(profile, results_dir, repo))
    sub = _Submission(name=name, profile=profile, log_folder=results_dir / "slurm" / "logs" / name,
                      setup=_job_setup(snapshot, repo, env or {}), snapshot=snapshot,
                      stage_job=StageJob(store_root, fn=fn, threaded=threaded))
    submitted, arrays = _submit_levels(sub, state, triage.submit, triage.queued)
    state.record_many({}, submission={"at": now_iso(), "submitted": len(submitted),
                                      "skipped": len(triage.skipped), "snapshot": snapshot.as_dict()})
    return SubmitSummary(name, state.path, snapshot, submitted=submitted, skipped=list(triage.skipped),
                         cancelled=list(triage.stale), arrays=arrays)


# ---------------------------------------------------------------- which jobs go out
@dataclass(frozen=True)
class _Triage:
    """What one submission does with the plan's jobs (each tuple in topological order)."""
    submit: tuple = ()                     # jobs to submit
    skipped: tuple = ()                    # {key, label, stage, reason, job_id?} of the others
    queued: Mapping[str, str] = field(default_factory=dict)   # key -> id of a live job kept as it is
    stale: tuple = ()                      # ids of live jobs replaced by a resubmission: cancel them


def _verdict(job: Any, status: str, info: dict | None, blocked: set, resubmitted: set) -> tuple[str, str]:
    """``(action, reason)`` for one job: "skip" (done), "block" (it or a parent diverged; its
    children are blocked too), "keep" (its live job stays queued) or "submit"."""
    if status == "done":
        return "skip", "done"
    if status == "diverged":  # a deterministic outcome: resubmitting would diverge again
        return "block", "diverged"
    if any(p in blocked for p in job.parents):
        return "block", "blocked: a parent run diverged"
    # a pending job waits on its parents' old jobs: a resubmitted parent replaces it
    if _is_alive(info) and not (info["state"] == "PENDING" and any(p in resubmitted for p in job.parents)):
        return "keep", f"already {info['state'].lower()}"
    return "submit", ""


def _triage(order: Sequence[Any], status: Callable[[str], str], previous: Mapping[str, dict],
            slurm: Mapping[str, dict]) -> _Triage:
    """``previous``: the state file's entries; ``slurm``: Slurm's states of their job ids."""
    submit, skipped, stale = [], [], []
    queued: dict[str, str] = {}
    blocked: set[str] = set()
    resubmitted: set[str] = set()
    for job in order:
        entry = previous.get(job.key) or {}
        info = slurm.get(str(entry.get("job_id")))
        action, reason = _verdict(job, status(job.key), info, blocked, resubmitted)
        if action == "submit":
            if info and info["state"] in ACTIVE_STATES:
                stale.append(entry["job_id"])  # waits forever or on a parent that is replaced
            submit.append(job)
            resubmitted.add(job.key)
            continue
        row = {"key": job.key, "label": job.label, "stage": job.stage, "reason": reason}
        if action == "keep":
            queued[job.key] = entry["job_id"]
            row["job_id"] = entry["job_id"]
        elif action == "block":
            blocked.add(job.key)
        skipped.append(row)
    return _Triage(tuple(submit), tuple(skipped), queued, tuple(stale))


# ---------------------------------------------------------------- how they go out
@dataclass(frozen=True)
class _Submission:
    """What every batch of one ``submit_jobs`` call shares."""
    name: str
    profile: SlurmProfile
    log_folder: Path
    setup: tuple[str, ...]                 # job script lines run before the stage
    snapshot: Snapshot
    stage_job: StageJob


@dataclass(frozen=True)
class _Batch:
    """One sbatch call: a job array of one stage whose tasks all wait on the same jobs."""
    stage: str
    jobs: tuple
    after: tuple[str, ...] = ()            # Slurm job ids (afterok)

    @property
    def dependency(self) -> str | None:
        return f"afterok:{':'.join(self.after)}" if self.after else None


def _snapshot_root(profile: SlurmProfile, results_dir: Path, repo: Path) -> Path:
    root = Path(profile.snapshot_dir) if profile.snapshot_dir else results_dir / "slurm" / "snapshots"
    return root if root.is_absolute() else repo / root


def _job_setup(snapshot: Snapshot, repo: Path, env: Mapping[str, str]) -> tuple[str, ...]:
    """Job script lines: run the snapshot's code from its directory, then export ``env``."""
    setup = [
        f"export PYTHONPATH={shlex.quote(str(snapshot.path))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export DETBENCH_SNAPSHOT={shlex.quote(str(snapshot.path))}",
        f"export DETBENCH_SOURCE_ROOT={shlex.quote(str(repo.resolve()))}",
        f"cd {shlex.quote(str(snapshot.path))}",
    ]
    if snapshot.sha:  # the snapshot has no .git: the run store's env.json reads the sha from here
        setup.append(f"export DETBENCH_SNAPSHOT_SHA={shlex.quote(snapshot.sha)}")
    for var, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise ValueError(f"env: {var!r} is not a valid environment variable name")
        setup.append(f"export {var}={shlex.quote(str(value))}")
    return tuple(setup)


def _levels(jobs: Sequence[Any]) -> list[list[Any]]:
    """Jobs (topological order) by level, 1 + the deepest parent among them: a level goes
    out after the levels its parents are in."""
    level: dict[str, int] = {}
    for job in jobs:
        level[job.key] = 1 + max((level[p] for p in job.parents if p in level), default=-1)
    return [[j for j in jobs if level[j.key] == n] for n in sorted(set(level.values()))]


def _batches(jobs: Sequence[Any], ids: Mapping[str, str], profile: SlurmProfile) -> list[_Batch]:
    """One level's jobs as arrays of one stage and one dependency, no larger than the stage's
    max array size.  ``ids``: run key -> Slurm job id of the parents queued or submitted."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for job in jobs:
        groups[(job.stage, tuple(sorted({ids[p] for p in job.parents if p in ids})))].append(job)
    batches = []
    sizes: dict[str, int] = {}   # per stage: asking the cluster (scontrol) once, not once per group
    for (stage, after), group in groups.items():
        if stage not in sizes:
            sizes[stage] = profile.for_stage(stage).resolved_max_array_size()
        size = sizes[stage]
        batches += [_Batch(stage, tuple(group[i:i + size]), after) for i in range(0, len(group), size)]
    return batches


# how often (seconds) the batches that went out are written to the state file while a
# submission goes on; whatever went out is written when it ends, a failure included
RECORD_EVERY_S = 1.0


def _submit_levels(sub: _Submission, state: SlurmState, jobs: Sequence[Any],
                   queued: Mapping[str, str]) -> tuple[list[dict], list[dict]]:
    """Submit ``jobs`` level by level, each job after its parents' jobs (``queued``: those kept
    from an earlier submission).  The batches that went out are recorded in the state file
    every ``RECORD_EVERY_S`` seconds and, whatever happens, when this returns or raises, so a
    later failure (an sbatch error, Ctrl-C) loses nothing.  (Rewriting the whole file after each
    of a 1,000-run grid's 501 sbatch calls cost more than the calls.)  Returns the summary's
    ``submitted`` and ``arrays``."""
    ids = dict(queued)
    submitted: list[dict] = []
    arrays: list[dict] = []
    unrecorded: dict[str, dict] = {}
    last = time.monotonic()
    try:
        for level in _levels(jobs):
            for batch in _batches(level, ids, sub.profile):
                entries = _entries(sub, batch, _sbatch(sub, batch), now_iso())
                unrecorded.update(entries)
                ids.update({key: e["job_id"] for key, e in entries.items()})
                submitted += [{"key": key, "label": e["label"], "stage": batch.stage, "job_id": e["job_id"],
                               "dependency": batch.dependency} for key, e in entries.items()]
                arrays.append({"stage": batch.stage, "array_job_id": entries[batch.jobs[0].key]["array_job_id"],
                               "size": len(batch.jobs), "dependency": batch.dependency})
                if time.monotonic() - last >= RECORD_EVERY_S:
                    state.record_many(unrecorded)
                    unrecorded, last = {}, time.monotonic()
    finally:
        if unrecorded:
            state.record_many(unrecorded)
    return submitted, arrays


def _sbatch(sub: _Submission, batch: _Batch) -> list[submitit.Job]:
    """Submit one batch as one job array; its submitit jobs, in the batch's order."""
    executor = submitit.AutoExecutor(folder=sub.log_folder / "%j", cluster="slurm")
    params = sub.profile.for_stage(batch.stage).executor_parameters()
    extra = dict(params.pop("slurm_additional_parameters", {}))
    if batch.dependency:
        extra["dependency"] = batch.dependency
        extra.setdefault("kill-on-invalid-dep", "no")  # keep it visible as DependencyNeverSatisfied
    executor.update_parameters(name=f"detbench-{sub.name}-{batch.stage}", slurm_setup=list(sub.setup),
                               slurm_additional_parameters=extra, **params)
    with executor.batch():
        sjobs = [executor.submit(sub.stage_job, job) for job in batch.jobs]
    return sjobs  # their job ids are known once the batch is out


def _entries(sub: _Submission, batch: _Batch, sjobs: Sequence[Any], at: str) -> dict[str, dict]:
    """The state file's entry of each job of a submitted batch."""
    entries = {}
    for job, sjob in zip(batch.jobs, sjobs, strict=True):
        job_id = str(sjob.job_id)
        array_id, _, task = job_id.partition("_")
        entries[job.key] = {
            "stage": job.stage, "label": job.label, "job_id": job_id, "array_job_id": array_id,
            "array_task_id": int(task) if task else None, "submitted_at": at,
            "stdout": str(sjob.paths.stdout), "stderr": str(sjob.paths.stderr),
            "parents": list(job.parents), "dependency": batch.dependency,
            "profile": sub.profile.for_stage(batch.stage).name, "snapshot": sub.snapshot.as_dict(),
            "cancelled": False,
        }
    return entries
