"""Tables as versioned views over runs: Markdown + CSV + PNG under results/tables/<name>/.

A table is rendered from the runs frame (:func:`benchmark.reporting.results.load_runs`), so a notebook
sees the numbers the table shows. A build whose content (cells, runs, text) equals the
newest version's writes nothing; a build that differs gets a new dated folder
``<date>_<sha>`` and ``results/tables/<name>/table.md`` (with .csv/.png) becomes a copy of it.
A version is written whole (staged, then renamed into place: a failed write leaves no partial
folder and the previous top-level files), under the table's lock (``results/tables/.locks/``:
two renders at once write one version).

A version names the commit that built it, so a new version is refused (:class:`DirtyTreeError`)
where git could commit it (a folder of this checkout that git does not ignore: the repository's
own ``results/``) while the code has uncommitted changes, unless told (``allow_dirty``, or
``DETBENCH_ALLOW_DIRTY=1``): it is then written as ``<date>_<sha>-dirty``. A results folder
outside the checkout (``DETBENCH_RESULTS``, the tests' temporary ones) takes ``-dirty`` versions
unasked: nothing there is committed."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchmark.common.fs import atomic_write_bytes, file_lock, json_bytes, unwritable, UnwritableError
from benchmark.common.paths import REPO, results_root
from benchmark.detectors import get_detector
from benchmark.experiments.plan import MISSING_REASONS, NOT_IMPLEMENTED, Plan
from benchmark.experiments.tables import mean_std
from benchmark.reporting.format import ALPHA, BASELINES, cell_text, partial_note
from benchmark.reporting.results import load_runs, unflatten
from benchmark.runs.store import git_info, RunStore

DEFAULT_SCALE = "tiny"
PAPER_SCALE = "paper"        # the one scale whose numbers are comparable with the papers'
MIN_SEEDS_FOR_TEST = 3       # significance and error bars from this many seeds on
TEST_NAME = ("one-sided Welch's t-test over seeds (scipy.stats.ttest_ind, equal_var=False, "
             f"alternative='greater'), p < {ALPHA}")
def _detector_name(name: str | None) -> tuple[str, str]:
    """(display name, backbone feature) of a registered detector ("Mask R-CNN", "C4"); an
    unknown name as it is."""
    try:
        det = get_detector(name)
    except (KeyError, ValueError):
        return (name or "?", "")
    return det.title, det.feature


def table_dir_name(name: str, scale: str) -> str:
    """``soco_table1`` at the default scale, ``soco_table1@paper`` at any other: tables of
    different scales never overwrite each other."""
    return name if scale == DEFAULT_SCALE else f"{name}@{scale}"


def _frame(runs):
    """A runs frame from a frame, a RunStore or a store folder."""
    import pandas as pd

    if isinstance(runs, pd.DataFrame):
        return runs
    return load_runs(runs.root if isinstance(runs, RunStore) else runs)


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# ====================================================================== cells
def cell_values(plan: Plan, runs) -> dict[tuple[int, int], dict]:
    """(row, col) -> {"status", "values" (per seed), "seeds", "mean", "std", "ref", "diff",
    "runs", "cost", "cost_unit", "p" ({"Scratch": p, ...} where tested)}, and "not_loaded"
    (the groups of the pretrained weights some of its fine-tuning runs did not load whole)
    where there are such groups.

    ``runs``: the frame of :func:`benchmark.reporting.results.load_runs`, or a RunStore."""
    df = _frame(runs)
    spec = plan.spec
    status = df["status"].to_dict()
    out: dict[tuple[int, int], dict] = {}
    for cell in plan.cells:
        c = out.setdefault((cell.row, cell.col), {"values": [], "seeds": [], "statuses": [], "runs": [],
                                                  "costs": [], "gpu": [], "not_loaded": set()})
        if cell.eval_key is None:
            c["statuses"].append(cell.missing or NOT_IMPLEMENTED)
            continue
        sts = [status.get(k, "missing") for k in cell.chain]
        if "diverged" in sts:
            c["statuses"].append("diverged")
        elif "failed" in sts:
            c["statuses"].append("failed")
        elif sts[-1] == "done":
            col = "metrics." + spec.columns[cell.col].metric
            v = _num(df.at[cell.eval_key, col]) if col in df.columns else None
            if v is None:
                c["statuses"].append("no metric")
                continue
            c["values"].append(v)
            c["seeds"].append(cell.seed)
            c["statuses"].append("done")
            c["runs"].append(cell.eval_key)
            part = df.at[cell.eval_key, "weights_not_loaded"]
            if isinstance(part, str):
                c["not_loaded"].update(part.split(", "))
            gpu = _num(df.at[cell.eval_key, "chain_gpu_hours"])
            cpu = _num(df.at[cell.eval_key, "chain_cpu_hours"])
            c["gpu"].append(bool(gpu))
            c["costs"].append(gpu if gpu else cpu)
        else:
            c["statuses"].append("pending")
    is_paper = plan.scale == PAPER_SCALE
    for (ri, ci), c in out.items():
        ref = spec.reference_value(spec.rows[ri], spec.columns[ci])
        c["ref"] = ref
        c["n"] = len(c["values"])
        if c["values"]:
            c["mean"], c["std"] = mean_std(c["values"])
            c["status"] = "done" if all(s == "done" for s in c["statuses"]) else "partial"
        else:
            c["mean"] = c["std"] = None
            for s in (*MISSING_REASONS, "diverged", "failed", "pending", "no metric"):
                if s in c["statuses"]:
                    c["status"] = s
                    break
        # ours − paper only where the two measure the same thing: at the paper's own scale
        c["diff"] = (c["mean"] - ref) if (is_paper and c["mean"] is not None and ref is not None
                                         and not math.isnan(ref)) else None
        costs = [x for x in c.pop("costs") if x is not None]
        gpu = c.pop("gpu")
        c["cost"] = sum(costs) / len(costs) if costs else None     # per seed: pretrain + fine-tune + eval
        c["cost_unit"] = ("GPU-h" if all(gpu) else "CPU-h" if not any(gpu) else "h (GPU and CPU)") if gpu else None
        c["p"] = {}
        part = c.pop("not_loaded")
        if part:       # only where there is one: tables without such cells keep their content
            c["not_loaded"] = sorted(part)
    _significance(plan, out)
    return out


def welch_greater(a: list[float], b: list[float]) -> float | None:
    """p of a one-sided Welch's t-test that mean(a) > mean(b); None when undefined (fewer
    than MIN_SEEDS_FOR_TEST values, or no variance in either)."""
    if len(a) < MIN_SEEDS_FOR_TEST or len(b) < MIN_SEEDS_FOR_TEST:
        return None
    from scipy.stats import ttest_ind
    p = float(ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    return None if math.isnan(p) else p


def _significance(plan: Plan, cells: dict) -> None:
    rows = plan.spec.rows
    for method, _, name in BASELINES:
        base = next((ri for ri, r in enumerate(rows) if r.method == method and not r.method_overrides), None)
        if base is None:
            continue
        for (ri, ci), c in cells.items():
            if ri == base:
                continue
            p = welch_greater(c["values"], cells[(base, ci)]["values"])
            if p is not None:
                c["p"][name] = p


def spearman_vs_paper(plan: Plan, cells: dict) -> dict[str, tuple[float, int]]:
    """Column label -> (Spearman ρ of ours against the paper's over the rows having both, n)."""
    from scipy.stats import spearmanr
    out = {}
    for ci, col in enumerate(plan.spec.columns):
        pairs = [(c["mean"], c["ref"]) for (r, cc), c in sorted(cells.items())
                 if cc == ci and c["mean"] is not None and c["ref"] is not None and not math.isnan(c["ref"])]
        if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
            rho = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
            if not math.isnan(rho):
                out[col.label] = (rho, len(pairs))
    return out


# ====================================================================== what ran
def _finetune_configs(plan: Plan, df) -> list[dict]:
    """The resolved fine-tuning configs of the plan (from the plan, else from the stored runs)."""
    cfgs = [j.config for j in plan.jobs if j.stage == "finetune" and j.config]
    if cfgs:
        return cfgs
    keys = [j.key for j in plan.jobs if j.stage == "finetune" and j.key in df.index]
    return [unflatten({k[4:]: v for k, v in df.loc[k_].items() if k.startswith("cfg.") and v == v})
            for k_ in keys]


def describe_data(data: dict) -> str:
    if data.get("kind") == "synthetic":
        return (f"synthetic scenes ({data.get('image_size')} px; {data.get('num_train')} train / "
                f"{data.get('num_val')} val images)")
    if data.get("kind") == "voc" and "synthetic" in data:    # the synthetic scenes in VOC layout
        return f"{describe_data({'kind': 'synthetic', **data['synthetic']})} in VOC layout"
    if data.get("kind") == "coco":
        val = (data.get("val") or {}).get("ann_file", "")
        return f"COCO-format data ({Path(val).name or 'val'})"
    return f"{data.get('kind', '?')} data"


def pretty_backbone(name: str) -> str:
    return name.replace("resnet", "ResNet-") if name and name.startswith("resnet") else (name or "?")


def detector_title(name: str) -> str:
    """'Mask R-CNN C4' for mask_rcnn_c4; an unknown name as it is."""
    title, feature = _detector_name(name)
    return f"{title} {feature}".rstrip()


def what_ran(plan: Plan, df) -> str:
    """'Mask R-CNN, ResNet-18 FPN, on synthetic scenes (...)': every detector, backbone and
    data the runs used (not the paper's setting, unless that is what ran)."""
    cfgs = _finetune_configs(plan, df)
    if not cfgs:
        return plan.spec.title
    models, datas = [], []
    for cfg in cfgs:
        det = cfg.get("detector", {})
        name, feature = _detector_name(det.get("name"))
        model = f"{name}, {pretty_backbone(det.get('backbone'))} {feature}".rstrip()
        data = describe_data(cfg.get("data", {}))
        models += [model] if model not in models else []
        datas += [data] if data not in datas else []
    return f"{'; '.join(models)}, on {' and '.join(datas)}"


def _schedules(plan: Plan) -> str:
    steps = {}
    for j in plan.jobs:
        if j.stage == "finetune" and j.config:
            r = j.config.get("recipe", {})
            steps.setdefault(j.config.get("schedule"), f"{r.get('steps')} steps at batch {r.get('batch_size')}")
    return "; ".join(f"{s} = {v}" for s, v in steps.items())


# ====================================================================== gain row
def gain_cells(plan: Plan, cells: dict) -> list[dict]:
    """Per column, the spec's gain row: mean(row) - mean(over) over their seeds, its standard
    error (sqrt(s_a^2/n_a + s_b^2/n_b), from two seeds up) and the paper's gain."""
    spec = plan.spec
    labels = [r.label for r in spec.rows]
    a, b = labels.index(spec.gain.row), labels.index(spec.gain.over)
    out = []
    for ci, col in enumerate(spec.columns):
        ca, cb = cells[(a, ci)], cells[(b, ci)]
        g = {"column": col.label, "mean": None, "se": None, "ref": spec.gain_reference(col)}
        if ca["mean"] is not None and cb["mean"] is not None:
            g["mean"] = ca["mean"] - cb["mean"]
            if ca["n"] > 1 and cb["n"] > 1:
                g["se"] = math.sqrt(ca["std"] ** 2 / ca["n"] + cb["std"] ** 2 / cb["n"])
        out.append(g)
    return out


def _gain_line(plan: Plan, cells: dict) -> str:
    parts = [f"**{plan.spec.gain.label}**", ""]
    for g in gain_cells(plan, cells):
        s = "–" if g["mean"] is None else f"{g['mean']:+.2f}" + ("" if g["se"] is None else f" ± {g['se']:.2f}")
        parts.append(s + " / " + ("–" if g["ref"] is None else f"{g['ref']:+.1f}"))
    return "| " + " | ".join(parts) + " |"


def _n_label(ns: list[int]) -> str:
    ns = sorted(set(ns))
    return "–" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


# ====================================================================== render
ALLOW_DIRTY_ENV = "DETBENCH_ALLOW_DIRTY"


class DirtyTreeError(RuntimeError):
    """A new table version would go where git could commit it, built from uncommitted code."""


def render(plan: Plan, store, out_root: Path | None = None, runs_link_root: Path | None = None,
           runs=None, allow_dirty: bool = False) -> Path:
    """Write table.md, table.csv, plot.png, cells.json into a new version folder when the
    content differs from the newest version, and copy them to the table's top folder.
    Returns the version folder (the existing one when nothing changed). ``runs``: a frame
    from :func:`benchmark.reporting.results.load_runs` (read from ``store`` when not given).
    ``allow_dirty`` (or ``DETBENCH_ALLOW_DIRTY=1``): write a ``-dirty`` version into the
    checkout too (see the module docstring)."""
    df = _frame(runs if runs is not None else store)
    spec = plan.spec
    cells = cell_values(plan, df)
    out_root = Path(out_root or results_root() / "tables")
    tdir = writable_table_dir(spec.name, plan.scale, out_root)
    store_root = Path(store.root) if isinstance(store, RunStore) else Path(store)
    runs_root = Path(runs_link_root or store_root)

    csv_text = _csv(plan, cells)
    cells_text = json.dumps({f"{spec.rows[r].label} | {spec.columns[c].label}": v
                             for (r, c), v in sorted(cells.items())}, indent=1, default=str, sort_keys=True)
    md_probe = _markdown(plan, cells, df, "VERSION", "RUNS", None)
    content = hashlib.sha256("\0".join((csv_text, cells_text, md_probe)).encode()).hexdigest()
    # one render of a table at a time: a second one finds the first's content and writes nothing
    with file_lock(out_root / ".locks" / f"{tdir.name}.lock", what="results folder"):
        for stale in tdir.glob(".stage.tmp*"):   # a killed render's staging folder
            shutil.rmtree(stale, ignore_errors=True)
        current = read_version(tdir)
        if current and current.get("content_sha256") == content and (tdir / current["version"]).is_dir():
            return tdir / current["version"]

        git = git_info(REPO)
        version = version_stamp(git)
        if git.get("dirty") and not (allow_dirty or os.environ.get(ALLOW_DIRTY_ENV) == "1") and _committable(tdir):
            raise DirtyTreeError(_dirty_message(plan, tdir, version, store_root))
        vdir = tdir / version
        n = 2
        while vdir.exists():
            vdir = tdir / f"{version}.{n}"
            n += 1
        both = {"table.csv": csv_text.encode(), "plot.png": _plot(plan, cells, df)}
        if spec.convergence:
            both["convergence.png"] = _convergence_plot(plan, cells)
        info = json_bytes({"version": vdir.name, "content_sha256": content, "seeds": list(plan.seeds),
                           "scale": plan.scale, "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "git": git})
        files = {**both, "cells.json": cells_text.encode(), "version.json": info,
                 "table.md": _markdown(plan, cells, df, vdir.name, os.path.relpath(runs_root, vdir), None).encode()}
        top = {**both, "table.md": _markdown(plan, cells, df, vdir.name, os.path.relpath(runs_root, tdir),
                                             f"{vdir.name}/table.md").encode(), "version.json": info}
        _write_version(tdir, vdir, files, top)
    return vdir


def writable_table_dir(name: str, scale: str, out_root: Path | None = None, create: bool = True) -> Path:
    """The table's folder under ``out_root`` (default results/tables); UnwritableError naming it
    when files cannot be written there. ``create=False``: asked before any run, it is not made."""
    tdir = Path(out_root or results_root() / "tables") / table_dir_name(name, scale)
    why = unwritable(tdir, create=create)
    if why:
        raise UnwritableError(f"results folder {tdir} is not writable ({why}): set DETBENCH_RESULTS to a "
                              f"folder you can write")
    return tdir


def _write_version(tdir: Path, vdir: Path, files: dict[str, bytes], top: dict[str, bytes]) -> None:
    """A version as a whole: its folder and the new top-level files are written into a staging
    folder, then the folder is renamed into place and the top-level files over the old ones
    (version.json last). A write that fails (disk full) leaves no partial version folder and
    the top-level files of the version before."""
    stage = tdir / f".stage.tmp{os.getpid()}"
    try:
        for sub, content in (("version", files), ("top", top)):
            for name, data in content.items():
                atomic_write_bytes(stage / sub / name, data)
        os.rename(stage / "version", vdir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for name in sorted(top, key=lambda n: n == "version.json"):
        os.replace(stage / "top" / name, tdir / name)
    shutil.rmtree(stage, ignore_errors=True)


def read_version(tdir: Path) -> dict | None:
    p = tdir / "version.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except ValueError:
        return None


def table_seeds(name: str, scale: str, out_root: Path | None = None) -> tuple[int, ...] | None:
    """The seeds the table's newest version was built with (None: never built here)."""
    v = read_version(Path(out_root or results_root() / "tables") / table_dir_name(name, scale))
    return tuple(v["seeds"]) if v and v.get("seeds") else None


def version_stamp(git: dict | None = None) -> str:
    """``<date>_<sha>``, ``-dirty`` when the checkout's code has uncommitted changes."""
    g = git or git_info(REPO)
    sha = (g["sha"] or "unknown")[:7]
    return time.strftime("%Y-%m-%d") + f"_{sha}" + ("-dirty" if g.get("dirty") else "")


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def _committable(path: Path) -> bool:
    """Whether git could commit ``path``: it lies in this checkout and git does not ignore it."""
    try:
        rel = Path(path).resolve().relative_to(Path(REPO).resolve())
    except ValueError:
        return False
    r = _git("check-ignore", "-q", str(rel))
    return r is not None and r.returncode == 1     # 0: ignored; 128: no repository


def _dirty_message(plan: Plan, tdir: Path, version: str, store_root: Path) -> str:
    """What the refusal says: what would have been written, why not, and the commands that go on."""
    r = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    changed = [ln[3:] for ln in (r.stdout.splitlines() if r is not None and r.returncode == 0 else [])]
    which = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    cmd = f"detbench render --table {plan.spec.name}" + ("" if plan.scale == DEFAULT_SCALE else f" --scale {plan.scale}")
    try:
        where = Path(tdir).resolve().relative_to(Path(REPO).resolve())
    except ValueError:
        where = tdir
    return (f"{plan.spec.name}: not writing version {version} into {where}: the code has uncommitted changes"
            f"{f' ({which})' if which else ''}, and a version must name the commit that built it. "
            f"Commit them, then run `{cmd}` (no training: the runs are kept in {store_root}). "
            "To write it anyway as a -dirty version (not one to commit), add --allow-dirty to `detbench render` "
            f"or `detbench reproduce`, or set {ALLOW_DIRTY_ENV}=1 (any command, e.g. `detbench collect`).")


def _csv(plan: Plan, cells: dict) -> str:
    spec = plan.spec
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "scale", "row", "method", "column", "status", "n_seeds", "seeds", "ours_mean", "ours_std",
                "paper", "diff", "p_vs_scratch", "p_vs_moco_v2", "cost_per_seed", "cost_unit", "runs"])
    for (ri, ci), c in sorted(cells.items()):
        w.writerow([spec.name, plan.scale, spec.rows[ri].label, spec.rows[ri].method, spec.columns[ci].label,
                    c["status"], c["n"], " ".join(map(str, c["seeds"])),
                    "" if c["mean"] is None else f"{c['mean']:.3f}",
                    "" if c["n"] < 2 else f"{c['std']:.3f}",          # no std from one seed
                    "" if c["ref"] is None else c["ref"], "" if c["diff"] is None else f"{c['diff']:.3f}",
                    *("" if name not in c["p"] else f"{c['p'][name]:.4f}" for _, _, name in BASELINES),
                    "" if c["cost"] is None else f"{c['cost']:.4f}", c["cost_unit"] or "", " ".join(c["runs"])])
    if spec.gain is not None:
        for g in gain_cells(plan, cells):
            w.writerow([spec.name, plan.scale, spec.gain.label, "", g["column"], "gain", "", "",
                        "" if g["mean"] is None else f"{g['mean']:.3f}", "" if g["se"] is None else f"{g['se']:.3f}",
                        "" if g["ref"] is None else g["ref"], "", "", "", "", "", ""])
    return buf.getvalue()


def _cost_line(plan: Plan, df) -> str:
    keys = [j.key for j in plan.jobs if j.key in df.index]
    sub = df.loc[keys]
    sub = sub[sub["status"] == "done"]
    if sub.empty:
        return "Compute: no finished runs yet."
    gpu = sub["gpu_hours"].fillna(0).sum()
    cpu = sub.loc[sub["gpu_hours"].fillna(0) == 0, "cpu_hours"].fillna(0).sum()
    by_stage = sub.groupby("stage")["hours"].sum()
    stages = ", ".join(f"{s} {by_stage[s]:.3g} h" for s in ("pretrain", "finetune", "evaluate") if s in by_stage)
    parts = [f"{gpu:.3g} GPU-hours" if gpu else "", f"{cpu:.3g} CPU-hours" if cpu else ""]
    src = "sacct" if (sub["cost_source"] == "sacct").any() else "the runs' own wall clocks"
    return (f"Compute: {' + '.join(p for p in parts if p)} over {len(sub)} finished runs "
            f"(wall clock by stage: {stages}; from {src}).")


def _markdown(plan: Plan, cells: dict, df, version: str, rel_runs: str, version_link: str | None) -> str:
    spec = plan.spec
    nseeds = len(plan.seeds)
    is_paper = plan.scale == PAPER_SCALE
    v = f"[`{version}`]({version_link})" if version_link else f"`{version}`"
    any_multi = any(c["n"] > 1 for c in cells.values())
    tested = any(c["p"] for c in cells.values())
    lines = [f"# {spec.name} at scale `{plan.scale}`: {what_ran(plan, df)}", "",
             f"The paper's table: {spec.title}" + (f" ({spec.source})" if spec.source else "") + f". Version {v}; seeds "
             f"{', '.join(map(str, plan.seeds))}" + (f"; fine-tuning {_schedules(plan)}" if _schedules(plan) else "")
             + ".", ""]
    cell_doc = "Each cell: ours" + (" (mean ± std over the n seeds)" if any_multi else " (one seed)")
    cell_doc += " / paper" + (" [ours − paper]" if is_paper else "") + "; a link opens the run's metrics."
    if not is_paper:
        cell_doc += (f" At the `{plan.scale}` scale absolute numbers are not comparable with the paper's "
                     "(so no differences are printed): read the ordering of the rows.")
    lines += [cell_doc, ""]
    if tested:
        wins = []
        for _, _, name in BASELINES:
            who = [f"{spec.rows[r].label} ({spec.columns[c].label})" for (r, c), cell in sorted(cells.items())
                   if cell["p"].get(name, 1.0) < ALPHA]
            wins.append(f"above {name}: {', '.join(who) if who else 'no row'}")
        lines += ["▲S / ▲M: higher than the Scratch / MoCo v2 row of the same column, " + TEST_NAME
                  + f" (cells with ≥ {MIN_SEEDS_FOR_TEST} seeds; p-values in table.csv). "
                  + "; ".join(wins) + ".", ""]
    rho = spearman_vs_paper(plan, cells)
    if rho:
        lines += ["Spearman ρ of our rows' order against the paper's: "
                  + ", ".join(f"{k} {r:+.2f} ({n} rows)" for k, (r, n) in rho.items()) + ".", ""]
    lines += [_cost_line(plan, df), ""]
    if version_link:
        lines += ["![plot](plot.png)", ""]
        if spec.convergence:
            lines += ["![convergence: AP against fine-tuning steps](convergence.png)", ""]
    header = ["method", "n"] + [c.label for c in spec.columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for ri, row in enumerate(spec.rows):
        parts = [row.label, _n_label([cells[(ri, ci)]["n"] for ci in range(len(spec.columns))
                                      if cells[(ri, ci)]["n"]])]
        parts += [cell_text(cells[(ri, ci)], nseeds, rel_runs) for ci in range(len(spec.columns))]
        lines.append("| " + " | ".join(parts) + " |")
    if spec.gain is not None:
        lines.append(_gain_line(plan, cells))
        lines += ["", f"{spec.gain.label}: the {spec.gain.row} row minus the {spec.gain.over} row "
                  "(± its standard error over seeds, from two seeds up) / the paper's gain."]
    lines += [""] + partial_note(cells.values())
    lines += [f"Made from {len(plan.jobs)} runs (`detbench runs`, or `benchmark.reporting.results.load_runs()` "
              "in Python). Earlier versions: the dated folders beside this file.", ""]
    return "\n".join(lines)


def _plot(plan: Plan, cells: dict, df) -> bytes:
    """Top row: ours per column (bars with ± std error bars and the seeds as dots from 3
    seeds on; dots with their value below); bottom row: the paper's. Never a shared axis:
    at small scales ours are orders of magnitude below the paper's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spec = plan.spec
    # the rows that ran (a row not implemented or not run yet has nothing of ours to show)
    rows = [ri for ri in range(len(spec.rows))
            if any(cells[(ri, ci)]["status"] != NOT_IMPLEMENTED for ci in range(len(spec.columns)))]
    ncol = len(spec.columns)
    has_ref = any(_num(cells[(ri, ci)]["ref"]) is not None for ri in rows for ci in range(ncol))
    nr = 2 if has_ref else 1
    width = 3.0 * ncol + 0.07 * max((len(spec.rows[ri].label) for ri in rows), default=10) + 0.6
    fig, axes = plt.subplots(nr, ncol, figsize=(width, (0.32 * len(rows) + 1.3) * nr + 0.6),
                             squeeze=False, layout="constrained")
    labels = [spec.rows[ri].label for ri in rows]
    y = list(range(len(rows)))
    for ci in range(ncol):
        ax = axes[0][ci]
        for i, ri in enumerate(rows):
            c = cells[(ri, ci)]
            if c["mean"] is None:
                ax.text(0, i, f" {c['status']}", va="center", fontsize=7, color="#a33").set_in_layout(False)
            elif c["n"] >= MIN_SEEDS_FOR_TEST:
                ax.barh(i, c["mean"], height=0.6, xerr=c["std"], color="#3b75af", capsize=2)
                ax.scatter(c["values"], [i] * c["n"], s=6, color="k", zorder=3)
            else:
                ax.scatter([c["mean"]], [i], s=18, color="#3b75af", zorder=3)
                ax.annotate(f"{c['mean']:.2f}" + (f" (n={c['n']})" if c["n"] > 1 else ""), (c["mean"], i),
                            xytext=(4, 0), textcoords="offset points", va="center", fontsize=6).set_in_layout(False)
        ax.set_title(f"{spec.columns[ci].label}: ours ({plan.scale})", fontsize=8)
        if has_ref:
            rax = axes[1][ci]
            refs = [_num(cells[(ri, ci)]["ref"]) for ri in rows]
            rax.barh([i for i, r in zip(y, refs) if r is not None], [r for r in refs if r is not None],
                     height=0.6, color="#999")
            rax.set_title(f"{spec.columns[ci].label}: paper", fontsize=8)
        for a in axes[:, ci]:
            a.set_yticks(y)
            a.set_yticklabels(labels if ci == 0 else [], fontsize=7)
            a.set_ylim(len(rows) - 0.5, -0.5)
            a.tick_params(axis="x", labelsize=7)
            a.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{spec.name} at {plan.scale}: {what_ran(plan, df)}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def convergence_points(plan: Plan, cells: dict) -> dict[tuple[str, str], dict[int, list[tuple[int, float, float]]]]:
    """(detector, metric) -> row -> [(fine-tuning steps, mean, std)] in step order, from the
    cells that have a value: each point is a whole fine-tuning schedule of that length (its
    own warm-up and lr drops), as the paper compares 12k with 90k iterations."""
    steps = {j.key: j.config["recipe"]["steps"] for j in plan.jobs if j.stage == "finetune"}
    out: dict = {}
    for cell in plan.cells:
        c = cells[(cell.row, cell.col)]
        if cell.eval_key is None or c["mean"] is None or cell.seed != plan.seeds[0]:
            continue
        col = plan.spec.columns[cell.col]
        pts = out.setdefault((col.detector, col.metric), {}).setdefault(cell.row, [])
        pts.append((steps[cell.chain[-2]], c["mean"], c["std"]))
    return {g: {r: sorted(p) for r, p in rows.items()} for g, rows in out.items()}


def _convergence_plot(plan: Plan, cells: dict) -> bytes:
    """One panel per (detector, metric): the metric against fine-tuning steps, a line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = convergence_points(plan, cells)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False, layout="constrained")
    for ax, ((det, metric), rows) in zip(axes[0], groups.items()):   # in the table's column order
        for ri, pts in sorted(rows.items()):
            x, m, sd = zip(*pts)
            ax.errorbar(x, m, yerr=sd, marker="o", ms=4, capsize=2, label=plan.spec.rows[ri].label)
        ax.set_title(f"{detector_title(det)}: {metric}", fontsize=8)
        ax.set_xlabel("fine-tuning steps", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if groups:
        axes[0][0].legend(fontsize=6)
    else:
        axes[0][0].text(0.5, 0.5, "no finished cells yet", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"{plan.spec.name} at {plan.scale}: convergence", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
