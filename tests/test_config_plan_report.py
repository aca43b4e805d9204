"""Scales, config validation, run identity, planning and table rendering (no training)."""
import json

import pytest

from benchmark.experiments.config import finetune_config, parse_overrides, pretrain_config
from benchmark.experiments.plan import Plan, plan_table
from benchmark.reporting.render import cell_values, render
from benchmark.runs.store import RunStore
from benchmark.runs.identity import run_key
from benchmark.experiments.tables import load_spec
from methods.config import ConfigError


def test_scale_is_overrides_not_fork():
    tiny = pretrain_config("moco_v2", scale="tiny", epochs=200)
    assert tiny["method"]["backbone"] == "resnet18"
    assert tiny["method"]["temperature"] == 0.2            # paper default survives the scale
    assert tiny["recipe"]["epochs"] == 200 and tiny["recipe"]["steps_per_epoch"] == 0.25
    from benchmark.stages.pretrain import resolve_steps
    from methods.base import PretrainRecipe
    assert resolve_steps(PretrainRecipe.from_dict(tiny["recipe"]), 1000) == (50, 0)


def test_a_scale_can_extend_another_and_keeps_its_methods_overrides(tmp_path, monkeypatch):
    long = pretrain_config("moco_v2", scale="tiny_long", epochs=200)
    tiny = pretrain_config("moco_v2", scale="tiny", epochs=200)
    # only what tiny_long overrides differs: the method's tiny overrides (ResNet-18) still apply
    assert long["method"] == tiny["method"] and long["data"] == tiny["data"]
    assert long["recipe"]["steps_per_epoch"] == 1.0 and tiny["recipe"]["steps_per_epoch"] == 0.25
    f_long = finetune_config(scale="tiny_long", schedule="2x", parent=None)
    f_tiny = finetune_config(scale="tiny", schedule="2x", parent=None)
    assert f_long["recipe"]["steps"] == 3000 and f_long["recipe"]["lr"] == f_tiny["recipe"]["lr"]
    assert f_long["detector"] == f_tiny["detector"] and run_key(f_long) != run_key(f_tiny)
    # a cycle is a clear error naming the chain
    import benchmark.experiments.config as config
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    monkeypatch.setattr(config, "SCALES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="cycle a -> b -> a"):
        config.load_scale("a")


def test_paper_batch_sizes_of_a_table_are_divided_at_small_scales():
    cfg = pretrain_config("soco", scale="tiny", recipe_overrides={"batch_size": 512})
    assert cfg["recipe"]["batch_size"] == 4                 # 512 / 128
    assert pretrain_config("soco", scale="tiny")["recipe"]["batch_size"] == 16


def test_paper_scale_needs_local_paths(monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    with pytest.raises(ConfigError, match="IMAGENET_ROOT is not set"):
        pretrain_config("moco_v2", scale="paper")
    monkeypatch.setenv("IMAGENET_ROOT", "/data/in1k")
    monkeypatch.setenv("COCO_ROOT", "/data/coco")
    cfg = pretrain_config("moco_v2", scale="paper", epochs=200)
    assert cfg["method"]["backbone"] == "resnet50" and cfg["method"]["queue_size"] == 65536
    assert cfg["data"]["pretrain"]["image_root"] == "/data/in1k/train"
    ft = finetune_config(scale="paper", schedule="1x", parent=None)
    assert ft["recipe"]["steps"] == 90000 and ft["recipe"]["lr"] == 0.02
    assert ft["detector"]["backbone"] == "resnet50"


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="scale: unknown 'huge'"):
        pretrain_config("moco_v2", scale="huge")
    with pytest.raises(KeyError, match="unknown method 'mocov3'"):
        pretrain_config("mocov3")
    with pytest.raises(ConfigError, match="recipe.lr: unknown key"):
        pretrain_config("moco_v2", recipe_overrides={"lr": 0.1})
    with pytest.raises(ValueError, match="method.temperature: expected a number"):
        pretrain_config("moco_v2", method_overrides={"temperature": "cold"})
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["method.queue_size"])
    assert parse_overrides(["method.queue_size=1024", "recipe.base_lr=0.1"]) == \
        {"method": {"queue_size": 1024}, "recipe": {"base_lr": 0.1}}


def test_run_key_identity():
    a = pretrain_config("moco_v2", seed=0, epochs=200)
    b = pretrain_config("moco_v2", seed=0, epochs=200)
    assert run_key(a) == run_key(b)
    b["runtime"] = {"num_workers": 7}                      # runtime never changes a result
    assert run_key(a) == run_key(b)
    assert run_key(a) != run_key(pretrain_config("moco_v2", seed=1, epochs=200))
    f1 = finetune_config(schedule="1x", parent="aaaa")
    f2 = finetune_config(schedule="1x", parent="bbbb")
    assert run_key(f1) != run_key(f2)                       # parent is part of the identity


def test_soco_rows_carry_their_finetune_weight_decay():
    from methods import list_methods
    if "soco" not in list_methods():
        pytest.skip("SoCo not registered")
    f = finetune_config(schedule="1x", parent="x", method="soco")
    assert f["recipe"]["weight_decay"] == 2.5e-5
    assert finetune_config(schedule="1x", parent="x", method="moco_v2")["recipe"]["weight_decay"] == 1e-4


def test_plan_table_dedups_and_orders():
    plan = plan_table("soco_table1", scale="tiny", seeds=(0, 1))
    stages = [j.stage for j in plan.jobs]
    assert stages == sorted(stages, key=["pretrain", "finetune", "evaluate"].index)
    keys = [j.key for j in plan.jobs]
    assert len(keys) == len(set(keys))
    pos = {j.key: i for i, j in enumerate(plan.jobs)}
    assert all(pos[p] < pos[j.key] for j in plan.jobs for p in j.parents)
    spec = plan.spec
    scratch = [r for r, row in enumerate(spec.rows) if row.method == "scratch"][0]
    chains = [c.chain for c in plan.cells if c.row == scratch]
    assert all(len(ch) == 2 for ch in chains)               # no pretraining for Scratch
    assert all(c.eval_key is not None for c in plan.cells)   # every row of Table 1 is implemented
    # 1x and 2x columns of one row share the pretraining run
    moco = [r for r, row in enumerate(spec.rows) if row.method == "moco_v2"][0]
    assert len({c.chain[0] for c in plan.cells if c.row == moco and c.seed == 0}) == 1


def test_plan_serialises_itself():
    from benchmark.experiments.plan import Cell
    plan = plan_table("soco_table1", scale="tiny", seeds=(0, 1))
    data = json.loads(json.dumps(plan.to_dict()))
    back = Plan.from_dict(data, plan.spec)
    assert back == plan and back.cells == plan.cells and back.seeds == (0, 1)
    assert [json.dumps(j.config, sort_keys=True) for j in back.jobs] == \
        [json.dumps(j.config, sort_keys=True) for j in plan.jobs]
    light = Plan.from_dict(plan.to_dict(configs=False), plan.spec)
    assert light == plan and all(j.config == {} for j in light.jobs)
    with pytest.raises(ValueError, match="no cell"):
        Plan.from_dict({**data, "cells": [{**data["cells"][0], "row": len(plan.spec.rows)}]}, plan.spec)
    with pytest.raises(ValueError, match="missing"):
        Cell.from_dict({**data["cells"][0], "missing": "because"})


def test_reference_values_come_from_the_papers_table():
    spec = load_spec("soco_table1")
    row = next(r for r in spec.rows if r.label == "MoCo v2")
    assert spec.reference_value(row, spec.columns[0]) == 40.4     # 1x APbb
    assert spec.reference_value(row, spec.columns[3]) == 37.6     # 2x APmk


def _fake_finish(store, job, metrics=None):
    store.begin(job.key, job.config)
    store.finish(job.key, metrics or {})


def test_render_table_mean_std_diff_and_statuses(isolated):
    plan = plan_table("soco_table1", scale="tiny", seeds=(0, 1))
    store = RunStore(isolated / "runs")
    moco = next(r for r, row in enumerate(plan.spec.rows) if row.method == "moco_v2")
    scratch = next(r for r, row in enumerate(plan.spec.rows) if row.method == "scratch")
    aps = {0: 10.0, 1: 14.0}
    jobs = {j.key: j for j in plan.jobs}
    for cell in plan.cells:
        if cell.row == moco:
            for k in cell.chain[:-1]:
                if store.status(k) != "done":
                    _fake_finish(store, jobs[k])
            if store.status(cell.eval_key) != "done":
                _fake_finish(store, jobs[cell.eval_key],
                             {"bbox": {"AP": aps[cell.seed]}, "segm": {"AP": aps[cell.seed] / 2}})
        if cell.row == scratch and cell.seed == 0:
            store.fail(cell.chain[0], "nan", diverged=True)
    cells = cell_values(plan, store)
    c = cells[(moco, 0)]
    assert c["mean"] == 12.0 and c["std"] == pytest.approx(2 ** 0.5 * 2) and c["n"] == 2
    assert c["ref"] == 40.4 and c["diff"] is None            # ours − paper only at the paper's scale
    assert cells[(scratch, 0)]["status"] == "diverged"
    assert cells[(moco + 1, 0)]["status"] in ("not implemented", "pending")
    vdir = render(plan, store, out_root=isolated / "tables")
    md = (vdir.parent / "table.md").read_text()
    assert "[12.0 ± 2.8 / 40.4](" in md                        # ours ± std over 2 seeds / paper, linked
    assert "[-28.4]" not in md and "diverged" in md and "pending" in md   # rows not yet run
    assert "At the `tiny` scale" in md and "R50-FPN on COCO val2017" not in md.splitlines()[0]
    assert (vdir / "plot.png").stat().st_size > 1000
    rows = (vdir / "table.csv").read_text().splitlines()
    assert rows[0].startswith("table,scale,row,method,column,status,n_seeds,seeds")
    assert render(plan, store, out_root=isolated / "tables") == vdir   # same content: no new version
    assert len([d for d in vdir.parent.iterdir() if d.is_dir()]) == 1
    assert vdir.parent.name == "soco_table1"                  # the default scale keeps the plain name
    other = render(plan_table("soco_table1", scale="micro", seeds=(0,)), store, out_root=isolated / "tables")
    assert other.parent.name == "soco_table1@micro"          # another scale never overwrites it
    # the same runs read as the paper's scale: now the difference is printed
    paper = Plan(plan.spec, "paper", plan.seeds, plan.jobs, plan.cells)
    assert cell_values(paper, store)[(moco, 0)]["diff"] == pytest.approx(12.0 - 40.4)
    v2 = render(paper, store, out_root=isolated / "tables")
    assert "[-28.4]" in (v2 / "table.md").read_text()


def test_finished_run_is_never_overwritten(isolated):
    store = RunStore(isolated / "runs")
    store.begin("k1", {"stage": "x"})
    store.finish("k1", {"a": 1})
    with pytest.raises(RuntimeError, match="never overwritten"):
        store.finish("k1", {"a": 2})
    assert json.loads((store.run_dir("k1") / "metrics.json").read_text())["a"] == 1
    env = json.loads((store.run_dir("k1") / "env.json").read_text())
    assert {"git", "packages", "hardware"} <= set(env) and "torch" in env["packages"]


def test_supervised_row_at_paper_scale_reads_the_users_weights(isolated, monkeypatch):
    import torch
    import torchvision
    from benchmark.runs.job import Job
    from benchmark.runner import run_job
    for v in ("IMAGENET_ROOT", "COCO_ROOT"):
        monkeypatch.setenv(v, str(isolated))
    monkeypatch.delenv("SUPERVISED_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match="SUPERVISED_WEIGHTS is not set"):
        pretrain_config("supervised", scale="paper")
    for d in ("train", "train2017", "val2017", "annotations"):
        (isolated / d).mkdir(exist_ok=True)
    for f in ("instances_train2017.json", "instances_val2017.json"):
        (isolated / "annotations" / f).write_text("{}")
    w = isolated / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), w)
    monkeypatch.setenv("SUPERVISED_WEIGHTS", str(w))
    cfg = pretrain_config("supervised", scale="paper", epochs=90)
    assert cfg["method"]["weights"] == str(w)
    m = run_job(Job("pretrain", run_key(cfg), cfg, (), "sup"), str(isolated / "runs"))
    sd = torch.load(RunStore(isolated / "runs").run_dir(run_key(cfg)) / "weights.pt")["state_dict"]
    assert m["weights_from"] == str(w) and "layer4.2.conv3.weight" in sd and "fc.weight" not in sd


def test_small_values_keep_two_decimals():
    from benchmark.reporting.format import ours
    assert ours({"mean": 0.123, "std": 0.0, "values": [0.123], "status": "done"}, 1) == "0.12"
    assert ours({"mean": 42.26, "std": 0.5, "values": [42.0, 42.5], "status": "done"}, 2) == "42.3 ± 0.5"
    assert ours({"mean": 1.0, "std": 0.0, "values": [1.0], "status": "partial"}, 3) == "1.00 (1/3 seeds)"


def test_git_info_names_the_commit_and_never_invents_one(tmp_path):
    import subprocess

    from benchmark.runs.store import git_info
    here = git_info()
    assert len(here["sha"]) == 40 and isinstance(here["dirty"], bool)
    # a copy of the code without git history (a device copy, an unpacked archive)
    assert git_info(tmp_path) == {"sha": "unknown", "dirty": None, "snapshot": False}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)   # a repository with no commit yet
    assert git_info(tmp_path)["sha"] == "unknown" and git_info(tmp_path)["dirty"] is None


def test_tradeoff_bench_subset_keeps_only_the_chosen_cells_and_their_chains():
    from tools.bench.tradeoff_bench import subset
    plan = plan_table("soco_table1", scale="tiny", seeds=(0, 1))
    sub, ri, ci = subset(plan, ["Scratch", "MoCo v2"], ["1x APbb"])
    assert [plan.spec.rows[i].label for i in ri] == ["Scratch", "MoCo v2"]
    assert [plan.spec.columns[i].label for i in ci] == ["1x APbb"]
    assert len(sub.cells) == 4 and all(c.eval_key for c in sub.cells)
    keys = {j.key for j in sub.jobs}
    assert keys == {k for c in sub.cells for k in c.chain}
    # Scratch: fine-tune + eval per seed; MoCo v2: pretrain + fine-tune + eval per seed
    assert sorted(j.stage for j in sub.jobs) == ["evaluate"] * 4 + ["finetune"] * 4 + ["pretrain"] * 2
    with pytest.raises(SystemExit, match="unknown row.*Scratch"):
        subset(plan, ["Scrach"], ["1x APbb"])
