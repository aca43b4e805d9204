"""Plan → submit → status → collect: the harness side of the Slurm executor.

* :func:`submit_plan` submits what a planned table or grid still needs (``submit_jobs``)
  and returns at once; it records the plan's parameters in the table's state file
  (``<results>/slurm/<name>.json``) so that ``detbench collect`` can rebuild the plan later,
  from any shell.
* ``cli_status`` / ``cli_collect`` / ``cli_cancel`` back ``detbench status|collect|cancel``.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from benchmark.common.paths import cache_root, results_root
from benchmark.experiments.tables import load_spec, SPECS
from benchmark.runs.store import RunStore
from slurm.profile import load_profile, SlurmProfile
from slurm.state import now_iso, SlurmState, state_path, StateError
from slurm.submit import (_run, ACTIVE_STATES, cancel, DEAD_REASONS, slurm_job_states, SlurmUnavailable, submit_jobs,
                          SubmitSummary)

# Slurm states → the status a run is counted under (when the run store does not say done/diverged)
_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED"}
_REQUEUED = {"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED"}
_CANCELLED = {"CANCELLED", "REVOKED"}
STATUS_ORDER = ("pending", "running", "requeued", "done", "failed", "diverged", "cancelled", "blocked",
                "not submitted")


# ====================================================================== helpers
def _results_dir(results_dir: str | os.PathLike | None = None) -> Path:
    if results_dir is not None:
        return Path(results_dir).resolve()

    return results_root().resolve()


def job_environment(store_root: str | os.PathLike, results_dir: str | os.PathLike) -> dict[str, str]:
    """Absolute ``DETBENCH_RUNS`` / ``DETBENCH_CACHE`` / ``DETBENCH_RESULTS`` for the jobs
    (they run in the code snapshot, where relative defaults would point inside it)."""

    return {"DETBENCH_RUNS": str(Path(store_root).resolve()),
            "DETBENCH_CACHE": str(cache_root().resolve()),
            "DETBENCH_RESULTS": str(Path(results_dir).resolve())}


def _spec_ref(spec) -> str:
    """A shipped table by name, any other spec file by its absolute path."""

    path = getattr(spec, "path", None)
    if path is None:
        return spec.name
    path = Path(path).resolve()
    return spec.name if path == (SPECS / f"{spec.name}.yaml").resolve() else str(path)


def plan_record(plan, store_root: str | os.PathLike) -> dict:
    """What the state file keeps about a plan: enough to rebuild it (``rebuild_plan``).
    The jobs' configs stay in the run store."""
    spec = plan.spec
    spec_text = None
    if getattr(spec, "path", None) and Path(spec.path).is_file():
        spec_text = Path(spec.path).read_text()
    return {"table": spec.name, "kind": getattr(spec, "kind", "table"), "spec": _spec_ref(spec),
            "spec_text": spec_text, **plan.to_dict(configs=False),
            "store_root": str(Path(store_root).resolve()), "recorded_at": now_iso()}


def _load_spec_from_record(rec: dict, state_file: Path):

    ref = rec["spec"]
    try:
        return load_spec(ref)
    except Exception:
        if not rec.get("spec_text"):
            raise
    copy = state_file.with_name(f"{state_file.stem}.spec.yaml")
    copy.write_text(rec["spec_text"])
    print(f"{state_file}: spec {ref} is gone; using the copy recorded at submission ({copy})", file=sys.stderr)
    return load_spec(str(copy))


def _same_runs(a, b) -> bool:
    """Two lists of cells point at the same runs (whatever reason a cell without runs gives)."""
    return [replace(c, missing="") for c in a] == [replace(c, missing="") for c in b]


def rebuild_plan(results_dir: str | os.PathLike, name: str):
    """The plan a table's state file was submitted with.

    Re-planned from the recorded parameters; when that gives other runs than the ones
    submitted (the spec or the code changed, or the overrides were not known), the plan
    recorded at submission (cells and jobs, without configs) is returned instead, so that
    the table shows what was run. Returns ``(plan, note)``; ``note`` says which way it was built.
    """
    from benchmark.experiments.plan import Cell, Plan, plan_table   # torch: not for `detbench status`

    state = SlurmState.for_name(results_dir, name)
    rec = state.load().get("plan")
    if not rec:
        raise StateError(state.path, "no plan recorded (submit it with `detbench reproduce|grid "
                                     "--executor slurm` first)")
    spec = _load_spec_from_record(rec, state.path)
    if rec.get("overrides") is not None:
        try:
            plan = plan_table(spec, scale=rec["scale"], seeds=tuple(rec["seeds"]), overrides=rec["overrides"])
            if _same_runs(plan.cells, [Cell.from_dict(c) for c in rec["cells"]]):
                return plan, "re-planned"
        except Exception as err:
            print(f"{name}: re-planning failed ({type(err).__name__}: {err}); using the recorded cells",
                  file=sys.stderr)
    try:
        return Plan.from_dict(rec, spec), "recorded cells (spec or code changed)"
    except ValueError as err:
        raise StateError(state.path, f"the recorded plan does not fit spec {rec['spec']}: {err}") from None


def _state_names(results_dir: Path, name: str | None) -> list[str]:
    if name:
        if name.endswith((".yaml", ".yml")):  # a spec path: its table name

            name = load_spec(name).name
        if not state_path(results_dir, name).exists():
            raise StateError(state_path(results_dir, name), f"nothing submitted for {name!r} "
                                                            f"(state files live in {results_dir / 'slurm'})")
        return [name]
    return sorted(p.stem for p in (results_dir / "slurm").glob("*.json"))


def _store_for(a_runs, rec: dict | None):

    if a_runs:
        return RunStore(a_runs)
    if rec and rec.get("store_root"):
        return RunStore(rec["store_root"])
    return RunStore()


# ====================================================================== submit
def submit_plan(plan, store, *, profile: str | SlurmProfile = "local-ci", overrides: Mapping | None = None,
                results_dir: str | os.PathLike | None = None,
                repo_root: str | os.PathLike | None = None, quiet: bool = False) -> SubmitSummary:
    """Submit the plan's missing runs to Slurm and return without waiting.

    ``profile``: a profile name (``configs/slurm/<name>.yaml``), a path, or a
    :class:`SlurmProfile`; ``overrides``: profile fields (``--slurm-set k=v``).
    The plan's ``--set`` overrides are recorded so that ``collect`` re-plans identically.  Results (state file, logs,
    snapshots) go under ``results_dir`` (default ``$DETBENCH_RESULTS`` or ``./results``).
    """
    if isinstance(profile, SlurmProfile):
        prof = profile.with_overrides(dict(overrides)) if overrides else profile
    else:
        prof = load_profile(profile, dict(overrides or {}))
    results = _results_dir(results_dir)
    store_root = Path(store.root).resolve()
    name = plan.spec.name
    state = SlurmState.for_name(results, name)
    # recorded first: a submission that fails half-way can still be followed up and collected
    state.set_fields(plan=plan_record(plan, store_root))
    summary = submit_jobs(plan.jobs, name=name, results_dir=results, store_root=store_root, profile=prof,
                          store=store, repo_root=repo_root, env=job_environment(store_root, results))
    if not quiet:
        print(format_summary(summary, prof), flush=True)
    return summary


def format_summary(summary: SubmitSummary, profile: SlurmProfile | None = None) -> str:
    lines = [str(summary)]
    if profile is not None:
        lines.insert(1, f"  profile {profile.name} ({profile.source})")
    if summary.snapshot is not None:
        snap = summary.snapshot
        lines.append(f"  code snapshot {snap.id}{' (dirty)' if snap.dirty else ''}: {snap.path}")
    for s in summary.submitted:
        dep = f"  after {s['dependency']}" if s.get("dependency") else ""
        lines.append(f"  submitted {s['job_id']:<12} {s['stage']:<9} {s['label']}{dep}")
    for s in summary.skipped:
        if s["reason"] != "done":  # done ones are counted in the summary line
            job = f" (job {s['job_id']})" if s.get("job_id") else ""
            lines.append(f"  skipped   {s['stage']:<9} {s['label']}: {s['reason']}{job}")
    if summary.cancelled:
        lines.append(f"  cancelled stale jobs: {' '.join(summary.cancelled)}")
    if summary.submitted:
        lines.append(f"  follow up: detbench status {summary.name}; detbench collect {summary.name}")
    return "\n".join(lines)


# ====================================================================== status
def requeue_counts(job_ids) -> dict[str, int]:
    """How many times each job was requeued (preempted, or USR2/timeout + requeue), from
    ``sacct --duplicates``: every earlier run of a requeued job is a record of its own."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    out = _run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", ",".join(ids)])
    counts: Counter = Counter()
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0] in ids:
            state = parts[1].split()[0] if parts[1] else ""
            if state in _REQUEUED or state == "PREEMPTED":
                counts[parts[0]] += 1
    return dict(counts)


def classify(store_status: str, slurm: dict | None, entry: dict | None) -> str:
    """One run's status from the run store (authoritative for done/diverged) and Slurm."""
    if store_status in ("done", "diverged"):
        return store_status
    if not entry:
        return "not submitted"
    state = (slurm or {}).get("state", "UNKNOWN")
    reason = (slurm or {}).get("reason", "")
    if state == "PENDING":
        return "blocked" if reason in DEAD_REASONS else "pending"
    if state in _RUNNING:
        return "running"
    if state in _REQUEUED:
        return "requeued"
    if state in _CANCELLED or (state == "UNKNOWN" and entry.get("cancelled")):
        return "cancelled"
    if state in ACTIVE_STATES:
        return "pending"
    return "failed"  # FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, COMPLETED without metrics, lost


def table_status(results_dir: str | os.PathLike, name: str, store=None) -> dict:
    """``{"name", "counts", "requeued_runs", "rows": [...]}`` for one table or grid."""
    state = SlurmState.for_name(results_dir, name)
    data = state.load()
    rec = data.get("plan") or {}
    store = store if store is not None else _store_for(None, rec)
    runs = data["runs"]
    jobs = rec.get("jobs") or [{"key": k, "stage": e.get("stage"), "label": e.get("label")} for k, e in runs.items()]
    ids = [runs[j["key"]]["job_id"] for j in jobs if j["key"] in runs and runs[j["key"]].get("job_id")]
    try:
        slurm = slurm_job_states(ids)
        requeues = requeue_counts(ids)
        slurm_ok = True
    except SlurmUnavailable:
        slurm, requeues, slurm_ok = {}, {}, False
    rows = []
    for j in jobs:
        entry = runs.get(j["key"])
        job_id = str(entry["job_id"]) if entry and entry.get("job_id") else None
        info = slurm.get(job_id) if job_id else None
        st = store.status(j["key"])
        rows.append({"key": j["key"], "stage": j.get("stage"), "label": j.get("label"), "job_id": job_id,
                     "status": classify(st, info, entry), "store_status": st,
                     "slurm_state": (info or {}).get("state", "UNKNOWN" if job_id else ""),
                     "reason": (info or {}).get("reason", ""), "requeues": requeues.get(job_id, 0) if job_id else 0,
                     "stdout": (entry or {}).get("stdout"), "stderr": (entry or {}).get("stderr")})
    counts = Counter(r["status"] for r in rows)
    return {"name": name, "counts": {k: counts.get(k, 0) for k in STATUS_ORDER},
            "requeued_runs": sum(1 for r in rows if r["requeues"]), "rows": rows, "slurm_ok": slurm_ok,
            "plan": {k: rec.get(k) for k in ("spec", "scale", "seeds", "overrides")} if rec else None}


def format_status(st: dict, verbose_done: bool = False) -> str:
    c = st["counts"]
    shown = ", ".join(f"{v} {k}" for k, v in c.items() if v or k in ("pending", "running", "done", "failed"))
    head = f"{st['name']}: {len(st['rows'])} runs: {shown}; preempted/requeued: {st['requeued_runs']}"
    if st.get("plan"):
        p = st["plan"]
        head += f"  [spec {p['spec']}, scale {p['scale']}, seeds {p['seeds']}]"
    lines = [head]
    if not st["slurm_ok"]:
        lines.append("  (Slurm does not answer: states from the run store only)")
    for r in st["rows"]:
        if r["status"] == "done" and not verbose_done and not r["job_id"]:
            continue  # done before it was ever submitted
        pending = r["slurm_state"] == "PENDING" and r["reason"] and r["reason"] != "None"
        slurm = r["slurm_state"] + (f" ({r['reason']})" if pending else "")
        req = f" requeued×{r['requeues']}" if r["requeues"] else ""
        lines.append(f"  {r['job_id'] or '-':<12} {r['status']:<10} {slurm:<24} {r['stage'] or '?':<9} "
                     f"{r['label']}{req}")
        if r["status"] in ("failed", "blocked", "running", "requeued", "cancelled") and r["stderr"]:
            lines.append(f"               log: {r['stderr']}  (stdout: {r['stdout']})")
    return "\n".join(lines)


def _submitted_names(a) -> list[str]:
    """The tables/grids named on the command line (or all with a state file); says so when
    there are none."""
    results = _results_dir()
    names = _state_names(results, getattr(a, "name", None))
    if not names:
        print(f"nothing submitted yet (no state files in {results / 'slurm'})")
    return names


def cli_status(a) -> int:
    results = _results_dir()
    for name in _submitted_names(a):
        rec = SlurmState.for_name(results, name).load().get("plan")
        print(format_status(table_status(results, name, _store_for(getattr(a, "runs", None), rec))))
    return 0


# ====================================================================== collect
def collect(results_dir: str | os.PathLike, name: str, store=None, out_root: str | os.PathLike | None = None) -> dict:
    """Rebuild the table's plan from its state file and render it. Returns a summary."""
    from benchmark.reporting.render import cell_values, render   # torch: not for `detbench status`

    plan, how = rebuild_plan(results_dir, name)
    rec = SlurmState.for_name(results_dir, name).load().get("plan") or {}
    store = store if store is not None else _store_for(None, rec)
    cells = cell_values(plan, store)
    by_status = Counter(c["status"] for c in cells.values())
    vdir = render(plan, store, out_root=Path(out_root) if out_root else Path(results_dir) / "tables")
    return {"name": name, "cells": len(cells), "filled": by_status.get("done", 0) + by_status.get("partial", 0),
            "by_status": dict(by_status), "table": vdir.parent / "table.md", "version": vdir.name, "how": how}


def cli_collect(a) -> int:
    results = _results_dir()
    rc = 0
    for name in _submitted_names(a):
        rec = SlurmState.for_name(results, name).load().get("plan")
        if not rec:
            print(f"{name}: no plan recorded in {state_path(results, name)}; skipped", file=sys.stderr)
            rc = 1
            continue
        out = collect(results, name, _store_for(getattr(a, "runs", None), rec))
        rest = ", ".join(f"{v} {k}" for k, v in sorted(out["by_status"].items()) if k not in ("done", "partial"))
        print(f"{name}: {out['filled']}/{out['cells']} cells filled{'; ' + rest if rest else ''}; "
              f"table: {out['table']} (version {out['version']}; {out['how']})")
    return rc


# ====================================================================== cancel
def cancel_table(results_dir: str | os.PathLike, name: str) -> list[str]:
    """scancel the table's live jobs (pending, running, requeued); mark them in the state file."""
    state = SlurmState.for_name(results_dir, name)
    runs = state.runs
    ids = {k: str(e["job_id"]) for k, e in runs.items() if e.get("job_id")}
    live_states = slurm_job_states(ids.values())
    live = {k: j for k, j in ids.items() if j in live_states and live_states[j]["state"] in ACTIVE_STATES}
    if not live:
        return []
    cancel(sorted(set(live.values())))
    at = now_iso()
    state.record_many({k: {"cancelled": True, "cancelled_at": at} for k in live},
                      submission={"at": at, "cancelled": len(live)})
    return sorted(set(live.values()))


def cli_cancel(a) -> int:
    results = _results_dir()
    names = _state_names(results, getattr(a, "name", None))
    for name in names:
        try:
            ids = cancel_table(results, name)
        except SlurmUnavailable as err:
            print(f"{name}: cannot cancel: {err}", file=sys.stderr)
            return 1
        print(f"{name}: cancelled {len(ids)} job(s){': ' + ' '.join(ids) if ids else ' (none live)'}")
    return 0
