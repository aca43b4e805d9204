"""Benchmark (not a test): does a table rank at a cheaper or longer budget? Runs a chosen
subset of a table's rows and columns, over seeds, with ``--set`` overrides (fine-tuning steps,
lr, ...), in a run store of its own, and reports what decides a default budget:
each row's mean ± std, whether it beats Scratch / MoCo v2 (the tables' one-sided Welch test),
Spearman ρ of the rows against the paper's order, and the CPU/GPU hours per seed.

    python -m tools.bench.tradeoff_bench --tag ft450 --seeds 3 \\
        --rows "Scratch,Supervised,MoCo v2,SoCo 400ep" --columns "1x APbb" \\
        --set finetune.steps=450 --set finetune.lr=0.04

Pretraining runs whose config the overrides leave alone are copied from ``--reuse`` (the
main run store) when their weights are there, so a fine-tuning study retrains only what it
changes. Results go to ``results/benchmarks/tradeoff_<tag>.json``; the runs stay in
``--store`` (default ``results/runs-tradeoff/<tag>``, not committed: weights and all).
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from benchmark.experiments.config import parse_overrides
from benchmark.experiments.plan import plan_table
from benchmark.reporting.render import cell_values, spearman_vs_paper
from benchmark.common.paths import results_root
from slurm.local import run_plan_local
from benchmark.runs.store import RunStore


def subset(plan, rows: list[str], columns: list[str]):
    """The plan restricted to the named rows and columns: their cells and the jobs of their chains."""
    spec = plan.spec
    ri = [i for i, r in enumerate(spec.rows) if r.label in rows]
    ci = [i for i, c in enumerate(spec.columns) if c.label in columns]
    for names, found, what in ((rows, ri, "row"), (columns, ci, "column")):
        if len(found) != len(names):
            have = [r.label for r in spec.rows] if what == "row" else [c.label for c in spec.columns]
            raise SystemExit(f"{spec.name}: unknown {what} in {names}; the table has {have}")
    cells = [c for c in plan.cells if c.row in ri and c.col in ci]
    keys = {k for c in cells for k in c.chain}
    return replace(plan, cells=cells, jobs=[j for j in plan.jobs if j.key in keys]), ri, ci


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="soco_table1")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", required=True, help="comma-separated row labels")
    p.add_argument("--columns", required=True, help="comma-separated column labels")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", required=True, help="names the store and the result file")
    p.add_argument("--store", default=None)
    p.add_argument("--reuse", default=None, help="run store to copy unchanged pretraining runs from "
                                                 "(default: results/runs)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    rows, columns = [s.strip() for s in a.rows.split(",")], [s.strip() for s in a.columns.split(",")]
    plan = plan_table(a.table, scale=a.scale, seeds=tuple(range(a.seeds)), overrides=parse_overrides(a.overrides))
    plan, ri, ci = subset(plan, rows, columns)
    store = Path(a.store or results_root() / "runs-tradeoff" / a.tag)
    reuse = RunStore(a.reuse).root
    for j in plan.jobs:
        src = reuse / j.key
        if j.stage == "pretrain" and (src / "weights.pt").exists() and not (store / j.key).exists():
            shutil.copytree(src, store / j.key)
    status = run_plan_local(plan, str(store), device=a.device, jobs=a.jobs)
    cells = cell_values(plan, RunStore(str(store)))
    out = {"table": a.table, "scale": a.scale, "seeds": a.seeds, "overrides": a.overrides, "store": str(store),
           "failed": sorted(k for k, s in status.items() if s != "done"),
           "spearman": {k: {"rho": r, "rows": n} for k, (r, n) in spearman_vs_paper(plan, cells).items()},
           "cells": {}}
    for c_i in ci:
        col = plan.spec.columns[c_i].label
        for r_i in ri:
            c = cells[(r_i, c_i)]
            out["cells"].setdefault(col, {})[plan.spec.rows[r_i].label] = {
                "values": c["values"], "mean": c["mean"], "std": c["std"], "paper": c["ref"],
                "p_greater": c["p"], "cost_per_seed": c["cost"], "cost_unit": c["cost_unit"]}
    dest = results_root() / "benchmarks" / f"tradeoff_{a.tag}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    for col, rowsd in out["cells"].items():
        rho = out["spearman"].get(col, {}).get("rho")
        print(f"{col}: Spearman ρ vs paper {'–' if rho is None else f'{rho:+.2f}'}")
        for label, c in rowsd.items():
            m = "–" if c["mean"] is None else f"{c['mean']:.2f} ± {c['std'] or 0:.2f}"
            ps = " ".join(f"p>{k} {v:.3f}" for k, v in c["p_greater"].items())
            cost = "" if c["cost_per_seed"] is None else f"{c['cost_per_seed']:.3f} {c['cost_unit']}/seed"
            print(f"  {label:14s} {m:16s} {ps:28s} {cost}")
    print(f"wrote {dest}")
    return out


if __name__ == "__main__":
    main()
