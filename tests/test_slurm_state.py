"""slurm.state: atomic, merging state file readable from a later shell."""
import json
import multiprocessing as mp

import pytest

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
