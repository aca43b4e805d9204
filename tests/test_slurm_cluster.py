"""slurm.submit against a real Slurm cluster (slurm/cluster/start.sh).

Run with::

    MAX_ARRAY_SIZE=4 slurm/cluster/start.sh && pytest -m slurm tests/test_slurm_cluster.py

Every test skips with a reason when no cluster answers.  ``DETBENCH_START_SLURM=1`` lets
the fixture start one itself (as root, MAX_ARRAY_SIZE=4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest

from tests.conftest import connect_slurm_or_skip, wait_for


from slurm.profile import cluster_max_array_size, load_profile
from slurm.state import SlurmState
from slurm.orchestrate import table_status
from slurm.submit import slurm_job_states, submit_jobs

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
# the fake stage functions and Job class below travel to the jobs by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- fakes of benchmark.experiments.plan/store/stages
@dataclass(frozen=True)
class FakeJob:
    stage: str
    key: str
    config: dict
    parents: tuple
    label: str


class FakeStore:
    """status(key) from ``<root>/<key>/status`` written by fake_stage."""

    def __init__(self, root):
        self.root = Path(root)

    def run_dir(self, key):
        return self.root / key

    def status(self, key):
        f = self.root / key / "status"
        return f.read_text().strip() if f.exists() else "missing"


def fake_stage(job, store_root, resume=True):
    import json as _json
    import os as _os
    import time as _time
    from pathlib import Path as _Path

    import slurm.submit as _submit

    run = _Path(store_root) / job.key
    run.mkdir(parents=True, exist_ok=True)
    progress_file = run / "progress"
    step = int(progress_file.read_text()) if (resume and progress_file.exists()) else 0
    with open(run / "calls.jsonl", "a") as fh:
        fh.write(_json.dumps({"start_step": step, "job": _os.environ.get("SLURM_JOB_ID"),
                              "restarts": _os.environ.get("SLURM_RESTART_COUNT", "0"),
                              "module": _submit.__file__, "cwd": _os.getcwd(),
                              "source": _os.environ.get("DETBENCH_SOURCE_ROOT")}) + "\n")
    (run / "status").write_text("running")
    cfg = job.config
    if cfg.get("fail") or (cfg.get("fail_once") and not (run / "failed_once").exists()):
        (run / "failed_once").write_text("1")
        (run / "status").write_text("failed")
        raise RuntimeError(f"{job.label}: failing on purpose")
    import sys as _sys

    while step < cfg.get("steps", 0):  # a resumable "training loop"
        _time.sleep(cfg.get("step_s", 0.1))
        step += 1
        tmp = run / "progress.tmp"
        tmp.write_text(str(step))
        _os.replace(tmp, progress_file)
        from benchmark.engine.signals import REQUESTS   # what StageJob.checkpoint() asks
        if REQUESTS.checkpoint:
            with open(run / "checkpoints.jsonl", "a") as fh:  # saved on request, like TrainLoop
                fh.write(_json.dumps({"step": step}) + "\n")
            REQUESTS.checkpoint = False
    (run / "status").write_text("done")
    return {"key": job.key, "steps": step}


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def slurm_cluster():
    """Sources $SLURM_BASE/env.sh (SLURM_CONF) and checks that the cluster answers."""
    base = Path(os.environ.get("SLURM_BASE", "/tmp/detbench-slurm"))
    if os.environ.get("DETBENCH_START_SLURM") == "1" and os.geteuid() == 0:
        env = {**os.environ, "SLURM_BASE": str(base), "MAX_ARRAY_SIZE": os.environ.get("MAX_ARRAY_SIZE", "4")}
        subprocess.run([str(REPO / "slurm/cluster/start.sh")], env=env, check=True, capture_output=True)
    sinfo = connect_slurm_or_skip(base)
    return {"base": base, "cpus": int(sinfo.split()[1].rstrip("+"))}


@pytest.fixture
def workdir(tmp_path):
    return {"results": tmp_path / "results", "store": tmp_path / "store"}


def _profile(**overrides):
    return load_profile("local-ci", {"mem_gb": 0.25, **overrides})


def states_of(summary_or_ids):
    ids = summary_or_ids.job_ids.values() if hasattr(summary_or_ids, "job_ids") else summary_or_ids
    return slurm_job_states(ids)


def all_finished(ids):
    states = slurm_job_states(ids)
    return len(states) == len(list(ids)) and all(
        s["state"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING") for s in states.values()
    ) and states


def submit(jobs, workdir, name, **profile_overrides):
    return submit_jobs(jobs, name=name, results_dir=workdir["results"], store_root=workdir["store"],
                       profile=_profile(**profile_overrides), store=FakeStore(workdir["store"]),
                       fn=fake_stage, repo_root=REPO)


# ---------------------------------------------------------------- tests
def test_array_split_by_max_array_size_runs_from_snapshot_and_resubmits_nothing(slurm_cluster, workdir):
    max_array = cluster_max_array_size()
    if max_array > 16:
        pytest.skip(f"cluster MaxArraySize={max_array}; start it with MAX_ARRAY_SIZE=4 to test chunking")
    n = max(10, 2 * max_array + 2)
    jobs = [FakeJob("pretrain", f"p{i:02d}", {"i": i}, (), f"arr/pretrain/{i}") for i in range(n)]
    summary = submit(jobs, workdir, "arr")
    assert len(summary.submitted) == n
    sizes = [a["size"] for a in summary.arrays]
    assert sum(sizes) == n and max(sizes) <= max_array and len(sizes) == -(-n // max_array)
    assert len({a["array_job_id"] for a in summary.arrays}) == len(sizes)

    state = SlurmState.for_name(workdir["results"], "arr").runs
    assert set(state) == {j.key for j in jobs}
    entry = state["p00"]
    assert entry["array_task_id"] == 0 and entry["stage"] == "pretrain" and entry["submitted_at"]
    assert entry["snapshot"]["id"] and Path(entry["snapshot"]["path"], "slurm", "submit.py").is_file()

    wait_for(lambda: all_finished(summary.job_ids.values()), 180, "the array to finish")
    store = FakeStore(workdir["store"])
    assert all(store.status(j.key) == "done" for j in jobs), table_status(workdir["results"], "arr", store)["rows"]
    call = json.loads((workdir["store"] / "p00" / "calls.jsonl").read_text().splitlines()[0])
    snap = Path(entry["snapshot"]["path"])
    assert Path(call["module"]).resolve() == (snap / "slurm" / "submit.py").resolve()  # imports from the snapshot
    assert Path(call["cwd"]).resolve() == snap.resolve()
    assert call["source"] == str(REPO)

    again = submit(jobs, workdir, "arr")
    assert again.submitted == [] and {s["reason"] for s in again.skipped} == {"done"}
    assert len(SlurmState.for_name(workdir["results"], "arr").load()["submissions"]) == 2


def test_afterok_chain_with_failing_parent_then_resubmission_repairs_it(slurm_cluster, workdir):
    pre = FakeJob("pretrain", "c-pre", {"fail_once": True}, (), "chain/pretrain")
    ft = FakeJob("finetune", "c-ft", {}, ("c-pre",), "chain/finetune")
    ev = FakeJob("evaluate", "c-ev", {}, ("c-ft",), "chain/evaluate")
    summary = submit([ev, ft, pre], workdir, "chain")  # any order: submitted parents first
    ids = summary.job_ids
    assert [s["stage"] for s in summary.submitted] == ["pretrain", "finetune", "evaluate"]
    assert summary.submitted[1]["dependency"] == f"afterok:{ids['c-pre']}"
    assert summary.submitted[2]["dependency"] == f"afterok:{ids['c-ft']}"

    # while queued, submitting again submits nothing
    queued = submit([pre, ft, ev], workdir, "chain")
    assert queued.submitted == [] or all(s["key"] == "c-pre" for s in queued.submitted)

    wait_for(lambda: states_of([ids["c-pre"]]).get(ids["c-pre"], {}).get("state") == "FAILED", 120, "parent to fail")
    rows = wait_for(
        lambda: (r := {x["key"]: x for x in table_status(workdir["results"], "chain", FakeStore(workdir["store"]))["rows"]})
        and r["c-ft"]["reason"] == "DependencyNeverSatisfied" and r, 60, "child to be marked never satisfiable")
    assert rows["c-ft"]["slurm_state"] == "PENDING"
    assert rows["c-pre"]["slurm_state"] == "FAILED"
    assert not (workdir["store"] / "c-ft").exists()  # the child never ran

    # the re-submission resubmits the failed parent and replaces its stuck children
    fixed = submit([pre, ft, ev], workdir, "chain")
    assert {s["key"] for s in fixed.submitted} == {"c-pre", "c-ft", "c-ev"}
    assert set(fixed.cancelled) >= {ids["c-ft"]}
    runs = SlurmState.for_name(workdir["results"], "chain").runs
    assert runs["c-pre"]["history"][0]["job_id"] == ids["c-pre"]  # earlier submission kept
    wait_for(lambda: FakeStore(workdir["store"]).status("c-ev") == "done", 180, "the chain to finish")
    assert FakeStore(workdir["store"]).status("c-ft") == "done"


def test_checkpointable_job_is_preempted_requeued_and_resumes(slurm_cluster, workdir):
    cpus = slurm_cluster["cpus"]
    job = FakeJob("pretrain", "pre-empt", {"steps": 150, "step_s": 0.1}, (), "preempt/pretrain")
    summary = submit([job], workdir, "preempt", cpus_per_task=cpus, time_min=60)
    job_id = summary.job_ids["pre-empt"]
    progress = workdir["store"] / "pre-empt" / "progress"
    wait_for(lambda: progress.exists() and int(progress.read_text()) >= 10, 90, "the job to make progress")

    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(cpus), "--mem=100M",
                           "-o", "/dev/null", "--wrap", "sleep 2"], capture_output=True, text=True, check=True)
    high_id = high.stdout.strip().split(";")[0]
    wait_for(lambda: all_finished([high_id]), 120, "the high-priority job to run")
    wait_for(lambda: FakeStore(workdir["store"]).status("pre-empt") == "done", 240, "the requeued job to finish")

    calls = [json.loads(line) for line in (workdir["store"] / "pre-empt" / "calls.jsonl").read_text().splitlines()]
    assert len(calls) >= 2, calls  # started again after the requeue
    assert calls[-1]["start_step"] > 0, calls  # ... from its saved progress
    assert int(progress.read_text()) == 150
    # the store's done-marker is written before the job's process exits: wait for Slurm to see the end
    wait_for(lambda: all_finished([job_id]), 60, "the requeued job to leave the queue")
    assert slurm_job_states([job_id])[job_id]["state"] == "COMPLETED"


def test_usr2_calls_checkpoint_which_asks_the_stage_to_save_then_requeues(slurm_cluster, workdir):
    """submitit's signal (USR2, as at timeout) → StageJob.checkpoint() → trainer flag → requeue."""
    job = FakeJob("pretrain", "sig", {"steps": 120, "step_s": 0.1}, (), "signal/pretrain")
    summary = submit([job], workdir, "signal", time_min=60)
    job_id = summary.job_ids["sig"]
    progress = workdir["store"] / "sig" / "progress"
    wait_for(lambda: progress.exists() and int(progress.read_text()) >= 10, 90, "the job to make progress")
    subprocess.run(["scancel", "-s", "USR2", job_id], check=True)
    wait_for(lambda: FakeStore(workdir["store"]).status("sig") == "done", 240, "the requeued job to finish")
    run = workdir["store"] / "sig"
    calls = [json.loads(x) for x in (run / "calls.jsonl").read_text().splitlines()]
    saved = [json.loads(x) for x in (run / "checkpoints.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and saved and calls[1]["start_step"] >= saved[0]["step"] > 0, (calls, saved)
    err = Path(SlurmState.for_name(workdir["results"], "signal").runs["sig"]["stderr"]).read_text()
    assert "Caught signal SIGUSR2" in err and "this job is preempted" in err
