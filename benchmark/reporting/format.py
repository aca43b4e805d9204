"""How one cell of a table reads, in a table (``render``) and on a leaderboard
(``leaderboard``) alike: ``ours [markers] [†] / paper [ours − paper]``, linked to its run.

A leaf: it reads the cell dicts of :func:`benchmark.reporting.render.cell_values` and imports
nothing of the project."""
from __future__ import annotations

import math

ALPHA = 0.05                 # a cell is marked above a baseline when its p is below this
BASELINES = (("scratch", "S", "Scratch"), ("moco_v2", "M", "MoCo v2"))   # method, marker, name
PARTIAL_MARK = "†"           # the fine-tuning run loaded only part of the pretrained weights


def fmt(v: float | None, nd: int = 1) -> str:
    """A number with ``nd`` decimals; '–' for none, 'diverged' for NaN."""
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "diverged"
    return f"{v:.{nd}f}"


def ours(c: dict, nseeds: int) -> str:
    """mean, ± std only over more than one seed; (k/n seeds) when some are missing; the
    status when there is no value."""
    if c["mean"] is None:
        return c["status"]
    nd = 2 if abs(c["mean"]) < 10 else 1    # tiny-scale APs live below 1: keep their digits
    s = f"{c['mean']:.{nd}f}"
    if len(c["values"]) > 1:
        s += f" ± {c['std']:.{nd}f}"
    if c["status"] == "partial" or len(c["values"]) < nseeds:
        s += f" ({len(c['values'])}/{nseeds} seeds)"
    return s


def markers(c: dict) -> str:
    """' ▲S ▲M': above the Scratch / MoCo v2 row of its column (p < ALPHA)."""
    return "".join(f" ▲{m}" for _, m, name in BASELINES if c["p"].get(name, 1.0) < ALPHA)


def partial_mark(c: dict) -> str:
    return f" {PARTIAL_MARK}" if c.get("not_loaded") else ""


def cell_text(c: dict, nseeds: int, runs_rel: str) -> str:
    """The Markdown of one cell: ours (over ``nseeds`` planned seeds), markers and † / the
    paper's value, [ours − paper] where both measure the same thing, linked to the metrics of
    its first run (``runs_rel``: the run store relative to the page)."""
    s = f"{ours(c, nseeds)}{markers(c)}{partial_mark(c)} / {fmt(c['ref'])}"
    if c["diff"] is not None:
        s += f" [{c['diff']:+.1f}]"
    if c["runs"]:
        s = f"[{s}]({runs_rel}/{c['runs'][0]}/metrics.json)"
    return s


def partial_note(cells) -> list[str]:
    """The footnote of the cells marked †, as Markdown lines (none when no cell is marked)."""
    groups = sorted({g for c in cells if c.get("not_loaded") for g in c["not_loaded"]})
    if not groups:
        return []
    return [f"{PARTIAL_MARK}: the fine-tuning run loaded only part of the pretrained weights (groups of the "
            f"weights file not loaded whole: {', '.join(groups)}; the run's `load_report.json` says which "
            "and why).", ""]
