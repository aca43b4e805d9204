"""End to end at the `micro` scale (seconds per run): table -> runs -> table, reuse,
resume with identical metrics, divergence. Marked slow; CI runs them."""
import json

import pytest
import yaml

from benchmark.cli import main
from benchmark.experiments.plan import plan_table
from benchmark.runner import run_job
from slurm.local import run_plan_local
from benchmark.runs.store import RunStore

pytestmark = pytest.mark.slow

SPEC = {
    "name": "micro_e2e", "title": "micro end-to-end", "source": "SoCo Table 1", "reference": "soco_table1.csv",
    "columns": [{"label": "1x APbb", "schedule": "1x", "metric": "bbox.AP", "ref_column": "APbb",
                 "ref_match": {"schedule": "1x"}},
                {"label": "1x APmk", "schedule": "1x", "metric": "segm.AP", "ref_column": "APmk",
                 "ref_match": {"schedule": "1x"}}],
    "rows": [{"label": "Scratch", "method": "scratch", "ref_match": {"method": "Scratch"}},
             {"label": "MoCo v2", "method": "moco_v2", "pretrain_epochs": 200, "ref_match": {"method": "MoCo v2"}},
             {"label": "SoCo", "method": "soco", "pretrain_epochs": 100,
              "ref_match": {"method": "SoCo", "pretrain_epochs": "100"}},
             # a method no file registers (every row of SoCo's Table 1 has one now)
             {"label": "Not written", "method": "not_written", "pretrain_epochs": 200, "ref_match": {"method": "DenseCL"}}],
}


@pytest.fixture
def spec_path(isolated):
    p = isolated / "micro_e2e.yaml"
    p.write_text(yaml.safe_dump(SPEC))
    return p


def test_reproduce_table_then_nothing_to_do(isolated, spec_path, capsys, monkeypatch):
    assert main(["reproduce", "--table", str(spec_path), "--scale", "micro"]) == 0
    out = capsys.readouterr().out
    assert "8 runs, 8 to run" in out
    tdir = isolated / "results" / "tables" / "micro_e2e@micro"
    md = (tdir / "table.md").read_text()
    assert "not implemented" in md                                   # the unregistered row
    cells = json.loads(next(tdir.glob("20*/cells.json")).read_text())
    for row in ("Scratch", "MoCo v2", "SoCo"):
        c = cells[f"{row} | 1x APbb"]
        assert c["status"] == "done" and 0.0 <= c["mean"] <= 100.0 and c["ref"] is not None
    assert (tdir / "plot.png").exists() and (tdir / "table.csv").exists()
    # every run keeps its resolved config, environment and metrics
    store = RunStore(isolated / "runs")
    runs = store.list()
    assert len(runs) == 8 and all(r["status"] == "done" for r in runs)
    for r in runs:
        d = store.run_dir(r["key"])
        assert {"config.json", "env.json", "metrics.json"} <= {p.name for p in d.iterdir()}
    pre = [r for r in runs if r["stage"] == "pretrain"]
    assert all(len(store.metrics(r["key"])["weights_sha256"]) == 64 for r in pre)
    # same keys -> nothing recomputed
    calls = []
    import slurm.local as stages
    monkeypatch.setattr(stages, "run_job", lambda *a, **k: calls.append(a) or {})
    assert main(["reproduce", "--table", str(spec_path), "--scale", "micro"]) == 0
    out = capsys.readouterr().out
    assert "8 runs, 0 to run" in out and "8 finished runs" in out and "nothing to train" in out and calls == []
    assert len(list(tdir.glob("20*"))) == 1                          # same content: no new version


def test_interrupted_chain_ends_with_identical_metrics(isolated, spec_path):
    spec = dict(SPEC, rows=[SPEC["rows"][1]])
    p = isolated / "one.yaml"
    p.write_text(yaml.safe_dump(spec))
    plan = plan_table(str(p), scale="micro")
    a, b = str(isolated / "store_a"), str(isolated / "store_b")
    run_plan_local(plan, a, progress=False)
    # store b: the pretraining and the fine-tuning are each killed half-way, then resumed
    pre, ft, ev = plan.jobs
    run_job(pre, b, stop_after=2, progress=False)
    assert RunStore(b).status(pre.key) == "interrupted"
    run_job(pre, b, progress=False)
    run_job(ft, b, stop_after=2, progress=False)
    assert RunStore(b).status(ft.key) == "interrupted"
    run_plan_local(plan, b, progress=False)
    ma = RunStore(a).metrics(ev.key)
    mb = RunStore(b).metrics(ev.key)
    assert ma["bbox"] == mb["bbox"] and ma["segm"] == mb["segm"]
    assert RunStore(a).metrics(pre.key)["weights_sha256"] == RunStore(b).metrics(pre.key)["weights_sha256"]
    # two runs at once in worker processes: same results as one after the other
    c = str(isolated / "store_c")
    status = run_plan_local(plan_table(str(p), scale="micro", seeds=(0, 1)), c, jobs=2)
    assert set(status.values()) == {"done"} and len(status) == 6
    assert RunStore(c).metrics(ev.key)["bbox"] == ma["bbox"]


def test_diverged_run_marks_its_cells_and_the_table_goes_on(isolated, spec_path):
    p = isolated / "div.yaml"
    rows = [dict(SPEC["rows"][1], label="MoCo v2 lr 1e30", recipe_overrides={"base_lr": 1.0e30}), SPEC["rows"][0]]
    p.write_text(yaml.safe_dump(dict(SPEC, rows=rows)))
    assert main(["reproduce", "--table", str(p), "--scale", "micro"]) == 0
    cells = json.loads(next((isolated / "results" / "tables" / "micro_e2e@micro").glob("20*/cells.json")).read_text())
    assert cells["MoCo v2 lr 1e30 | 1x APbb"]["status"] == "diverged"
    assert cells["Scratch | 1x APbb"]["status"] == "done"
    assert "diverged" in (isolated / "results" / "tables" / "micro_e2e@micro" / "table.md").read_text()
