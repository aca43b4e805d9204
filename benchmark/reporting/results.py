"""Runs as data: every run of the store as one pandas DataFrame.

``load_runs()`` reads each run folder (``config.json``, ``env.json``, ``metrics.json``,
``log.jsonl``, the FAILED/DIVERGED markers) into one row: the resolved config flattened
under ``cfg.``, the environment under ``env.``, the metrics under ``metrics.``, its status,
its creation time (recorded by the run in ``env.json``, never a file's mtime) and its cost.
Tables, leaderboards and ``detbench runs`` are all rendered from this frame, so a notebook
that calls ``load_runs()`` sees exactly what the tables see.

Cost of a run (columns ``hours``, ``gpu_hours``, ``cpu_hours``, ``cost_source``):
* a Slurm run (``env.slurm`` records its job id) with ``sacct`` on the PATH: the job's
  elapsed time x its allocated GPUs, and its CPU time (``CPUTimeRAW``), summed over every
  requeued attempt (``sacct --duplicates``);
* otherwise the run's own wall clock (``metrics.wall_s``, or the last ``time`` of its log
  when it did not finish): on a GPU machine one process uses one GPU (GPU-hours = hours);
  on a CPU machine CPU-hours = the process's wall-clock hours.

Chain columns resolve what an evaluation or fine-tuning run belongs to by walking up its
parents: ``method``, ``pretrain_epochs``, ``detector``, ``backbone``, ``schedule``,
``data_kind``, ``weights_not_loaded`` (the groups of the pretrained weights file that the
fine-tuning run did not load, or loaded in part, from its ``load_report.json``: "fpn, box_head";
None when it loaded the whole file or started from scratch), and the cost of the whole chain (``chain_hours``, ``chain_gpu_hours``,
``chain_cpu_hours``: pretraining + fine-tuning + evaluation).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from benchmark.runs.store import RunStore

# the columns every frame has, even an empty one (a notebook can filter an empty store)
BASE_COLUMNS = ["key", "stage", "status", "label", "scale", "seed", "parent", "created", "finished",
                "host", "gpus", "git_sha", "git_dirty", "slurm_job_id", "error", "hours", "gpu_hours",
                "cpu_hours", "cost_source", "method", "pretrain_epochs", "detector", "backbone",
                "schedule", "data_kind", "weights_not_loaded", "chain_hours", "chain_gpu_hours",
                "chain_cpu_hours"]


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> dotted keys; lists become JSON text (one cell, comparable, CSV-safe)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    """The inverse of :func:`flatten` (JSON-text lists stay text)."""
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _log_seconds(path: Path) -> float | None:
    """The last ``time`` (seconds since the stage started) in a run's log.jsonl."""
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            t = json.loads(line).get("time")
        except ValueError:
            continue  # a line cut by a kill: the earlier ones still count
        if isinstance(t, (int, float)):
            last = float(t)
    return last


def _error(run_dir: Path) -> str | None:
    for marker in ("DIVERGED", "FAILED"):
        p = run_dir / marker
        if p.exists():
            lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
            return lines[-1].strip() if lines else marker.lower()
    return None


def slurm_job_id(slurm_env: dict) -> str | None:
    """The id sacct knows a run's job by: ``<array job>_<task>`` for an array task."""
    if slurm_env.get("SLURM_ARRAY_JOB_ID") and slurm_env.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{slurm_env['SLURM_ARRAY_JOB_ID']}_{slurm_env['SLURM_ARRAY_TASK_ID']}"
    return slurm_env.get("SLURM_JOB_ID")


def sacct_usage(job_ids) -> dict[str, dict]:
    """job id -> {"elapsed_s", "cpu_s", "gpus"} from ``sacct`` (every attempt of a requeued
    job summed); {} when sacct is not installed or does not answer."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,ElapsedRaw,CPUTimeRAW,AllocTRES",
                            "-j", ",".join(ids)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    if r.returncode != 0:
        return {}
    out: dict[str, dict] = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or parts[0] not in ids:
            continue
        tres = dict(kv.split("=", 1) for kv in parts[3].split(",") if "=" in kv)
        gpus = int(tres.get("gres/gpu", 0) or 0)
        u = out.setdefault(parts[0], {"elapsed_s": 0.0, "cpu_s": 0.0, "gpus": 0})
        u["elapsed_s"] += float(parts[1] or 0)
        u["cpu_s"] += float(parts[2] or 0)
        u["gpus"] = max(u["gpus"], gpus)
    return out


def groups_not_loaded(report: dict) -> list[str]:
    """The groups of a load report (``load_report.json``) with file keys that did not load:
    no place in the detector, the wrong shape, or dropped by the recipe. "other" (fc.*, a
    classifier no detector takes) does not count."""
    return [g for g, r in report.get("groups", {}).items()
            if g != "other" and (r.get("unexpected") or r.get("mismatched") or r.get("dropped"))]


def _read_run(d: Path, store: RunStore) -> dict | None:
    status = store.status(d.name)
    if status == "missing":
        return None
    cfg = _read_json(d / "config.json") or {}   # a run marked failed before it began has none
    env = _read_json(d / "env.json") or {}
    metrics = _read_json(d / "metrics.json")
    hw = env.get("hardware", {})
    git = env.get("git", {})
    wall = (metrics or {}).get("wall_s")
    if wall is None:
        wall = _log_seconds(d / "log.jsonl")
    row = {
        "key": d.name, "stage": cfg.get("stage"), "status": status, "label": cfg.get("label", ""),
        "scale": cfg.get("scale"), "seed": cfg.get("seed"), "parent": cfg.get("parent"),
        "created": env.get("time"), "finished": (metrics or {}).get("finished"),
        "host": hw.get("host"), "gpus": ", ".join(hw.get("gpus") or []) or None,
        "git_sha": git.get("sha"), "git_dirty": git.get("dirty"),
        "slurm_job_id": slurm_job_id(env.get("slurm") or {}), "error": _error(d),
        "hours": None if wall is None else float(wall) / 3600.0,
        "_cuda": bool(hw.get("cuda")),
        "_not_loaded": ", ".join(groups_not_loaded(_read_json(d / "load_report.json") or {})) or None,
    }
    row.update(flatten({k: v for k, v in cfg.items() if k not in ("key", "label")}, "cfg."))
    row.update(flatten(env, "env."))
    row.update(flatten({k: v for k, v in (metrics or {}).items() if k != "finished"}, "metrics."))
    return row


def _cost(row: dict, sacct: dict) -> tuple[float | None, float | None, str | None]:
    u = sacct.get(row["slurm_job_id"]) if row["slurm_job_id"] else None
    if u:
        return u["elapsed_s"] * u["gpus"] / 3600.0, u["cpu_s"] / 3600.0, "sacct"
    h = row["hours"]
    if h is None:
        return None, None, None
    if row["_cuda"]:
        return h, None, "wall_s"
    return 0.0, h, "wall_s"


def load_runs(root: str | Path | None = None, *, use_sacct: bool = True) -> pd.DataFrame:
    """Every run in the store (default ``results/runs`` or ``$DETBENCH_RUNS``), one row each,
    indexed by run key, sorted by creation time. See the module doc for the columns."""
    store = RunStore(root)
    rows = [r for d in sorted(store.root.iterdir()) if d.is_dir() for r in [_read_run(d, store)] if r]
    usage = sacct_usage(r["slurm_job_id"] for r in rows) if use_sacct else {}
    for r in rows:
        r["gpu_hours"], r["cpu_hours"], r["cost_source"] = _cost(r, usage)
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        _resolve_chain(r, by_key)
    for r in rows:
        r.pop("_cuda")
        r.pop("_not_loaded")
    df = pd.DataFrame(rows)
    for c in BASE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    rest = sorted(c for c in df.columns if c not in BASE_COLUMNS)
    df = df[BASE_COLUMNS + rest]
    df["created"] = pd.to_datetime(df["created"], errors="coerce")
    df["finished"] = pd.to_datetime(df["finished"], errors="coerce")
    df = df.sort_values(["created", "key"], na_position="last", kind="stable").set_index("key", drop=False)
    df.index.name = None
    return df


def _resolve_chain(r: dict, by_key: dict) -> None:
    """Fill the chain columns of ``r`` from itself and its ancestors."""
    chain, node, seen = [], r, set()
    while node is not None and node["key"] not in seen:
        seen.add(node["key"])
        chain.append(node)
        node = by_key.get(node.get("parent")) if node.get("parent") else None
    ft = next((n for n in chain if n["stage"] == "finetune"), None)
    pre = next((n for n in chain if n["stage"] == "pretrain"), None)
    if pre is not None:
        r["method"] = pre.get("cfg.method.name")
        r["pretrain_epochs"] = pre.get("cfg.recipe.epochs")
    elif ft is not None and not ft.get("parent"):
        r["method"] = "scratch"
    if ft is not None:
        r["weights_not_loaded"] = ft.get("_not_loaded")
        r["detector"] = ft.get("cfg.detector.name")
        r["backbone"] = ft.get("cfg.detector.backbone")
        r["schedule"] = ft.get("cfg.schedule")
        if r.get("seed") is None:
            r["seed"] = ft.get("seed")
    r["data_kind"] = r.get("cfg.data.kind")
    complete = chain[-1]["stage"] == "pretrain" or not chain[-1].get("parent")
    for col, src in (("chain_hours", "hours"), ("chain_gpu_hours", "gpu_hours"), ("chain_cpu_hours", "cpu_hours")):
        vals = [n.get(src) for n in chain]
        r[col] = sum(vals) if complete and all(v is not None for v in vals) else None


def _text(v, default: str) -> str:
    return default if v is None or (isinstance(v, float) and v != v) else str(v)


def describe_reuse(df: pd.DataFrame, keys) -> str:
    """One line on the finished runs among ``keys``: how many, made when, at which commits,
    on which machines (so a user knows that nothing trained, and what was reused)."""
    done = df[df.index.isin(list(keys)) & (df["status"] == "done")]
    if done.empty:
        return "no finished runs to reuse"
    c = done["created"].dropna()
    when = ("at unknown times" if c.empty else
            f"made {c.min():%Y-%m-%d %H:%M}" + ("" if f"{c.max():%Y%m%d%H%M}" == f"{c.min():%Y%m%d%H%M}"
                                                else f" to {c.max():%Y-%m-%d %H:%M}"))
    shas = done["git_sha"].fillna("unknown").str[:7]
    dirty = done.loc[done["git_dirty"] == True, "git_sha"].fillna("unknown").str[:7]  # noqa: E712
    commits = ", ".join(f"{s}{' (dirty)' if s in set(dirty) else ''} ×{n}" for s, n in shas.value_counts().items())
    machines = done.apply(lambda r: f"{_text(r['host'], '?')} ({_text(r['gpus'], 'CPU only')})",
                          axis=1).value_counts()
    where = ", ".join(f"{m} ×{n}" for m, n in machines.items())
    return f"{len(done)} finished runs, {when}, at commits {commits}, on {where}"
