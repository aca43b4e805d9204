"""slurm.state: atomic, merging state file readable from a later shell; the plan it records."""
import json
import multiprocessing as mp

import pytest
import yaml

from benchmark.experiments.plan import NOT_IMPLEMENTED, NOT_SUPPORTED, plan_table
from slurm.orchestrate import plan_record, rebuild_plan
from slurm.state import SlurmState, StateError, state_path


def test_merge_keeps_earlier_entries_and_history(tmp_path):
    st = SlurmState.for_name(tmp_path, "soco_table1")
    assert st.path == tmp_path / "slurm" / "soco_table1.json"
    assert st.runs == {}
    st.record("a", stage="pretrain", job_id="10_0", array_task_id=0)
    st.record_many({"b": {"stage": "finetune", "job_id": "11"}}, submission={"submitted": 1})
    st.record("a", job_id="12", array_task_id=None)  # resubmitted
    fresh = SlurmState(st.path)  # another shell
    runs = fresh.runs
    assert set(runs) == {"a", "b"}
    assert runs["a"]["job_id"] == "12" and runs["a"]["stage"] == "pretrain"
    assert runs["a"]["history"][0]["job_id"] == "10_0"
    st.record("a", cancelled=True)  # same job: no new history entry
    assert len(SlurmState(st.path).runs["a"]["history"]) == 1
    assert fresh.load()["submissions"] == [{"submitted": 1}]
    assert not list(st.path.parent.glob("*.tmp"))


def _writer(path, i):
    SlurmState(path).record(f"k{i}", job_id=str(i))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = state_path(tmp_path, "grid")
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert set(SlurmState(path).runs) == {f"k{i}" for i in range(8)}
    json.loads(path.read_text())


def test_corrupt_file_is_reported_not_overwritten(tmp_path):
    st = SlurmState.for_name(tmp_path, "x")
    st.path.parent.mkdir(parents=True)
    st.path.write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        st.record("a", job_id="1")
    assert st.path.read_text() == "{not json"
    with pytest.raises(ValueError):
        state_path(tmp_path, "../escape")


def _spec_file(tmp_path, rows=("AD", "X"), epochs=200):
    """Columns FCOS and Faster R-CNN C4 (which AlignDet does not pretrain); rows AlignDet over
    MoCo v2 and a method that is not registered."""
    all_rows = {"AD": {"label": "AD", "method": "aligndet", "parent": {"method": "moco_v2", "pretrain_epochs": epochs}},
                "X": {"label": "X", "method": "not_a_method"}}
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "rows": [all_rows[r] for r in rows], "columns": [
        {"label": d, "schedule": "1x", "metric": "bbox.AP", "detector": d} for d in ("fcos", "faster_rcnn_c4")]}))
    return str(p)


def test_recorded_plan_is_replanned_or_read_back(tmp_path):
    plan = plan_table(_spec_file(tmp_path), scale="tiny", seeds=(0, 1))
    SlurmState.for_name(tmp_path / "res", "t").set_fields(plan=plan_record(plan, tmp_path / "runs"))
    again, how = rebuild_plan(tmp_path / "res", "t")
    assert how == "re-planned" and again.cells == plan.cells and again.jobs == plan.jobs
    assert [c.missing for c in again.cells if c.seed == 0] == ["", NOT_SUPPORTED, NOT_IMPLEMENTED, NOT_IMPLEMENTED]
    # the spec changed since: the plan as submitted, reasons included, its configs in the run store
    _spec_file(tmp_path, epochs=100)
    recorded, how = rebuild_plan(tmp_path / "res", "t")
    assert how.startswith("recorded cells") and recorded.cells == plan.cells and recorded.jobs == plan.jobs
    assert all(j.config == {} for j in recorded.jobs) and (recorded.scale, recorded.seeds) == ("tiny", (0, 1))


def test_cells_recorded_as_lists_and_plans_that_no_longer_fit(tmp_path):
    plan = plan_table(_spec_file(tmp_path), scale="tiny")
    rec = plan_record(plan, tmp_path / "runs")
    rec["cells"] = [[c.row, c.col, c.seed, c.eval_key, list(c.chain)] for c in plan.cells]
    state = SlurmState.for_name(tmp_path / "res", "t")
    state.set_fields(plan=rec)
    again, how = rebuild_plan(tmp_path / "res", "t")
    assert how == "re-planned" and again.cells == plan.cells
    _spec_file(tmp_path, rows=("X",))           # the submitted AlignDet row is gone
    with pytest.raises(StateError, match="does not fit spec") as err:
        rebuild_plan(tmp_path / "res", "t")
    assert err.value.path == str(state.path)
    SlurmState.for_name(tmp_path / "res", "none").record("k", job_id="1")
    with pytest.raises(StateError, match="no plan recorded"):
        rebuild_plan(tmp_path / "res", "none")
