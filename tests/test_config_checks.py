"""Config values are checked before anything runs (issue 22, item 12): a meaningless value is
one ``ConfigError`` line naming the field as the user wrote it, never a traceback inside a run
and a FAILED folder (``methods.config.RULES``, ``benchmark.experiments.config``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.cli.args import seed_range
from benchmark.experiments.config import available_scales, finetune_config, load_scale, pretrain_config
from benchmark.experiments.plan import plan_table
from benchmark.experiments.tables import load_spec
from methods.config import METHOD_BACKBONES, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _no_run_folder(root: Path) -> bool:
    runs = root / "runs"
    return not runs.exists() or not [p for p in runs.rglob("*") if p.is_dir() and not p.name.startswith(".")]


# ------------------------------------------------------------------ every value of the issue, through the CLI
@pytest.mark.parametrize("args, msg", [
    (["pretrain", "--method", "moco_v2", "--set", "method.backbone=resnet999"], "method.backbone: expected one of"),
    (["pretrain", "--method", "moco_v2", "--set", "method.crop_scale=[0.9,0.1]"],
     "method.crop_scale: expected [lo, hi] with 0 < lo <= hi <= 1, got [0.9, 0.1]"),
    (["pretrain", "--method", "pixpro", "--set", "method.crop_scale=[2,3]"], "method.crop_scale: expected [lo, hi]"),
    (["pretrain", "--method", "moco_v2", "--epochs", "inf"], "--epochs: expected > 0 (finite"),
    (["pretrain", "--method", "moco_v2", "--epochs", "1e30"], "--epochs: expected > 0 (finite, at most 1000000)"),
    (["pretrain", "--method", "moco_v2", "--set", "recipe.epochs=1e30"], "recipe.epochs: expected > 0"),
    (["pretrain", "--method", "moco_v2", "--seed", "-1"], "--seed: expected >= 0"),
    (["pretrain", "--method", "moco_v2", "--set", "method.queue_size=5"],   # micro: a global batch of 8
     "method.queue_size: expected >= the global batch (recipe.batch_size = 8), got 5"),
    (["pretrain", "--method", "moco_v2", "--set", "method.temperature=.inf"], "method.temperature: expected a finite"),
    (["pretrain", "--method", "soco", "--set", "method.fpn_channels=0"], "method.fpn_channels: expected > 0"),
    (["finetune", "--from", "scratch", "--set", "finetune.lr=-0.01"], "finetune.lr: expected >= 0"),
    (["finetune", "--from", "scratch", "--set", "detector.fpn_channels=-1"], "detector.fpn_channels: expected > 0"),
    (["finetune", "--from", "scratch", "--set", "finetune.warmup_steps=10"],   # micro 1x: 4 steps
     "finetune.warmup_steps: expected <= finetune.steps (4), got 10"),
    (["finetune", "--from", "scratch", "--seed", "-1"], "--seed: expected >= 0"),
    (["reproduce", "--table", "moco_voc", "--seeds", "0"], "--seeds: expected a number of seeds >= 1, got 0"),
    (["reproduce", "--table", "moco_voc", "--first-seed", "-2"], "--first-seed: expected >= 0"),
    (["reproduce", "--table", "moco_voc", "--set", "finetune.lr=-1"], "finetune.lr: expected >= 0"),
])
def test_a_meaningless_value_is_one_line_naming_the_field_and_nothing_runs(isolated, capsys, args, msg):
    assert main(args + ["--scale", "micro"]) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "recipe.lr" not in err   # fine-tuning values are named as written: finetune.*
    assert _no_run_folder(isolated)


def test_errors_of_the_python_api_name_the_same_fields():
    with pytest.raises(ConfigError, match=r"^finetune\.lr: expected >= 0"):
        finetune_config(scale="micro", parent=None, recipe_overrides={"lr": -0.01})
    with pytest.raises(ConfigError, match=r"^finetune\.steps: expected > 0"):
        finetune_config(scale="micro", parent=None, recipe_overrides={"steps": 0})
    with pytest.raises(ConfigError, match=r"^method\.backbone: expected one of resnet18 \| resnet34"):
        pretrain_config("pixpro", scale="micro", method_overrides={"backbone": "resnet999"})
    with pytest.raises(ConfigError, match=r"^method\.queue_size: expected >= the global batch"):
        pretrain_config("insloc", scale="tiny", method_overrides={"queue_size": 16})   # tiny InsLoc: batch 32
    with pytest.raises(ConfigError, match=r"^--seeds"):
        seed_range(0, 0)
    with pytest.raises(ConfigError, match=r"^data\.image_size: expected > 0"):
        pretrain_config("moco_v2", scale="micro", data_overrides={"image_size": -64})
    with pytest.raises(ConfigError, match=r"^detector\.fpn_channels"):
        finetune_config(scale="micro", parent=None, detector="retinanet", detector_overrides={"fpn_channels": -1})
    with pytest.raises(ConfigError, match=r"^method\.temperature: expected a finite number"):
        pretrain_config("aligndet", scale="micro", method_overrides={"temperature": float("nan")}, parent="0" * 16)


def test_the_limits_themselves_are_accepted():
    """The checks refuse the meaningless, not the edge: an equal pair, a queue of exactly one
    batch, a warm-up as long as the run, seed 0, one seed."""
    pretrain_config("moco_v2", scale="micro", method_overrides={"crop_scale": [1, 1]})
    pretrain_config("moco_v2", scale="micro", method_overrides={"queue_size": 8})   # = the micro batch
    finetune_config(scale="micro", parent=None, recipe_overrides={"warmup_steps": 4, "lr": 0})
    assert seed_range(1, 0) == (0,) and seed_range(3, 2) == (2, 3, 4)
    # the scale's batch divisor applies before the queue is compared: 512 / 256 -> 2 <= 4
    pretrain_config("moco_v2", scale="micro", method_overrides={"queue_size": 4}, recipe_overrides={"batch_size": 512})


# ------------------------------------------------------------------ table specs and scale files
def test_a_table_rows_overrides_are_checked_when_it_is_planned(tmp_path):
    spec = tmp_path / "t.yaml"
    base = "name: t\ncolumns: [{label: AP, schedule: 1x, metric: bbox.AP}]\nrows:\n"
    spec.write_text(base + "  - {label: a, method: moco_v2, method_overrides: {crop_scale: [2, 3]}}\n")
    with pytest.raises(ConfigError, match=r"method\.crop_scale: expected \[lo, hi\]"):
        plan_table(load_spec(str(spec)), scale="micro")
    spec.write_text(base + "  - {label: a, method: scratch, finetune_overrides: {lr: -0.01}}\n")
    with pytest.raises(ConfigError, match=r"finetune\.lr: expected >= 0"):
        plan_table(load_spec(str(spec)), scale="micro")
    spec.write_text(base + "  - {label: a, method: moco_v2, pretrain_epochs: .inf}\n")
    with pytest.raises(ConfigError, match=r"rows\[0\]\.pretrain_epochs: expected a finite number"):
        load_spec(str(spec))


@pytest.mark.parametrize("text, msg", [
    ("", "empty scale file"),
    ("# only a comment\n", "empty scale file"),
    ("name: bad\nruntime: {num_workers: 0}\n", "data: missing"),
    ("name: bad\ndata: {kind: synthetic, image_size: -64}\n", "data.image_size: expected > 0"),
    ("name: bad\ndata: {kind: synthetic, num_train: 0}\n", "data.num_train: expected > 0"),
    ("name: bad\ndata: {kind: synthetic, min_objects: 5, max_objects: 2}\n", "data.min_objects: expected <= data.max_objects"),
    ("name: bad\ndata: {kind: synthetic, imagesize: 64}\n", "data.imagesize: unknown key"),
    ("name: bad\ndata: {kind: synthetic}\npretrain: {epochs: .inf}\n", "pretrain.epochs: expected a finite number"),
    ("name: bad\ndata: {kind: synthetic}\npretrain: {batch_size: 0}\n", "pretrain.batch_size: expected > 0"),
    ("name: bad\ndata: {kind: synthetic}\ndetectors: {mask_rcnn: {finetune: {1x: {steps: 10, warmup_steps: 50}}}}\n",
     "warmup_steps: expected <= recipe.steps (10), got 50"),
    ("name: bad\ndata: {kind: synthetic}\ndetectors: {mask_rcnn: {model: {fpn_channels: -1}}}\n",
     "detector.fpn_channels: expected > 0"),
])
def test_a_bad_scale_file_is_refused_when_it_is_read(tmp_path, monkeypatch, text, msg):
    import benchmark.experiments.config as config
    (tmp_path / "bad.yaml").write_text(text)
    monkeypatch.setattr(config, "SCALES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=str(tmp_path / "bad.yaml")) as e:
        load_scale("bad")
    assert msg in str(e.value)


def test_an_empty_scale_file_through_the_cli_is_one_line(isolated, monkeypatch, capsys):
    import benchmark.experiments.config as config
    scales = isolated / "scales"
    scales.mkdir()
    (scales / "empty.yaml").write_text("")
    monkeypatch.setattr(config, "SCALES_DIR", scales)
    assert main(["pretrain", "--method", "moco_v2", "--scale", "empty"]) == 2
    err = capsys.readouterr().err
    assert f"{scales / 'empty.yaml'}: empty scale file" in err and len(err.strip().splitlines()) == 1
    assert _no_run_folder(isolated)


# ------------------------------------------------------------------ valid configs still resolve
def test_every_committed_scale_method_and_detector_recipe_still_resolves(monkeypatch):
    """The rules refuse none of the committed values: every scale file, every method at every
    scale, every detector and schedule the scale names (the planner over every table x scale
    is the same check at length; see the CHANGELOG entry)."""
    for v in ("COCO_ROOT", "IMAGENET_ROOT", "VOC_ROOT", "SUPERVISED_WEIGHTS"):
        monkeypatch.setenv(v, f"/nonexistent/{v.lower()}")
    from methods import get_method, list_methods
    for scale in available_scales():
        sc = load_scale(scale)
        for m in list_methods():
            parent = "0" * 16 if get_method(m).pretrain_detector(get_method(m).Config().to_dict()) else None
            pretrain_config(m, scale=scale, parent=parent)
        for det, entry in sc["detectors"].items():
            for schedule in entry.get("finetune") or {"1x": None}:
                finetune_config(scale=scale, parent=None, detector=det, schedule=schedule)


def test_method_backbones_are_what_the_method_backbone_builds():
    import torchvision
    from methods import backbones
    assert set(METHOD_BACKBONES) == set(backbones._FEATURE_DIM)
    assert all(hasattr(torchvision.models, b) for b in METHOD_BACKBONES)


# ------------------------------------------------------------------ end to end, the installed entry point
@pytest.mark.parametrize("args, field", [
    (["pretrain", "--method", "moco_v2", "--set", "method.crop_scale=[0.9,0.1]"], "method.crop_scale"),
    (["finetune", "--from", "scratch", "--set", "finetune.lr=-0.01"], "finetune.lr"),
])
def test_python_m_benchmark_cli_refuses_before_any_run(tmp_path, args, field):
    env = {**os.environ, "DETBENCH_RUNS": str(tmp_path / "runs"), "DETBENCH_CACHE": str(tmp_path / "cache"),
           "DETBENCH_RESULTS": str(tmp_path / "results")}
    r = subprocess.run([sys.executable, "-m", "benchmark.cli", *args, "--scale", "micro"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"detbench: config error: {field}:"), r.stderr
    assert _no_run_folder(tmp_path)
