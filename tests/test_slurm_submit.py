"""slurm.submit without a cluster: decisions, ordering, chunking, snapshots, checkpoint hook."""
import contextlib
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass

import pytest
import submitit

import slurm.submit as sub
from slurm.profile import load_profile
from slurm.state import SlurmState
from benchmark.engine.signals import Requests


@dataclass(frozen=True)
class J:
    stage: str
    key: str
    config: dict
    parents: tuple
    label: str


class Store:
    def __init__(self, statuses):
        self.statuses = statuses

    def status(self, key):
        return self.statuses.get(key, "missing")


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path):
    """Records batches instead of calling sbatch; Slurm states come from ``queue``."""
    calls = {"chunks": [], "cancelled": [], "queue": {}}
    counter = iter(range(100, 10_000))

    def sbatch(submission, batch):
        base = next(counter)
        calls["chunks"].append({"stage": batch.stage, "deps": batch.after, "keys": [j.key for j in batch.jobs],
                                "setup": list(submission.setup)})
        return [types.SimpleNamespace(job_id=f"{base}_{i}", paths=types.SimpleNamespace(
            stdout=f"/logs/{base}_{i}.out", stderr=f"/logs/{base}_{i}.err")) for i in range(len(batch.jobs))]

    monkeypatch.setattr(sub, "_sbatch", sbatch)
    monkeypatch.setattr(sub, "slurm_job_states", lambda ids: {i: calls["queue"][i] for i in ids if i in calls["queue"]})
    monkeypatch.setattr(sub, "cancel", lambda ids: calls["cancelled"].extend(ids))
    monkeypatch.setattr(sub, "snapshot_code", lambda repo, root: sub.Snapshot(tmp_path / "snap", "id", None, True, 0))
    return calls


def _submit(jobs, tmp_path, statuses=None, **over):
    return sub.submit_jobs(jobs, name="t", results_dir=tmp_path / "res", store_root=tmp_path / "store",
                           profile=load_profile("local-ci", {"max_array_size": 4, **over}),
                           store=Store(statuses or {}), fn=lambda *a, **k: None)


def _table():
    pre = [J("pretrain", f"p{i}", {}, (), f"pre{i}") for i in range(2)]
    ft = [J("finetune", f"f{i}{k}", {}, (f"p{i}",), f"ft{i}{k}") for i in range(2) for k in range(5)]
    ev = [J("evaluate", f"e{f.key}", {}, (f.key,), f"ev{f.key}") for f in ft]
    return ev + ft + pre  # deliberately not in order


def test_table_submitted_in_topological_order_with_chunks(fake_slurm, tmp_path):
    s = _submit(_table(), tmp_path)
    chunks = fake_slurm["chunks"]
    assert chunks[0] == {**chunks[0], "stage": "pretrain", "deps": (), "keys": ["p0", "p1"]}
    ft = [c for c in chunks if c["stage"] == "finetune"]
    assert [len(c["keys"]) for c in ft] == [4, 1, 4, 1]  # 5 per pretrain, MaxArraySize 4
    assert ft[0]["deps"] == ("100_0",) and ft[2]["deps"] == ("100_1",)
    stages = [c["stage"] for c in chunks]
    assert stages.index("evaluate") > max(i for i, st in enumerate(stages) if st == "finetune")
    assert len(s.submitted) == 22 and not s.skipped
    assert any("PYTHONPATH" in line for line in chunks[0]["setup"])
    assert len(SlurmState.for_name(tmp_path / "res", "t").runs) == 22


def _f01_entry(runs, tmp_path):
    """The state entry of the fake grid's finetune f01 (array 101, task 1, after p0)."""
    return {
        "stage": "finetune", "label": "ft01", "job_id": "101_1", "array_job_id": "101", "array_task_id": 1,
        "submitted_at": runs["f01"]["submitted_at"], "stdout": "/logs/101_1.out", "stderr": "/logs/101_1.err",
        "parents": ["p0"], "dependency": "afterok:100_0", "profile": "local-ci",
        "snapshot": {"path": str(tmp_path / "snap"), "id": "id", "sha": None, "dirty": True}, "cancelled": False,
        "history": []}


def test_state_entries_and_summary_of_a_submission(fake_slurm, tmp_path):
    s = _submit(_table(), tmp_path)
    runs = SlurmState.for_name(tmp_path / "res", "t").runs
    assert runs["f01"] == _f01_entry(runs, tmp_path)
    assert runs["p1"]["dependency"] is None and runs["p1"]["array_task_id"] == 1
    assert s.arrays[:3] == [{"stage": "pretrain", "array_job_id": "100", "size": 2, "dependency": None},
                            {"stage": "finetune", "array_job_id": "101", "size": 4, "dependency": "afterok:100_0"},
                            {"stage": "finetune", "array_job_id": "102", "size": 1, "dependency": "afterok:100_0"}]
    assert s.submitted[2] == {"key": "f00", "label": "ft00", "stage": "finetune", "job_id": "101_0",
                              "dependency": "afterok:100_0"}
    (sub_,) = SlurmState.for_name(tmp_path / "res", "t").load()["submissions"]
    assert (sub_["submitted"], sub_["skipped"], sub_["snapshot"]["id"]) == (22, 0, "id")


def test_sbatch_parameters_of_a_batch(monkeypatch, tmp_path):
    """One batch is one submitit executor: the stage's profile, the dependency, the setup lines."""
    made = []

    class Executor:
        def __init__(self, folder, cluster):
            made.append({"folder": folder, "cluster": cluster, "submitted": []})

        def update_parameters(self, **kw):
            made[-1]["params"] = kw

        def batch(self):
            return contextlib.nullcontext()

        def submit(self, fn, job):
            made[-1]["submitted"].append((fn, job.key))
            return None

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    prof = load_profile("local-ci", {"extra_sbatch": {"exclusive": True},
                                     "stage_overrides": {"evaluate": {"cpus_per_task": 3}}})
    stage_job = sub.StageJob("/store")
    submission = sub._Submission(name="t", profile=prof, log_folder=tmp_path, setup=("cd /snap",),
                                 snapshot=sub.Snapshot(tmp_path, "id", None, True, 0), stage_job=stage_job)
    jobs = (J("evaluate", "e1", {}, ("f",), "e1"), J("evaluate", "e2", {}, ("f",), "e2"))
    assert len(sub._sbatch(submission, sub._Batch("evaluate", jobs, ("7_0", "8")))) == 2
    (ex,) = made
    assert ex["folder"] == tmp_path / "%j" and ex["cluster"] == "slurm"
    assert ex["submitted"] == [(stage_job, "e1"), (stage_job, "e2")]
    p = ex["params"]
    assert p["name"] == "detbench-t-evaluate" and p["slurm_setup"] == ["cd /snap"] and p["cpus_per_task"] == 3
    assert p["slurm_additional_parameters"] == {"exclusive": True, "dependency": "afterok:7_0:8",
                                                "kill-on-invalid-dep": "no"}
    sub._sbatch(submission, sub._Batch("pretrain", jobs[:1]))
    assert made[1]["params"]["slurm_additional_parameters"] == {"exclusive": True}
    assert made[1]["params"]["cpus_per_task"] == 1


def test_done_queued_failed_and_stuck(fake_slurm, tmp_path):
    _submit(_table(), tmp_path)
    ids = {k: e["job_id"] for k, e in SlurmState.for_name(tmp_path / "res", "t").runs.items()}
    fake_slurm["chunks"].clear()
    # p0 done, p1 failed; p0's children running/pending; p1's children stuck
    q = fake_slurm["queue"]
    q[ids["p0"]] = {"state": "COMPLETED", "reason": ""}
    q[ids["p1"]] = {"state": "FAILED", "reason": ""}
    for k, i in ids.items():
        if k.startswith(("f0", "ef0")):
            q[i] = {"state": "RUNNING" if k.startswith("f0") else "PENDING", "reason": "Dependency"}
        elif k.startswith(("f1", "ef1")):
            q[i] = {"state": "PENDING", "reason": "DependencyNeverSatisfied"}
    s = _submit(_table(), tmp_path, {"p0": "done", "p1": "failed"})
    submitted = {x["key"] for x in s.submitted}
    assert submitted == {"p1"} | {f"f1{k}" for k in range(5)} | {f"ef1{k}" for k in range(5)}
    assert {x["reason"] for x in s.skipped} == {"done", "already running", "already pending"}
    assert sorted(s.cancelled) == sorted(ids[k] for k in ids if k.startswith(("f1", "ef1")))
    runs = SlurmState.for_name(tmp_path / "res", "t").runs
    assert runs["p1"]["history"][0]["job_id"] == ids["p1"]
    # nothing left to do
    for k, e in runs.items():
        q[e["job_id"]] = {"state": "PENDING", "reason": "Dependency"}
    again = _submit(_table(), tmp_path, {"p0": "done"})
    assert again.submitted == [] and again.cancelled == []


def test_diverged_blocks_children_and_plan_errors(fake_slurm, tmp_path):
    s = _submit(_table(), tmp_path, {"p0": "diverged"})
    reasons = {x["key"]: x["reason"] for x in s.skipped}
    assert reasons["p0"] == "diverged" and reasons["ef04"].startswith("blocked")
    with pytest.raises(ValueError, match="neither in the plan nor done"):
        _submit([J("finetune", "f", {}, ("zz",), "orphan")], tmp_path)
    with pytest.raises(ValueError, match="cycle"):
        _submit([J("pretrain", "a", {}, ("b",), "A"), J("pretrain", "b", {}, ("a",), "B")], tmp_path)
    with pytest.raises(ValueError, match="twice"):
        _submit([J("pretrain", "a", {}, (), "A"), J("pretrain", "a", {}, (), "A2")], tmp_path)
    # a parent already done in the store needs no job and no dependency
    fake_slurm["chunks"].clear()
    _submit([J("finetune", "x", {}, ("done-parent",), "x")], tmp_path, {"done-parent": "done"})
    assert fake_slurm["chunks"][0]["deps"] == ()


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_snapshot_copies_tree_once_and_tracks_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("X = 1\n")
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / "ignored.txt").write_text("no")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "big").write_text("no")
    _git(repo, "init", "-q")
    _git(repo, "add", "pkg", ".gitignore")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
    a = sub.snapshot_code(repo, tmp_path / "snaps")
    assert a.sha and not a.dirty and (a.path / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert not (a.path / "ignored.txt").exists() and not (a.path / ".venv").exists()
    assert sub.snapshot_code(repo, tmp_path / "snaps") == a  # reused
    (repo / "pkg" / "mod.py").write_text("X = 2\n")
    (repo / "new.py").write_text("")  # untracked, not ignored: copied
    b = sub.snapshot_code(repo, tmp_path / "snaps")
    assert b.dirty and b.sha == a.sha and b.id != a.id
    assert (b.path / "pkg" / "mod.py").read_text() == "X = 2\n" and (b.path / "new.py").exists()
    assert (a.path / "pkg" / "mod.py").read_text() == "X = 1\n"  # old snapshot untouched


def test_stagejob_runs_with_resume_and_checkpoint_waits_for_save(monkeypatch):
    seen = []
    job = J("pretrain", "k", {}, (), "l")
    sj = sub.StageJob("/store", fn=lambda j, root, resume: seen.append((j, root, resume)) or "ok")
    assert sj(job) == "ok" and seen == [(job, "/store", True)]

    def boom(j, root, resume):
        raise KeyError("x")

    with pytest.raises(KeyError):
        sub.StageJob("/s", fn=boom)(job)

    requests = Requests()   # a loop that saves 0.3 s after being asked

    def request_checkpoint():
        requests.checkpoint = True
        threading.Timer(0.3, lambda: setattr(requests, "checkpoint", False)).start()

    requests.request_checkpoint = request_checkpoint
    monkeypatch.setattr(sub, "REQUESTS", requests)
    t0 = time.monotonic()
    delayed = sj.checkpoint(job)
    assert 0.25 < time.monotonic() - t0 < 5
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is sj and delayed.args == (job,)


def test_aligndet_chain_waits_on_its_image_domain_parent(fake_slurm, tmp_path):
    """A pretraining run with a pretraining parent (AlignDet over MoCo v2) is submitted after
    it, with ``afterok`` on the parent's job."""
    from benchmark.experiments.plan import plan_table
    plan = plan_table("aligndet_gains", scale="tiny")
    s = _submit(plan.jobs, tmp_path)
    ids = {e["key"]: e for e in s.submitted}
    boxes = [j for j in plan.jobs if j.stage == "pretrain" and j.parents]
    assert len(boxes) == 4     # FCOS, RetinaNet, the R-CNNs (one shared run), DETR
    for j in boxes:
        (parent,) = j.parents
        assert ids[parent]["job_id"] in ids[j.key]["dependency"]


def test_a_failed_sbatch_half_way_keeps_what_went_out_in_the_state_file(fake_slurm, monkeypatch, tmp_path):
    """sbatch fails on the evaluate arrays after the pretrain and finetune arrays went out: the
    error propagates and the state file holds exactly the jobs that were submitted (written on
    the way out, not by the periodic write, which never comes due here)."""
    monkeypatch.setattr(sub, "RECORD_EVERY_S", 3600)
    recording = sub._sbatch  # the fixture's fake

    def sbatch(submission, batch):
        if batch.stage == "evaluate":
            raise sub.SlurmUnavailable("sbatch: error: Batch job submission failed")
        return recording(submission, batch)

    monkeypatch.setattr(sub, "_sbatch", sbatch)
    with pytest.raises(sub.SlurmUnavailable, match="submission failed"):
        _submit(_table(), tmp_path)
    assert [(c["stage"], c["keys"]) for c in fake_slurm["chunks"]] == [
        ("pretrain", ["p0", "p1"]), ("finetune", ["f00", "f01", "f02", "f03"]), ("finetune", ["f04"]),
        ("finetune", ["f10", "f11", "f12", "f13"]), ("finetune", ["f14"])]
    data = SlurmState.for_name(tmp_path / "res", "t").load()
    assert data["submissions"] == []  # the submission did not finish
    runs = data["runs"]
    assert {k: (e["stage"], e["job_id"], e["dependency"]) for k, e in runs.items()} == {
        "p0": ("pretrain", "100_0", None), "p1": ("pretrain", "100_1", None),
        "f00": ("finetune", "101_0", "afterok:100_0"), "f01": ("finetune", "101_1", "afterok:100_0"),
        "f02": ("finetune", "101_2", "afterok:100_0"), "f03": ("finetune", "101_3", "afterok:100_0"),
        "f04": ("finetune", "102_0", "afterok:100_0"),
        "f10": ("finetune", "103_0", "afterok:100_1"), "f11": ("finetune", "103_1", "afterok:100_1"),
        "f12": ("finetune", "103_2", "afterok:100_1"), "f13": ("finetune", "103_3", "afterok:100_1"),
        "f14": ("finetune", "104_0", "afterok:100_1")}
    assert runs["f01"] == _f01_entry(runs, tmp_path)
