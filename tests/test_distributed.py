"""Multi-process runs with real processes (gloo on CPU): every stage joins one
torch.distributed group, only rank 0 writes, replicas stay equal, and evaluation equals a
one-process evaluation. CI has no GPU; NCCL takes the same code path on a GPU machine."""
from __future__ import annotations

import json

import pytest

from benchmark.experiments.config import evaluate_config, finetune_config, pretrain_config
from benchmark.runs.job import Job
from benchmark.experiments.plan import plan_table
from benchmark.runner import run_job
from slurm.local import run_plan_local, run_processes
from benchmark.runs.store import RunStore
from benchmark.runs.identity import run_key


def _job(stage, cfg, parents=()):
    key = run_key(cfg)
    return Job(stage, key, {**cfg, "label": f"test/{stage}"}, tuple(parents), f"test/{stage}")


def _pretrain(method, **over):
    return _job("pretrain", pretrain_config(method, scale="micro", seed=0, epochs=200, **over))


def test_two_process_moco_v2_pretrain_trains_as_one(isolated):
    job = _pretrain("moco_v2", method_overrides={"bn_groups": 2})   # one BN group per process
    store = RunStore(isolated / "runs")
    assert run_processes(job, str(store.root), nproc=2) == ("done", None)
    d = store.run_dir(job.key)
    env = json.loads((d / "env.json").read_text())
    assert env["distributed"] == {"world_size": 2, "backend": "gloo"}
    m = store.metrics(job.key)
    assert env["nodes"] == 1 and env["batch"] == {"global": m["batch"], "per_process": m["batch"] // 2}
    assert m["world_size"] == 2 and m["replicas_in_sync"] is True
    # the recipe's batch is the global one, split over the processes; the lr follows it alone
    one = pretrain_config("moco_v2", scale="micro", seed=0, epochs=200)["recipe"]
    assert m["batch"] == one["batch_size"] == 2 * m["batch_per_process"]
    assert m["lr"] == pytest.approx(one["base_lr"] * one["batch_size"] / one["lr_batch"])
    assert m["samples_seen"] == m["steps"] * one["batch_size"]
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("metrics")) == ["metrics.json"]
    assert (d / "weights.pt").exists() and not list(d.glob("*.tmp*"))
    lines = (d / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == sorted({json.loads(x)["step"] for x in lines})   # one writer


@pytest.mark.slow
def test_two_process_finetune_and_evaluate_equal_one_process_evaluation(isolated):
    store = RunStore(isolated / "runs")
    ft = _job("finetune", finetune_config(scale="micro", seed=0, schedule="1x", parent=None))
    assert run_processes(ft, str(store.root), nproc=2) == ("done", None)
    assert json.loads((store.run_dir(ft.key) / "env.json").read_text())["distributed"]["world_size"] == 2
    ev = _job("evaluate", evaluate_config(parent=ft.key, data=ft.config["data"], scale="micro"), (ft.key,))
    assert run_processes(ev, str(store.root), nproc=2) == ("done", None)
    two = store.metrics(ev.key)
    # the same model evaluated by one process, in another store
    alone = RunStore(isolated / "alone")
    src, dst = store.run_dir(ft.key), alone.run_dir(ft.key)
    dst.mkdir(parents=True)
    for f in ("config.json", "metrics.json", "model_final.pt"):
        (dst / f).write_bytes((src / f).read_bytes())
    one = run_job(ev, str(alone.root), progress=False)
    strip = lambda m: json.dumps({k: v for k, v in m.items() if k not in ("wall_s", "finished", "eval_s")},
                                 sort_keys=True)   # NaN (no large objects) compares equal as text
    assert strip(two) == strip(one)


@pytest.mark.slow
def test_submitit_local_runs_a_table_with_two_tasks_per_run(isolated, tmp_path):
    import yaml
    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "dist_smoke", "title": "t", "source": "t", "reference": None,
        "columns": [{"label": "1x APbb", "schedule": "1x", "metric": "bbox.AP"}],
        "rows": [{"label": "MoCo v2", "method": "moco_v2", "pretrain_epochs": 200,
                  "method_overrides": {"bn_groups": 2}}]}))
    plan = plan_table(str(spec), scale="micro")
    status = run_plan_local(plan, str(isolated / "runs"), executor="submitit-local", nproc=2)
    assert set(status.values()) == {"done"}, status
    store = RunStore(isolated / "runs")
    for j in plan.jobs:
        assert json.loads((store.run_dir(j.key) / "env.json").read_text())["distributed"]["world_size"] == 2
    assert store.metrics(plan.jobs[0].key)["replicas_in_sync"] is True
