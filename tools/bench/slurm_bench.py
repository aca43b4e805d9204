"""How long planning and submitting a 100-run (or 1,000-run) grid to Slurm takes, and a no-op re-run.

    source /tmp/detbench-slurm/env.sh       # a cluster: slurm/cluster/start.sh
    python -m tools.bench.slurm_bench [--runs 100 | --rows 50] [--profile local-ci] [--cprofile FILE]

A generated grid spec at the ``micro`` scale: ``--rows`` Scratch rows that differ in their
fine-tuning learning rate, one column, so 2 runs per row (fine-tune → evaluate): 100 runs
by default; ``--runs N`` asks for N runs (N/2 rows).  ``--cprofile FILE``: a cProfile of
the planning and the first submission (``python -m pstats FILE``), its 25 most expensive
functions printed.  Nothing trains: every job is submitted with ``--begin=now+1hour``
(held) and all are scancelled at the end.  Times, in this process:

* ``plan_s``: ``plan_table`` of the grid;
* ``submit_s``: ``submit_plan`` (state file, code snapshot, sbatch calls: job arrays for the
  fine-tunes, one afterok job per evaluation);
* ``noop_queued_s``: ``submit_plan`` again while every job is still queued (squeue/sacct
  look-ups, submits nothing);
* ``noop_done_s``: ``submit_plan`` again once every run is done in the run store;
* ``status_s``: ``table_status`` (what ``detbench status`` prints);
* baseline ``bare_sbatch_s``: one plain ``sbatch --wrap true`` per run, the same count,
  also held and cancelled; ``submit_vs_bare`` = submit_s / bare_sbatch_s.

Prints a table and writes ``results/benchmarks/slurm_submit.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def grid_spec(path: Path, rows: int) -> Path:
    lines = ["name: bench_grid", "title: generated Slurm submission benchmark grid", "kind: grid",
             "source: tools/bench/slurm_bench.py",
             "columns:", "  - {label: 1x APbb, schedule: 1x, metric: bbox.AP}", "rows:"]
    for i in range(rows):
        lines.append(f"  - {{label: 'lr {i}', method: scratch, finetune_overrides: {{lr: {0.01 + i * 1e-4:.6f}}}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def cluster_answers() -> str | None:
    base = Path(os.environ.get("SLURM_BASE", "/tmp/detbench-slurm"))
    env_sh = base / "env.sh"
    if "SLURM_CONF" not in os.environ and env_sh.exists():
        for line in env_sh.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                k, _, v = line[len("export "):].partition("=")
                os.environ[k.strip()] = v.strip().strip("'\"")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo: {err}"
    if out.returncode != 0 or not out.stdout.strip():
        return f"no Slurm cluster answers ({out.stderr.strip() or 'no nodes'}); run slurm/cluster/start.sh"
    return None


def bare_sbatch(n: int, folder: Path) -> tuple[float, list[str]]:
    ids = []
    t0 = time.perf_counter()
    for _ in range(n):
        out = subprocess.run(["sbatch", "--parsable", "--begin=now+1hour", "-o", str(folder / "bare-%j.out"),
                              "--mem=100M", "--wrap", "true"], capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    return time.perf_counter() - t0, ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50, help="grid rows; 2 runs each")
    ap.add_argument("--runs", type=int, default=None, help="runs in the grid (even; sets --rows to half of it)")
    ap.add_argument("--cprofile", type=Path, default=None, help="write a cProfile of planning + submission here")
    ap.add_argument("--profile", default="local-ci")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/slurm_submit.json"))
    args = ap.parse_args(argv)
    if args.runs is not None:
        if args.runs < 2 or args.runs % 2:
            ap.error(f"--runs: expected an even number >= 2, got {args.runs}")
        args.rows = args.runs // 2
    problem = cluster_answers()
    if problem:
        print(f"slurm_bench: {problem}")
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="detbench-slurm-bench-"))
    os.environ.update({"DETBENCH_RUNS": str(tmp / "runs"), "DETBENCH_RESULTS": str(tmp / "results"),
                       "DETBENCH_CACHE": str(tmp / "cache")})
    from benchmark.experiments.plan import plan_table
    from benchmark.runs.store import RunStore
    from slurm import orchestrate as orch
    from slurm.profile import cluster_max_array_size
    from slurm.submit import cancel

    overrides = {"mem_gb": 0.25, "snapshot_dir": str(tmp / "snapshots"), "extra_sbatch": {"begin": "now+1hour"}}
    spec = grid_spec(tmp / "bench_grid.yaml", args.rows)
    res: dict = {"rows": args.rows, "max_array_size": cluster_max_array_size(), "profile": args.profile,
                 "host": platform.node(), "cpus": os.cpu_count()}
    submitted_ids: list[str] = []
    prof = cProfile.Profile() if args.cprofile else None
    try:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        plan = plan_table(str(spec), scale="micro")
        res["plan_s"] = time.perf_counter() - t0
        res["runs"] = len(plan.jobs)
        store = RunStore(tmp / "runs")

        t0 = time.perf_counter()
        summary = orch.submit_plan(plan, store, profile=args.profile, overrides=overrides, quiet=True)
        res["submit_s"] = time.perf_counter() - t0
        if prof:
            prof.disable()
        submitted_ids = list(summary.job_ids.values())
        res["submitted"] = len(summary.submitted)
        res["sbatch_calls"] = len(summary.arrays)

        t0 = time.perf_counter()
        again = orch.submit_plan(plan, store, profile=args.profile, overrides=overrides, quiet=True)
        res["noop_queued_s"] = time.perf_counter() - t0
        res["noop_queued_submitted"] = len(again.submitted)

        t0 = time.perf_counter()
        st = orch.table_status(tmp / "results", plan.spec.name, store)
        res["status_s"] = time.perf_counter() - t0
        res["status_counts"] = {k: v for k, v in st["counts"].items() if v}

        t0 = time.perf_counter()
        cancelled = orch.cancel_table(tmp / "results", plan.spec.name)
        res["cancel_s"] = time.perf_counter() - t0
        res["cancelled"] = len(cancelled)

        for job in plan.jobs:  # every run done in the store (no training: an empty result)
            store.begin(job.key, job.config)
            store.finish(job.key, {"bench": True})
        t0 = time.perf_counter()
        done = orch.submit_plan(plan, store, profile=args.profile, overrides=overrides, quiet=True)
        res["noop_done_s"] = time.perf_counter() - t0
        res["noop_done_submitted"] = len(done.submitted)

        res["bare_sbatch_s"], bare_ids = bare_sbatch(len(plan.jobs), tmp)
        cancel(bare_ids)
        res["submit_vs_bare"] = res["submit_s"] / res["bare_sbatch_s"]
    finally:
        try:
            cancel(submitted_ids)
        except Exception:  # noqa: BLE001 - already cancelled
            pass
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Slurm submission, {res['runs']}-run grid (micro scale, MaxArraySize {res['max_array_size']}):")
    rows = [("plan_table", res["plan_s"], ""),
            ("submit_plan", res["submit_s"], f"{res['submitted']} jobs in {res['sbatch_calls']} sbatch calls"),
            ("no-op, all queued", res["noop_queued_s"], f"{res['noop_queued_submitted']} submitted"),
            ("no-op, all done", res["noop_done_s"], f"{res['noop_done_submitted']} submitted"),
            ("status", res["status_s"], ""), ("cancel", res["cancel_s"], f"{res['cancelled']} jobs"),
            ("baseline: bare sbatch x runs", res["bare_sbatch_s"], f"submit/bare = {res['submit_vs_bare']:.2f}")]
    for name, secs, note in rows:
        print(f"  {name:<30} {secs:8.2f} s  {note}")
    print(f"  {'plan + submit':<30} {res['plan_s'] + res['submit_s']:8.2f} s")
    if prof:
        args.cprofile.parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(args.cprofile))
        pstats.Stats(str(args.cprofile)).sort_stats("cumulative").print_stats(25)
        print(f"wrote {args.cprofile} (cProfile of plan_table + submit_plan; the times above include its overhead)")
    res["command"] = "python -m tools.bench.slurm_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
