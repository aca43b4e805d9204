"""What a table run tells its user while it runs and when it ends.

:class:`TableProgress` prints one table-level line per started/finished run: how many runs
are done, the stages running now, the time spent and an ETA. The ETA sums an estimate for
every run still to do (the median wall clock of finished runs of the same stage and scale
in the run stores: same method and length for pretraining, same schedule for fine-tuning),
divided by the runs at once, and corrected by how this session's runs compare with their
estimates; with no earlier runs it extrapolates this session's rate. A failure's error is
printed once: later runs failing with the same error say so in a word.
:func:`failure_summary` groups a plan's failed runs by error, for the closing message."""
from __future__ import annotations

import statistics
import sys
import time
from collections import Counter

from benchmark.common.paths import runs_root
from benchmark.experiments.plan import Plan
from benchmark.reporting.results import load_runs
from benchmark.runs.job import Job
from benchmark.runs.store import RESULTS, RunStore


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" \
        if s >= 60 else f"{s} s"


def _job_kind(stage: str, cfg: dict) -> tuple:
    if stage == "pretrain":
        return (stage, cfg.get("scale"), (cfg.get("method") or {}).get("name"), (cfg.get("recipe") or {}).get("epochs"))
    if stage == "finetune":
        return (stage, cfg.get("scale"), cfg.get("schedule"), (cfg.get("recipe") or {}).get("steps"))
    return (stage, cfg.get("scale"))


def _frame_kind(r) -> tuple:
    if r["stage"] == "pretrain":
        return ("pretrain", r["scale"], r.get("cfg.method.name"), r.get("cfg.recipe.epochs"))
    if r["stage"] == "finetune":
        return ("finetune", r["scale"], r.get("cfg.schedule"), _int(r.get("cfg.recipe.steps")))
    return (r["stage"], r["scale"])


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def duration_estimates(frames) -> dict[tuple, float]:
    """(stage, scale[, method, epochs | schedule, steps]) -> median seconds of finished runs;
    (stage, scale) -> the median over the stage; ("finetune", scale, "per step") -> median
    seconds per fine-tuning step (a schedule run with other steps, e.g. ``--set
    finetune.steps=900``, is estimated from it)."""
    import pandas as pd
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return {}
    df = pd.concat(frames)
    df = df[(df["status"] == "done") & df["hours"].notna()]
    df = df[~df.index.duplicated()]
    est: dict[tuple, list] = {}
    for _, r in df.iterrows():
        s = float(r["hours"]) * 3600
        kind = _frame_kind(r)
        est.setdefault(kind, []).append(s)
        est.setdefault((r["stage"], r["scale"]), []).append(s)
        if kind[0] == "finetune" and kind[3]:     # (finetune, scale, schedule, steps)
            est.setdefault(("finetune", r["scale"], "per step"), []).append(s / kind[3])
    return {k: statistics.median(v) for k, v in est.items()}


class TableProgress:
    def __init__(self, plan: Plan, store_root=None, *, jobs: int = 1, out=None, estimates: dict | None = None):
        self.plan, self.jobs, self.out = plan, max(1, jobs), out or sys.stdout
        store = RunStore(store_root)
        self.todo = {j.key: j for j in plan.jobs if store.status(j.key) not in RESULTS}
        self.total = len(self.todo)
        if estimates is None:
            estimates = duration_estimates(self._frames(store.root))
        self.est = {k: self._estimate(j, estimates) for k, j in self.todo.items()}
        self.running: dict[str, float] = {}
        self.finished: Counter = Counter()  # status -> runs
        self.done_keys: set[str] = set()
        self.ratio: list[float] = []          # actual / estimated, for this session's runs
        self.errors: dict[str, str] = {}      # error text -> first label that had it
        self.t0 = time.time()
        known = sum(v is not None for v in self.est.values())
        if self.total:
            eta = self.eta()
            self._print(f"[{plan.spec.name}] {self.total} runs to run, {self.jobs} at once"
                        + (f"; estimated {_fmt_s(eta)} (from earlier runs of {known}/{self.total} kinds)"
                           if eta is not None else "; no earlier runs to estimate from: ETA after the first"))

    @staticmethod
    def _frames(root):
        roots = {str(root), str(runs_root())}
        out = []
        for r in roots:
            try:
                out.append(load_runs(r, use_sacct=False))
            except (OSError, ValueError):
                continue
        return out

    @staticmethod
    def _estimate(job: Job, est: dict) -> float | None:
        cfg = job.config or {}
        kind = _job_kind(job.stage, cfg)
        if kind in est:
            return est[kind]
        steps, per_step = (cfg.get("recipe") or {}).get("steps"), est.get(("finetune", cfg.get("scale"), "per step"))
        if job.stage == "finetune" and steps and per_step:
            return per_step * steps
        return est.get((job.stage, cfg.get("scale")))

    def _print(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def eta(self) -> float | None:
        left = [k for k in self.todo if k not in self.done_keys]
        if not left:
            return 0.0
        ests = [self.est.get(k) for k in left]
        if all(e is not None for e in ests):
            scale = statistics.median(self.ratio) if self.ratio else 1.0
            # a running run is half done on average
            return sum(e * (0.5 if k in self.running else 1.0) for k, e in zip(left, ests)) * scale / self.jobs
        done = sum(self.finished.values())
        if done:
            return (time.time() - self.t0) / done * len(left)
        return None

    def line(self) -> str:
        done = sum(self.finished.values())
        stages = Counter(self.todo[k].stage for k in self.running)
        now = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in stages.items()) or "–"
        bad = ", ".join(f"{n} {s}" for s, n in self.finished.items() if s != "done")
        return (f"[{self.plan.spec.name}] {done}/{self.total} runs" + (f" ({bad})" if bad else "")
                + f" · running: {now} · {_fmt_s(time.time() - self.t0)} elapsed · ETA {_fmt_s(self.eta())}")

    def start(self, job: Job, note: str = "") -> None:
        self.running[job.key] = time.time()
        self._print(f"[start] {job.stage} {job.label} ({job.key}{', ' + note if note else ''})")

    def finish(self, job: Job, status: str, error: str | None = None) -> None:
        t = self.running.pop(job.key, None)
        self.finished[status] += 1
        self.done_keys.add(job.key)
        if t is not None and status == "done" and self.est.get(job.key):
            self.ratio.append((time.time() - t) / self.est[job.key])
        if error:
            first = self.errors.setdefault(error, job.label)
            msg = f"    {status.upper()}: {job.label}: " + (error if first == job.label
                                                           else f"the same error as {first}")
            self._print(msg)
        self._print(self.line())


def failure_summary(plan: Plan, df) -> tuple[int, int, str]:
    """(failed runs, runs with a value-bearing cell, message) for the plan's runs in the
    frame: each distinct error once, with the runs that had it; with no failed run and no
    value (every run diverged), one line saying so."""
    keys = [j.key for j in plan.jobs]
    sub = df[df.index.isin(keys)]
    failed = sub[sub["status"] == "failed"]
    filled = sum(1 for c in plan.cells if c.eval_key and c.eval_key in df.index
                 and df.at[c.eval_key, "status"] == "done")
    if failed.empty:
        told = ", ".join(f"{n} {s}" for s, n in sub["status"].value_counts().items() if s != "done")
        return 0, filled, "" if filled else (f"{plan.spec.name}: no cell has a value"
                                             + (f" ({told} of {len(keys)} runs)" if told else "")
                                             + ": the table was not written")
    lines = [f"{plan.spec.name}: {len(failed)} of {len(keys)} runs failed"
             + ("" if filled else " and no cell has a value: the table was not written") + ":"]
    for err, grp in failed.groupby(failed["error"].fillna("unknown error"), sort=False):
        labels = list(grp["label"])
        more = f" and {len(labels) - 1} more" if len(labels) > 1 else ""
        lines.append(f"  {err}  ({labels[0]}{more}; details in {grp.index[0]}/FAILED)")
    return len(failed), filled, "\n".join(lines)
