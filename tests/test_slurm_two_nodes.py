"""One pretraining run across two real Slurm nodes (slurm/cluster/start2.sh), at ``micro`` scale.

    make test-slurm                      # starts both test clusters, runs `pytest -m slurm`, stops them
    slurm/cluster/start2.sh && pytest -m slurm tests/test_slurm_two_nodes.py && slurm/cluster/stop2.sh

The cluster's nodes n1 and n2 are two slurmd in their own network + UTS namespaces on one
machine (slurm/cluster/nodes.sh), so the job's two processes reach each other only over the
namespaces' veths, as on two machines. The job goes out through the project's own path
(``slurm.submit.submit_jobs`` with the profile ``local-ci-two-nodes``: 2 nodes x 1 task), and
the job wrapper (``StageJob``) sets up torch.distributed (gloo) from Slurm's variables.

* the run's env.json records world size 2, gloo, and one process on each node (``hosts``);
* its final weights equal those of the same config run in one process (``run_job`` in another
  store), within ``ATOL``: the two-process run trains at the same global batch.

Skips with a reason when the two-node cluster does not answer; ``DETBENCH_START_SLURM=1``
(as root) lets the fixture start it, and stop it afterwards. ``SLURM2_BASE``: its
state directory (default /tmp/detbench-slurm2). Timings go to stdout (``-s``).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from benchmark.experiments.config import pretrain_config
from benchmark.runs.identity import run_key
from benchmark.runs.job import Job
from benchmark.runs.store import RunStore
from slurm.orchestrate import job_environment
from slurm.profile import load_profile
from slurm.submit import submit_jobs
from tests.conftest import connect_slurm_or_skip, wait_for_slurm_jobs

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("SLURM2_BASE", "/tmp/detbench-slurm2"))
# a method whose result must not depend on how the global batch is split over processes
# (no per-process BatchNorm, unlike MoCo v2's Shuffle-BN); change here if another is proven so
METHOD = "pixpro"
EPOCHS = 200          # micro: 4 steps
ATOL = 5e-3           # max |w_two_nodes - w_one_process| over every weight (docs/distributed.md: float tolerance)


def _cluster_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    return sorted(set(out.stdout.split()))


@pytest.fixture(scope="module")
def two_nodes():
    """SLURM_CONF of the two-node cluster while this module runs (the single-node cluster's,
    which other modules put in os.environ, is restored afterwards)."""
    saved = os.environ.get("SLURM_CONF")
    started = False
    env = {**os.environ, "SLURM2_BASE": str(BASE)}
    try:
        if os.environ.get("DETBENCH_START_SLURM") == "1" and os.geteuid() == 0:
            up = subprocess.run(["sinfo", "-h"], capture_output=True, env={**env, "SLURM_CONF": str(BASE / "etc/slurm.conf")})
            if up.returncode != 0 or not up.stdout.strip():
                t0 = time.monotonic()
                started = True   # (stopped below even if it came up only in part)
                out = subprocess.run([str(REPO / "slurm/cluster/start2.sh")], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    pytest.fail(f"slurm/cluster/start2.sh failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
                print(f"\n[two-nodes] started the cluster in {time.monotonic() - t0:.1f}s")
        connect_slurm_or_skip(BASE)
        nodes = _cluster_nodes()
        if len(nodes) < 2:
            pytest.skip(f"the cluster of {BASE} has {len(nodes)} node(s), not 2: start it with slurm/cluster/start2.sh")
        yield {"nodes": nodes}
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if started:
            subprocess.run([str(REPO / "slurm/cluster/stop2.sh")], env=env, capture_output=True)


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tmp_path_factory):
    """The micro pretraining submitted as one Slurm job of 2 nodes x 1 task, waited for."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    saved = {k: os.environ.get(k) for k in ("DETBENCH_RUNS", "DETBENCH_CACHE", "DETBENCH_RESULTS")}
    os.environ.update(DETBENCH_RUNS=str(tmp / "runs"), DETBENCH_CACHE=str(tmp / "cache"),
                      DETBENCH_RESULTS=str(tmp / "results"))
    try:
        cfg = pretrain_config(METHOD, scale="micro", seed=0, epochs=EPOCHS)
        label = f"two-nodes/{METHOD}"
        job = Job("pretrain", run_key(cfg), {**cfg, "label": label}, (), label)
        from benchmark.data.resolve import resolve_data
        resolve_data(cfg["data"])   # made once here: the two processes never race to create it
        store = RunStore(tmp / "runs")
        profile = load_profile("local-ci-two-nodes", {"snapshot_dir": str(tmp / "snapshots")})
        t0 = time.monotonic()
        summary = submit_jobs([job], name="two_nodes", results_dir=tmp / "results", store_root=store.root,
                              profile=profile, env=job_environment(store.root, tmp / "results"))
        job_id = summary.job_ids[job.key]
        states = wait_for_slurm_jobs([job_id], timeout_s=300, poll_s=1)
        wall = time.monotonic() - t0
        print(f"\n[two-nodes] job {job_id} {states[job_id]['state']} after {wall:.1f}s")
        yield {"job": job, "store": store, "job_id": job_id, "state": states[job_id]["state"], "tmp": tmp,
               "nodes": two_nodes["nodes"]}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _job_logs(run) -> str:
    """The job's stdout/stderr (submitit's files) for a failure message."""
    from slurm.state import SlurmState
    out = []
    for e in SlurmState.for_name(run["tmp"] / "results", "two_nodes").runs.values():
        for key in ("stdout", "stderr"):
            for p in sorted(Path(e[key]).parent.glob("*")) if e.get(key) else ():
                if p.is_file() and p.suffix in (".out", ".err"):
                    out.append(f"--- {p.name}\n{p.read_text()[-3000:]}")
    return "\n".join(out)


def test_one_pretraining_runs_as_one_process_on_each_of_two_nodes(two_node_run):
    run = two_node_run
    job, store = run["job"], run["store"]
    assert run["state"] == "COMPLETED", _job_logs(run)
    assert store.status(job.key) == "done"
    env = json.loads((store.run_dir(job.key) / "env.json").read_text())
    print("[two-nodes] env.json:", json.dumps({k: env[k] for k in ("distributed", "hosts", "slurm")}))
    assert env["distributed"] == {"world_size": 2, "backend": "gloo"}
    # rank 0 on the job's first node, rank 1 on the other: two nodes, one process each
    assert env["hosts"] == run["nodes"][:2], env["hosts"]
    assert env["hardware"]["host"] == env["hosts"][0]
    assert run["job_id"].split("_")[0] in (env["slurm"].get("SLURM_ARRAY_JOB_ID"), env["slurm"]["SLURM_JOB_ID"])
    m = store.metrics(job.key)
    assert m["world_size"] == 2 and m["replicas_in_sync"] is True


def test_two_node_weights_equal_the_one_process_run(two_node_run):
    run = two_node_run
    job, store = run["job"], run["store"]
    assert run["state"] == "COMPLETED", _job_logs(run)
    from benchmark.runner import run_job
    from methods.weights import read_state_dict

    t0 = time.monotonic()
    one_store = RunStore(run["tmp"] / "one-process")
    one = run_job(job, str(one_store.root), progress=False)
    t_one = time.monotonic() - t0
    two = store.metrics(job.key)
    w2 = read_state_dict(store.run_dir(job.key) / "weights.pt")
    w1 = read_state_dict(one_store.run_dir(job.key) / "weights.pt")
    assert w2.keys() == w1.keys()
    diffs = {k: (w2[k].double() - w1[k].double()).abs().max().item() for k in w1 if w1[k].numel()}
    worst = max(diffs, key=diffs.get)
    print(f"[two-nodes] one-process run {t_one:.1f}s; max |diff| {diffs[worst]:.3g} ({worst}); "
          f"batch {two.get('batch')} (2 x {two.get('batch_per_process')}) vs {one.get('batch')}")
    assert diffs[worst] <= ATOL, (
        f"two nodes vs one process: max |diff| {diffs[worst]:.3g} at {worst} (> {ATOL}); "
        f"global batch {two.get('batch')} = 2 x {two.get('batch_per_process')} vs {one.get('batch')}, "
        f"lr {two.get('lr')} vs {one.get('lr')}")
