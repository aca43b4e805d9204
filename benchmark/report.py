"""Tables as versioned views over runs: Markdown + CSV + PNG under results/tables/<name>/.

Every build is stamped with a version (date + git sha) in its own folder; earlier versions
are kept. ``results/tables/<name>/table.md`` (and .csv/.png) is a copy of the newest."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

from benchmark.plan import Plan
from benchmark.store import RunStore, git_info
from benchmark.tables import get_metric, mean_std


def results_root() -> Path:
    return Path(os.environ.get("DETBENCH_RESULTS", Path.cwd() / "results"))


def cell_values(plan: Plan, store: RunStore) -> dict[tuple[int, int], dict]:
    """(row, col) -> {"status", "values" (per seed), "mean", "std", "ref", "diff", "runs"}."""
    out: dict[tuple[int, int], dict] = {}
    spec = plan.spec
    for cell in plan.cells:
        c = out.setdefault((cell.row, cell.col), {"values": [], "statuses": [], "runs": []})
        if cell.eval_key is None:
            c["statuses"].append(cell.missing or "not implemented")
            continue
        sts = [store.status(k) for k in cell.chain]
        if "diverged" in sts:
            c["statuses"].append("diverged")
        elif "failed" in sts:
            c["statuses"].append("failed")
        elif sts[-1] == "done":
            v = get_metric(store.metrics(cell.eval_key) or {}, spec.columns[cell.col].metric)
            if v is None:
                c["statuses"].append("no metric")
            else:
                c["values"].append(v)
                c["statuses"].append("done")
                c["runs"].append(cell.eval_key)
        else:
            c["statuses"].append("pending")
    for (ri, ci), c in out.items():
        ref = spec.reference_value(spec.rows[ri], spec.columns[ci])
        c["ref"] = ref
        if c["values"]:
            c["mean"], c["std"] = mean_std(c["values"])
            c["status"] = "done" if all(s == "done" for s in c["statuses"]) else "partial"
        else:
            c["mean"] = c["std"] = None
            for s in ("not implemented", "needs detector", "diverged", "failed", "pending", "no metric"):
                if s in c["statuses"]:
                    c["status"] = s
                    break
        c["diff"] = (c["mean"] - ref) if (c["mean"] is not None and ref is not None
                                         and not math.isnan(ref)) else None
    return out


def _fmt(v: float | None, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "diverged"
    return f"{v:.{nd}f}"


def _ours(c: dict, nseeds: int) -> str:
    if c["mean"] is None:
        return c["status"]
    nd = 2 if abs(c["mean"]) < 10 else 1    # tiny-scale APs live below 1: keep their digits
    s = f"{c['mean']:.{nd}f}"
    if len(c["values"]) > 1:
        s += f" ± {c['std']:.{nd}f}"
    if c["status"] == "partial":
        s += f" ({len(c['values'])}/{nseeds} seeds)"
    return s


def version_stamp() -> str:
    g = git_info()
    sha = (g["sha"] or "unknown")[:7]
    return time.strftime("%Y-%m-%d") + f"_{sha}" + ("-dirty" if g.get("dirty") else "")


DEFAULT_SCALE = "tiny"


def table_dir_name(name: str, scale: str) -> str:
    """``soco_table1`` at the default scale, ``soco_table1@paper`` at any other: tables of
    different scales never overwrite each other."""
    return name if scale == DEFAULT_SCALE else f"{name}@{scale}"


def render(plan: Plan, store: RunStore, out_root: Path | None = None, runs_link_root: Path | None = None) -> Path:
    """Write table.md, table.csv, plot.png and cells.json into a new version folder and copy
    them to the table's top folder. Returns the version folder."""
    spec = plan.spec
    cells = cell_values(plan, store)
    out_root = Path(out_root or results_root() / "tables")
    tdir = out_root / table_dir_name(spec.name, plan.scale)
    version = version_stamp()
    vdir = tdir / version
    n = 2
    while vdir.exists():
        vdir = tdir / f"{version}.{n}"
        n += 1
    vdir.mkdir(parents=True)

    # ---- csv (one line per cell)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "column", "status", "ours_mean", "ours_std", "n_seeds", "paper", "diff", "runs"])
    for (ri, ci), c in sorted(cells.items()):
        w.writerow([spec.rows[ri].label, spec.columns[ci].label, c["status"],
                    "" if c["mean"] is None else f"{c['mean']:.3f}",
                    "" if c["mean"] is None else f"{c['std']:.3f}", len(c["values"]),
                    "" if c["ref"] is None else c["ref"], "" if c["diff"] is None else f"{c['diff']:.3f}",
                    " ".join(c["runs"])])
    (vdir / "table.csv").write_text(buf.getvalue())

    # ---- markdown (links are relative to the folder the file sits in)
    runs_root = runs_link_root or store.root
    (vdir / "table.md").write_text(_markdown(plan, cells, vdir.name, os.path.relpath(runs_root, vdir), None))
    (tdir / "table.md").write_text(_markdown(plan, cells, vdir.name, os.path.relpath(runs_root, tdir),
                                             f"{vdir.name}/table.md"))
    _plot(plan, cells, vdir / "plot.png")
    (vdir / "cells.json").write_text(json.dumps(
        {f"{spec.rows[r].label} | {spec.columns[c].label}": v for (r, c), v in sorted(cells.items())},
        indent=1, default=str))
    for f in ("table.csv", "plot.png"):
        shutil.copyfile(vdir / f, tdir / f)
    return vdir


def _markdown(plan: Plan, cells: dict, version: str, rel_runs: str, version_link: str | None) -> str:
    spec = plan.spec
    nseeds = len(plan.seeds)
    v = f"[`{version}`]({version_link})" if version_link else f"`{version}`"
    lines = [f"# {spec.title}", "",
             f"Scale **{plan.scale}**, seeds {', '.join(map(str, plan.seeds))}; version {v}; "
             f"reference: {spec.source}.", "",
             "Each cell: ours (mean ± std over seeds) / paper [ours − paper]; a link opens the run's "
             "metrics. At the `tiny` scale absolute numbers are not comparable with the paper's: "
             "read the ordering of the rows.", "", "![plot](plot.png)" if version_link else "", ""]
    header = ["method"] + [c.label for c in spec.columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for ri, row in enumerate(spec.rows):
        parts = [row.label]
        for ci in range(len(spec.columns)):
            c = cells[(ri, ci)]
            s = f"{_ours(c, nseeds)} / {_fmt(c['ref'])}"
            if c["diff"] is not None:
                s += f" [{c['diff']:+.1f}]"
            if c["runs"]:
                s = f"[{s}]({rel_runs}/{c['runs'][0]}/metrics.json)"
            parts.append(s)
        lines.append("| " + " | ".join(parts) + " |")
    lines += ["", f"Built {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(plan.jobs)} runs "
              "(`detbench runs` lists them). Earlier versions: the dated folders beside this file.", ""]
    return "\n".join(lines)


def _plot(plan: Plan, cells: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spec = plan.spec
    rows = [ri for ri in range(len(spec.rows))
            if any(cells[(ri, ci)]["mean"] is not None or cells[(ri, ci)]["ref"] is not None
                   for ci in range(len(spec.columns)))]
    ncol = len(spec.columns)
    fig, axes = plt.subplots(1, ncol, figsize=(3.2 * ncol + 1, 0.45 * len(rows) + 1.6), sharey=True,
                             squeeze=False)
    labels = [spec.rows[ri].label for ri in rows]
    for ci, ax in enumerate(axes[0]):
        ours = [cells[(ri, ci)]["mean"] for ri in rows]
        errs = [cells[(ri, ci)]["std"] or 0 for ri in rows]
        refs = [cells[(ri, ci)]["ref"] for ri in rows]
        y = list(range(len(rows)))
        # ours and the paper's on separate axes: at small scales ours are orders of magnitude
        # below the paper's, and one shared axis would hide them
        ax.barh(y, [o if o is not None else 0 for o in ours], height=0.6, xerr=errs,
                color="#3b75af", label=f"ours ({plan.scale}, bottom axis)")
        for i, (o, c) in enumerate(zip(ours, rows)):
            st = cells[(c, ci)]["status"]
            if o is None:
                ax.text(0, i, f" {st}", va="center", fontsize=7, color="#a33")
        top = ax.twiny()
        ry = [i for i, r in zip(y, refs) if r is not None and not math.isnan(r)]
        rv = [r for r in refs if r is not None and not math.isnan(r)]
        top.scatter(rv, ry, marker="D", s=18, color="#777", label="paper (top axis)", zorder=3)
        top.set_xlim(0, max(rv + [1]) * 1.1)
        top.tick_params(labelsize=7, colors="#777")
        ax.set_title(spec.columns[ci].label, fontsize=10, pad=18)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color="#3b75af"),
               plt.Line2D([], [], marker="D", ls="", color="#777")]
    fig.legend(handles, [f"ours ({plan.scale}, bottom axis)", "paper (top axis)"], fontsize=8,
               loc="lower center", ncol=2)
    fig.suptitle(f"{spec.title} — scale {plan.scale}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
