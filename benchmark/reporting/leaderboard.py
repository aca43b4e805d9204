"""Leaderboards: ``results/README.md``, one ranking per detector x protocol x scale, built
from the runs frame and the table specs (``detbench render --all``).

Every table spec (``kind: table``; ablation grids are not leaderboards) is planned at every
scale found in the run store; each of its cells joins the leaderboard of its column's
detector and protocol at that scale (a new detector or protocol in a spec's columns gets its
own leaderboard with no change here). A scale never mixes with another in one ranking.
Rows are ranked by ours on the leaderboard's first column. Each leaderboard carries the
compute cost of its cells and a plot of AP against that cost (``results/leaderboards/``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from benchmark.common.fs import atomic_open, atomic_write_bytes
from benchmark.common.paths import results_root
from benchmark.experiments.plan import plan_table
from benchmark.experiments.tables import available_tables, load_spec
from benchmark.reporting.format import cell_text, markers, partial_note
from benchmark.reporting.render import (cell_values, describe_data, detector_title, MIN_SEEDS_FOR_TEST, PAPER_SCALE,
                                        pretty_backbone, render, table_dir_name, TEST_NAME)
from benchmark.reporting.results import load_runs
from benchmark.runs.store import RunStore
from methods.config import ConfigError


def stored_seeds(spec, scale: str, df) -> tuple[int, ...]:
    """The seeds at which every implemented row of ``spec`` has run (done, diverged or failed)
    in the store: a table is rendered over those, so a seed that only a shared row has does
    not make every other row 'partial'."""
    sub = df[(df["scale"] == scale) & (df["stage"] == "finetune")]
    if sub.empty:
        return ()
    seeds = sorted({int(s) for s in sub["seed"].dropna()})
    plan = plan_table(spec, scale=scale, seeds=tuple(seeds))
    cells = [c for c in plan.cells if c.eval_key]
    st = df["status"].to_dict()
    out = []
    for s in seeds:
        mine = [c for c in cells if c.seed == s]
        ran = {c.row for c in mine if any(st.get(k) in ("done", "diverged", "failed") for k in c.chain[-1:])
               or any(st.get(k) in ("diverged", "failed") for k in c.chain)}
        if mine and ran == {c.row for c in mine}:
            out.append(s)
    return tuple(out)


def table_plans(df, kinds=("table",)) -> list:
    """(plan, seeds) of every spec of ``kinds`` at every scale with finished runs of it."""
    plans = []
    for scale in sorted(df["scale"].dropna().unique()):
        for name in available_tables():
            spec = load_spec(name)
            if spec.kind not in kinds:
                continue
            try:
                seeds = stored_seeds(spec, scale, df)
            except ConfigError:  # a scale that needs data paths this machine does not have
                continue
            if seeds:
                plans.append(plan_table(spec, scale=scale, seeds=seeds))
    return plans


def _board_key(plan, col, df, cell_runs) -> tuple[str, str, str]:
    det = col.detector
    runs = [k for k in cell_runs if k in df.index and isinstance(df.at[k, "detector"], str)]
    if runs:
        det = df.at[runs[0], "detector"]
    return det, getattr(col, "protocol", "coco"), plan.scale


# a leaderboard's column is (schedule, metric): tables label the same cell differently
# ("1x APbb" in soco_table1, "FPN 1x APbb" in insloc_modelzoo, "FPN APbb" in pixpro_coco)
METRIC_NAMES = {"bbox.AP": "APbb", "segm.AP": "APmk", "bbox.AP50": "AP50", "bbox.AP75": "AP75"}


def board_column(col) -> str:
    """'1x APbb': the schedule and metric of a table column (the board fixes the detector)."""
    return f"{col.schedule} {METRIC_NAMES.get(col.metric, col.metric)}"


def collect_boards(df) -> dict:
    """(detector, protocol, scale) -> {"columns": [labels], "rows": [...], "plans": [...]}.
    Columns are (schedule, metric) whatever each table calls them; rows are ranked by the
    column most of them have."""
    boards: dict = {}
    for plan in table_plans(df):
        cells = cell_values(plan, df)
        for ri, row in enumerate(plan.spec.rows):
            for ci, col in enumerate(plan.spec.columns):
                c = cells[(ri, ci)]
                if not c["runs"]:
                    continue
                b = boards.setdefault(_board_key(plan, col, df, c["runs"]), {"columns": [], "rows": {}, "plans": []})
                label = board_column(col)
                if label not in b["columns"]:
                    b["columns"].append(label)
                if plan not in b["plans"]:
                    b["plans"].append(plan)
                # one row per (table, row); a row another table already brought with the same runs is skipped
                r = b["rows"].setdefault((plan.spec.name, row.label), {"table": plan.spec.name, "label": row.label,
                                                                        "method": row.method, "cells": {},
                                                                        "plan": plan})
                r["cells"][label] = c
    for b in boards.values():
        # a row whose runs another row already shows (a table reusing another's runs, e.g. the
        # Mask R-CNN column of detectors_tiny = soco_table1's 1x) is left out: the fuller row stays
        kept: list[tuple[set, dict]] = []
        with_runs = [({k for c in r["cells"].values() for k in c["runs"]}, r) for r in b["rows"].values()]
        for runs, r in sorted(with_runs, key=lambda x: (-len(x[1]["cells"]), -len(x[0]))):
            if not any(runs <= other for other, _ in kept):
                kept.append((runs, r))
        rows = [r for _, r in kept]
        b["columns"] = [c for c in b["columns"] if any(c in r["cells"] for r in rows)]
        first = max(b["columns"], key=lambda c: sum(c in r["cells"] for r in rows))   # first-seen on ties
        metric_order = list(METRIC_NAMES.values())   # box AP columns, then mask AP, ...: stable within each
        rest = sorted((c for c in b["columns"] if c != first),
                      key=lambda c: metric_order.index(c.split()[-1]) if c.split()[-1] in metric_order else len(metric_order))
        b["columns"] = [first] + rest
        rows.sort(key=lambda r: -(r["cells"][first]["mean"] if first in r["cells"] else -math.inf))
        b["rows"] = rows
    return boards


def _slug(key) -> str:
    det, proto, scale = key
    return f"{det}_{proto}_{scale}".replace("/", "-")


def _board_title(key, b, df) -> str:
    det, proto, scale = key
    plan = b["plans"][0]
    keys = [j.key for j in plan.jobs if j.stage == "finetune" and j.key in df.index]
    backbone = pretty_backbone(df.at[keys[0], "backbone"]) if keys else "?"
    data = next((j.config.get("data") for j in plan.jobs if j.stage == "finetune" and j.config), None)
    what = f"{backbone} on {describe_data(data)}" if data else backbone
    return f"{detector_title(det)} · {proto.upper()} protocol · scale `{scale}` — {what}"


def _cost(b, df) -> tuple[str, float, str]:
    keys = {k for p in b["plans"] for j in p.jobs for k in [j.key]
            if k in df.index and df.at[k, "status"] == "done"}
    sub = df.loc[sorted(keys)]
    gpu = float(sub["gpu_hours"].fillna(0).sum())
    cpu = float(sub.loc[sub["gpu_hours"].fillna(0) == 0, "cpu_hours"].fillna(0).sum())
    unit = "GPU-h" if gpu and not cpu else "CPU-h" if cpu and not gpu else "h"
    text = " + ".join(x for x in (f"{gpu:.3g} GPU-hours" if gpu else "", f"{cpu:.3g} CPU-hours" if cpu else "") if x)
    return text or "0 hours", len(sub), unit


def _plot(key, b, path: Path) -> None:
    """AP (ours) against the compute of each cell (pretraining + fine-tuning + evaluation,
    per seed): a method 2 AP better at 4x the cost looks like that. Error bars (± std) from
    3 seeds on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = b["columns"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols) + 0.6, 3.4), squeeze=False,
                             layout="constrained")
    unit = None
    for ax, col in zip(axes[0], cols):
        for i, r in enumerate(b["rows"]):
            c = r["cells"].get(col)
            if not c or c["mean"] is None or c["cost"] is None:
                continue
            unit = unit or c["cost_unit"]
            err = c["std"] if c["n"] >= MIN_SEEDS_FOR_TEST else None
            ax.errorbar([c["cost"]], [c["mean"]], yerr=None if err is None else [err], fmt="o", ms=4,
                        capsize=2, color=f"C{i % 10}")
            ax.annotate(r["label"], (c["cost"], c["mean"]), xytext=(3, 2), textcoords="offset points",
                        fontsize=6).set_in_layout(False)
        ax.set_title(f"{col} (ours, scale {key[2]})", fontsize=8)
        ax.set_xlabel(f"{unit or 'hours'} per seed (pretrain + fine-tune + eval)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AP", fontsize=8)
    fig.suptitle(f"{detector_title(key[0])} · {key[1].upper()} · {key[2]}: AP against compute",
                 fontsize=9)
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def _marked(b) -> str:
    hits = sum(1 for r in b["rows"] for c in r["cells"].values() if markers(c))
    return f"{hits} cells marked" if hits else "no cell is significantly above either"


def _board_md(key, b, df, results: Path, plot_rel: str, runs_rel: str) -> list[str]:
    det, proto, scale = key
    cols = b["columns"]
    is_paper = scale == PAPER_SCALE
    cost, nruns, unit = _cost(b, df)
    tested = any(c["p"] for r in b["rows"] for c in r["cells"].values())
    lines = [f"## {_board_title(key, b, df)}", "",
             f"Ranked by ours on **{cols[0]}**. Each cell: ours / paper" + (" [ours − paper]" if is_paper else "")
             + "; n = seeds; cost = " + unit + " per seed of the row's first column (pretraining + fine-tuning + "
             "evaluation)." + ("" if is_paper else f" At `{scale}` absolute APs are not comparable with the "
                               "paper's: read the order."),
             "", f"Compute of these cells: {cost} over {nruns} finished runs. "
             + ("▲S / ▲M: above the Scratch / MoCo v2 row, " + TEST_NAME + f" ({_marked(b)})." if tested else ""),
             "",
             f"![AP against compute]({plot_rel})", ""]
    header = ["#", "method", "table", "n"] + cols + [f"cost ({unit})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = 0
    for r in b["rows"]:
        plan = r["plan"]
        tlink = os.path.relpath(results / "tables" / table_dir_name(plan.spec.name, scale) / "table.md", results)
        first = r["cells"].get(cols[0])
        has = first is not None and first["mean"] is not None
        rank += has
        ns = sorted({c["n"] for c in r["cells"].values()})
        parts = [str(rank) if has else "–", r["label"], f"[{plan.spec.name}]({tlink})",
                 "–".join(map(str, (ns[0], ns[-1]) if len(ns) > 1 else ns))]
        parts += ["" if r["cells"].get(col) is None else cell_text(r["cells"][col], len(plan.seeds), runs_rel)
                  for col in cols]
        parts.append("–" if not first or first["cost"] is None else f"{first['cost']:.3f}")
        lines.append("| " + " | ".join(parts) + " |")
    return lines + [""] + partial_note(c for r in b["rows"] for c in r["cells"].values())


def _tables_index(results: Path) -> list[str]:
    import json
    lines = ["## Every table", "", "| table | scale | version | seeds |", "|---|---|---|---|"]
    for d in sorted((results / "tables").glob("*/table.md")):
        name, _, scale = d.parent.name.partition("@")
        v = d.parent / "version.json"
        info = json.loads(v.read_text()) if v.exists() else {}
        lines.append(f"| [{name}](tables/{d.parent.name}/table.md) | {scale or 'tiny'} | "
                     f"{info.get('version', '?')} | {', '.join(map(str, info.get('seeds', []))) or '?'} |")
    return lines + [""]


INTRO = """# results/ — leaderboards

Rebuilt from the run store by `detbench render --all` (which also re-renders every table);
nothing here is edited by hand. One leaderboard per detector × protocol × scale: a scale
never mixes with another in one ranking. Every cell links to the run that made it
(`runs/<key>/metrics.json`), every row to its table. `benchmark.reporting.results.load_runs()` gives
the same runs as a pandas DataFrame (`detbench runs --format csv|json` on the command line).

Cost: GPU-hours on a GPU machine, CPU-hours (the run's wall clock, one process) on a CPU
one, from each run's own record (`metrics.json` `wall_s`, or its log), or from `sacct` for
Slurm runs (elapsed × GPUs, CPU time; requeued attempts included).
"""

LAYOUT = """## Layout

- `tables/<name>/table.md` — the newest version of each table or grid (with `table.csv`,
  `plot.png`, `version.json`); `tables/<name>/<date>_<sha>/` — every version whose content
  differed from the one before (a rebuild with the same cells writes nothing), each built
  from the commit `<sha>` names: from uncommitted code no version is written here unless
  `--allow-dirty` (or `DETBENCH_ALLOW_DIRTY=1`) asks for a `<date>_<sha>-dirty` one, which is
  not for committing. A table at a scale other than `tiny` lives in `tables/<name>@<scale>/`.
- `leaderboards/` — the AP-against-compute plots of this page.
- `runs/<key>/` — one run each (pretraining, fine-tuning or evaluation): `config.json` (fully
  resolved), `env.json` (start time, git sha + dirty flag, packages, hardware, Slurm ids),
  `log.jsonl`, `metrics.json` (written last: present = done), `load_report.json`
  (fine-tuning). Weights, checkpoints and detections stay out of git.
- `benchmarks/` — outputs of `tools/bench/*.py`.
- `slurm/` — per table/grid state of Slurm submissions (not in git).
"""


def write_readme(df, results: Path, runs_root: Path) -> Path:
    """Build ``results/README.md`` (and its plots) from the frame; writes nothing when the
    page is unchanged."""
    boards = collect_boards(df)
    lines = [INTRO]
    plots = []
    order = sorted(boards, key=lambda k: (k[0] != "mask_rcnn", k[0], k[1], k[2] != "tiny", k[2]))
    if not order:
        lines += ["No finished runs of any table yet: `make reproduce TABLE=soco_table1`.", ""]
    for key in order:
        rel = f"leaderboards/{_slug(key)}.png"
        plots.append((key, boards[key], results / rel))
        lines += _board_md(key, boards[key], df, results, rel, os.path.relpath(runs_root, results))
    lines += _tables_index(results) + [LAYOUT]
    text = "\n".join(lines)
    path = results / "README.md"
    if path.exists() and path.read_text() == text and all(p.exists() for *_, p in plots):
        return path
    for key, b, p in plots:
        _plot(key, b, p)
    atomic_write_bytes(path, text.encode())
    return path


def render_all(store_root=None, results: Path | None = None, allow_dirty: bool = False) -> tuple[list[Path], Path]:
    """Re-render every table and grid from the store (over its stored seeds), then the
    leaderboards page. Returns (version folders, README path). ``allow_dirty``: as
    :func:`benchmark.reporting.render.render`."""
    store = RunStore(store_root)
    df = load_runs(store.root)
    results = Path(results or results_root())
    vdirs = [render(plan, store, out_root=results / "tables", runs=df, allow_dirty=allow_dirty)
             for plan in table_plans(df, kinds=("table", "grid"))]
    return vdirs, write_readme(df, results, store.root)

