"""Refactors must not change results' identities: every run the committed tables were built
from is planned again under the same key (a changed key would silently recompute them).

SoCo rows are not checked here: SoCo's training changed on purpose when it was brought to
the official code (CHANGELOG.md), so its key changed with it; its older runs stay in the
store under their old keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.experiments.plan import plan_table

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"


def _committed(scale: str) -> set[str]:
    out = set()
    for cfg in RUNS.glob("*/config.json"):
        if json.loads(cfg.read_text()).get("scale") == scale:
            out.add(cfg.parent.name)
    return out


@pytest.mark.parametrize("table,scale,seeds", [
    ("soco_table1", "tiny", (0, 1, 2)),
    ("soco_table4", "tiny", (0,)),
    ("soco_table5", "tiny", (0,)),
    ("soco_table1", "tiny_long", (0,)),
])
def test_committed_runs_keep_their_keys(table, scale, seeds):
    committed = _committed(scale)
    assert committed, f"no committed {scale} runs under {RUNS}"
    plan = plan_table(table, scale=scale, seeds=seeds)
    # rows whose method was implemented when the table was made (new methods add new keys);
    # soco's keys changed with its new defaults (see the module docstring)
    old = {"scratch", "supervised", "moco_v2"}
    keys = {k for c in plan.cells if plan.spec.rows[c.row].method in old for k in c.chain}
    missing = keys - committed
    assert not missing, f"{len(missing)} of {len(keys)} {table}@{scale} run keys changed: {sorted(missing)[:5]}"
