"""The harness on a real Slurm cluster, end to end, at the ``micro`` scale.

    make test-slurm        # starts slurm/cluster/start.sh, runs `pytest -m slurm`, stops it

* a table (tests/specs/micro_smoke.yaml: Scratch and MoCo v2, 1x APbb) goes
  submit_plan → jobs → collect, and a second submission submits nothing;
* a fine-tune preempted through partition ``high`` is requeued, resumes from its last
  checkpoint and ends bit-identical to the same run done uninterrupted with ``run_job``;
* ``cancel`` scancels a table's live jobs and marks them in the state file.

Every test skips with a reason when no cluster answers.  Timings go to stdout (``-s``).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from benchmark.experiments.plan import plan_table
from benchmark.runs.store import RunStore
from slurm import orchestrate as orch
from slurm.state import SlurmState
from slurm.submit import slurm_job_states
from tests.conftest import connect_slurm_or_skip, wait_for, wait_for_slurm_jobs

wait_until = functools.partial(wait_for, every=0.5)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"
SMOKE = str(SPECS / "micro_smoke.yaml")
PREEMPT = str(SPECS / "micro_preempt.yaml")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF from $SLURM_BASE/env.sh; skips when no cluster answers."""
    base = Path(os.environ.get("SLURM_BASE", "/tmp/detbench-slurm"))
    sinfo = connect_slurm_or_skip(base)
    shared = tmp_path_factory.mktemp("slurm-e2e")
    # one dataset cache and one code snapshot for the whole module; the synthetic data is
    # generated here once, so that concurrent jobs never race to create it
    from benchmark.data.resolve import resolve_data

    saved = os.environ.get("DETBENCH_CACHE")
    os.environ["DETBENCH_CACHE"] = str(shared / "cache")
    try:
        for spec in (SMOKE, PREEMPT):
            for data in {json.dumps(j.config["data"], sort_keys=True) for j in plan_table(spec, scale="micro").jobs}:
                resolve_data(json.loads(data))
    finally:
        if saved is None:
            os.environ.pop("DETBENCH_CACHE")
        else:
            os.environ["DETBENCH_CACHE"] = saved
    return {"cpus": int(sinfo.split()[1].rstrip("+")), "snapshots": shared / "snapshots",
            "cache": shared / "cache"}


@pytest.fixture
def ws(cluster, tmp_path, monkeypatch):
    """A private run store and results folder; cancels whatever the test left queued."""
    monkeypatch.setenv("DETBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DETBENCH_CACHE", str(cluster["cache"]))
    ws = {"results": tmp_path / "results", "store": RunStore(tmp_path / "runs"), "tmp": tmp_path,
          "profile": {"mem_gb": 1, "snapshot_dir": str(cluster["snapshots"])}}
    yield ws
    for state in (tmp_path / "results" / "slurm").glob("*.json"):
        try:
            orch.cancel_table(tmp_path / "results", state.stem)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def _ns(name=None, runs=None):
    return argparse.Namespace(name=name, runs=runs)


def _numbers(metrics: dict) -> dict:
    """metrics.json without what depends on the clock."""
    return {k: v for k, v in metrics.items() if k not in ("wall_s", "finished")}


# ---------------------------------------------------------------- (a) a table end to end
def test_table_submit_collect_and_resubmit_nothing(ws, capsys):
    t0 = time.monotonic()
    plan = plan_table(SMOKE, scale="micro")
    store = ws["store"]
    summary = orch.submit_plan(plan, store, profile="local-ci", overrides=ws["profile"])
    t_submit = time.monotonic() - t0
    assert len(summary.submitted) == len(plan.jobs) == 5
    out = capsys.readouterr().out
    assert all(s["job_id"] in out for s in summary.submitted)  # prints what it submitted

    # the state file records how to rebuild the plan
    rec = SlurmState.for_name(ws["results"], "micro_smoke").load()["plan"]
    assert rec["spec"] == SMOKE and rec["scale"] == "micro" and rec["seeds"] == [0] and rec["overrides"] == {}
    assert rec["store_root"] == str(store.root.resolve())

    # while queued: submitting again submits nothing
    again = orch.submit_plan(plan, store, profile="local-ci", overrides=ws["profile"], quiet=True)
    assert again.submitted == [] and all(s["reason"].startswith("already") or s["reason"] == "done"
                                         for s in again.skipped)

    states = wait_for_slurm_jobs(summary.job_ids.values(), timeout_s=240, poll_s=1)
    t_jobs = time.monotonic() - t0
    assert {s["state"] for s in states.values()} == {"COMPLETED"}, orch.format_status(
        orch.table_status(ws["results"], "micro_smoke"))
    assert all(store.status(j.key) == "done" for j in plan.jobs)
    # the jobs ran in the snapshot with absolute DETBENCH_* paths: nothing landed in the snapshot
    snap = Path(summary.snapshot.path)
    assert not (snap / "results").exists() and not (snap / ".cache").exists()
    env = json.loads((store.run_dir(plan.jobs[0].key) / "env.json").read_text())
    assert env["slurm"]["SLURM_JOB_ID"] and env["git"]["snapshot"] is True

    capsys.readouterr()
    assert orch.cli_status(_ns("micro_smoke")) == 0
    status_out = capsys.readouterr().out
    assert "5 done" in status_out and "0 failed" in status_out, status_out

    # collect from "another shell": only the state file and the run store are used
    assert orch.cli_collect(_ns()) == 0
    assert "micro_smoke: 2/2 cells filled" in capsys.readouterr().out
    table = ws["results"] / "tables" / "micro_smoke@micro"
    rows = list(csv.DictReader(io.StringIO((table / "table.csv").read_text())))
    assert len(rows) == 2 and all(r["status"] == "done" and r["ours_mean"] for r in rows), rows
    assert "Scratch" in (table / "table.md").read_text()

    done = orch.submit_plan(plan, store, profile="local-ci", overrides=ws["profile"], quiet=True)
    assert done.submitted == [] and {s["reason"] for s in done.skipped} == {"done"}
    print(f"\n[e2e] micro_smoke: submit {t_submit:.1f}s, 5 jobs done after {t_jobs:.1f}s, "
          f"total {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------- (b) preemption → bit-exact resume
def test_preempted_finetune_resumes_bit_identical_to_uninterrupted_run(ws, cluster, tmp_path):
    plan = plan_table(PREEMPT, scale="micro")
    ft = next(j for j in plan.jobs if j.stage == "finetune")
    store = ws["store"]
    t0 = time.monotonic()
    summary = orch.submit_plan(plan, store, profile="local-ci", overrides=ws["profile"], quiet=True)
    job_id = summary.job_ids[ft.key]
    run = store.run_dir(ft.key)

    def logged_steps():   # the training records (a resumed run also logs {"event": "resumed"})
        log = run / "log.jsonl"
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        return [r for r in recs if "event" not in r]

    # preempt once a checkpoint (every 2 steps) is on disk and training is still going
    wait_until(lambda: (run / "checkpoint.pt").exists(), 120,
               "the fine-tune to save its first checkpoint")
    t_first_ckpt = time.monotonic() - t0
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(cluster["cpus"]), "--mem=100M",
                           "-o", "/dev/null", "--wrap", "sleep 1"], capture_output=True, text=True, check=True)
    high_id = high.stdout.strip().split(";")[0]
    t_preempt = time.monotonic() - t0
    # requeued and pending again: the first process is gone (SIGTERM, then SIGKILL after KillWait)
    wait_until(lambda: slurm_job_states([job_id]).get(job_id, {}).get("state") in ("PENDING", "REQUEUED")
               and orch.requeue_counts([job_id]), 60, "the fine-tune to be preempted and requeued")
    assert store.status(ft.key) != "done", "the fine-tune finished before it was killed: make it longer"
    import torch

    ckpt_step = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
    before = [r for r in logged_steps() if r["step"] <= ckpt_step]
    assert 0 < ckpt_step < ft.config["recipe"]["steps"]

    # meanwhile (the requeued job waits ~cred_expire before it starts again): the same run,
    # uninterrupted, in another store
    t_ref = time.monotonic()
    ref_store = RunStore(tmp_path / "reference")
    from benchmark.runner import run_job

    reference = run_job(ft, str(ref_store.root), progress=False)
    t_ref = time.monotonic() - t_ref

    wait_until(lambda: store.status(ft.key) == "done", 180, "the requeued fine-tune to finish")
    t_resumed = time.monotonic() - t0
    states = wait_for_slurm_jobs([job_id, summary.job_ids[plan.jobs[-1].key], high_id], timeout_s=120, poll_s=1)
    t_all = time.monotonic() - t0
    assert states[job_id]["state"] == "COMPLETED" and states[high_id]["state"] == "COMPLETED"

    # it was requeued and resumed from the checkpoint, not restarted from scratch
    env = json.loads((run / "env.json").read_text())
    assert env["slurm"].get("SLURM_RESTART_COUNT") == "1", env["slurm"]
    assert orch.requeue_counts([job_id]) == {job_id: 1}
    after = logged_steps()
    assert [r["step"] for r in after] == list(range(1, ft.config["recipe"]["steps"] + 1))
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"event"' in x]
    assert [(e["event"], e["step"]) for e in events] == [("resumed", ckpt_step)]   # says where it resumed
    assert after[:len(before)] == before  # the records up to the checkpoint are the first process's
    st = orch.table_status(ws["results"], "micro_preempt")
    assert st["requeued_runs"] == 1 and st["counts"]["done"] == 2

    # identical to the uninterrupted run: metrics and final weights, bit for bit
    resumed = store.metrics(ft.key)
    assert _numbers(resumed) == _numbers(reference)
    assert resumed["checkpoint_sha256"] == reference["checkpoint_sha256"]  # full training state at the end
    a = torch.load(run / "model_final.pt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(ref_store.run_dir(ft.key) / "model_final.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the evaluation downstream of the resumed run went through
    assert store.status(plan.jobs[-1].key) == "done"
    print(f"\n[e2e] preemption: first checkpoint {t_first_ckpt:.1f}s, high job at {t_preempt:.1f}s "
          f"(checkpoint step {ckpt_step}/{ft.config['recipe']['steps']}), resumed run done at {t_resumed:.1f}s, "
          f"evaluation done at {t_all:.1f}s; uninterrupted reference run_job {t_ref:.1f}s")


# ---------------------------------------------------------------- (c) cancel
def test_cancel_scancels_live_jobs_and_marks_them(ws, capsys):
    plan = plan_table(SMOKE, scale="micro")
    summary = orch.submit_plan(plan, ws["store"], profile="local-ci", overrides=ws["profile"], quiet=True)
    ids = set(summary.job_ids.values())
    assert len(ids) == 5
    capsys.readouterr()
    assert orch.cli_cancel(_ns("micro_smoke")) == 0
    assert "micro_smoke: cancelled 5 job(s)" in capsys.readouterr().out
    states = wait_for_slurm_jobs(ids, timeout_s=60, poll_s=0.5)
    assert {s["state"] for s in states.values()} == {"CANCELLED"}, states
    runs = SlurmState.for_name(ws["results"], "micro_smoke").runs
    assert all(runs[k]["cancelled"] and runs[k]["cancelled_at"] for k in summary.job_ids)
    st = orch.table_status(ws["results"], "micro_smoke")
    assert st["counts"]["cancelled"] == 5, orch.format_status(st)
    # nothing live any more
    assert orch.cancel_table(ws["results"], "micro_smoke") == []
    # a cancelled table is submitted again on the next run (then cancelled by the fixture)
    again = orch.submit_plan(plan, ws["store"], profile="local-ci", overrides=ws["profile"], quiet=True)
    assert {s["key"] for s in again.submitted} == {j.key for j in plan.jobs}
    assert not set(again.job_ids.values()) & ids


# ---------------------------------------------------------------- (d) two tasks per job: torch.distributed
def test_table_with_two_tasks_per_job_trains_as_one_distributed_run(ws, capsys):
    """Each job runs 2 Slurm tasks; the job wrapper exports torchrun's variables from Slurm's
    (submitit), every stage joins one gloo group, rank 0 alone writes."""
    plan = plan_table(SMOKE, scale="micro")
    store = ws["store"]
    summary = orch.submit_plan(plan, store, profile="local-ci", quiet=True,
                               overrides={**ws["profile"], "tasks_per_node": 2})
    states = wait_for_slurm_jobs(summary.job_ids.values(), timeout_s=300, poll_s=1)
    assert {s["state"] for s in states.values()} == {"COMPLETED"}, orch.format_status(
        orch.table_status(ws["results"], "micro_smoke"))
    for job in plan.jobs:
        d = store.run_dir(job.key)
        env = json.loads((d / "env.json").read_text())
        assert env["distributed"] == {"world_size": 2, "backend": "gloo"}, (job.label, env.get("distributed"))
        assert store.status(job.key) == "done"
    pre = next(j for j in plan.jobs if j.stage == "pretrain")
    m = store.metrics(pre.key)
    assert m["world_size"] == 2 and m["replicas_in_sync"] is True and m["batch"] == 2 * m["batch_per_process"]
    assert m["batch"] == pre.config["recipe"]["batch_size"]   # the recipe's batch is the global one
