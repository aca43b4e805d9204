"""Detector configs through scales, table columns and the plan; the identity of committed runs."""
import json
from pathlib import Path

import pytest
import torch

from benchmark.experiments.config import finetune_config
from benchmark.detectors import get_detector, list_detectors
from benchmark.experiments.plan import plan_table
from benchmark.runs.identity import run_key
from benchmark.experiments.tables import load_spec
from methods.config import ConfigError

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"


def _committed_finetune_runs():
    for p in sorted(RUNS.glob("*/config.json")):
        c = json.loads(p.read_text())
        if c["stage"] == "finetune":
            yield c


def test_committed_finetune_runs_keep_their_keys():
    """Every committed fine-tuning run (soco_table1/4/5 at tiny and tiny_long, the other
    detectors' and VOC tables) recomputes to its own key from its scale, schedule, detector,
    protocol, parent and method: the registry changed no identity. InsLoc's Mask R-CNN runs
    made before its rows fine-tuned with the ExtraNorm box head recompute to their
    keys with that head turned off: the head is the only change to them."""
    runs = list(_committed_finetune_runs())
    assert runs, f"no committed fine-tuning runs under {RUNS}"
    assert any("soco_table1" in c.get("label", "") for c in runs)
    for c in runs:
        method = None
        if c["parent"]:
            method = json.loads((RUNS / c["parent"] / "config.json").read_text())["method"]["name"]
        before_extra_norm = (method == "insloc" and c["detector"]["name"] == "mask_rcnn"
                             and "box_head_extra_norm" not in c["detector"])
        cfg = finetune_config(scale=c["scale"], seed=c["seed"], schedule=c["schedule"], parent=c["parent"],
                              method=method, detector=c["detector"]["name"], protocol=c.get("protocol", "coco"),
                              detector_overrides={"box_head_extra_norm": False} if before_extra_norm else None)
        assert run_key(cfg) == c["key"], c.get("label")


def test_every_detector_has_an_entry_at_every_scale_and_its_recipes_resolve():
    for name in list_detectors():
        det = get_detector(name)
        for scale in ("micro", "tiny", "tiny_long"):
            cfg = finetune_config(scale=scale, detector=name, parent=None)
            assert cfg["detector"]["name"] == name
            det.Recipe.from_dict(cfg["recipe"])
        assert {"1x", "2x"} <= set(det.recipes)


def test_paper_recipes():
    r = get_detector("retinanet").recipes
    assert (r["1x"].lr, r["1x"].steps, r["1x"].milestone_steps(), r["1x"].warmup_steps) == \
        (0.01, 90000, (60000, 80000), 500)
    assert (r["2x"].steps, r["2x"].milestone_steps()) == (180000, (120000, 160000))
    f = get_detector("fcos").recipes["1x"]
    assert (f.lr, f.milestone_steps(), f.grad_clip) == (0.01, (60000, 80000), 35.0)
    d = get_detector("detr").recipes
    epoch = 7393
    assert [(x.steps // epoch, x.milestone_steps()[0] // epoch) for x in (d["1x"], d["2x"], d["3x"])] == \
        [(50, 40), (100, 80), (150, 100)]
    assert (d["1x"].lr, d["1x"].backbone_lr_mult, d["1x"].weight_decay, d["1x"].grad_clip) == (1e-4, 0.1, 1e-4, 0.1)


def test_detector_optimizers_and_schedules():
    detr = get_detector("detr")
    cfg = finetune_config(scale="micro", detector="detr", parent=None)
    from benchmark.detectors import detector_config
    _, dc = detector_config(cfg["detector"])
    model = detr.build(dc, 3)
    rec = detr.Recipe.from_dict(cfg["recipe"])
    opt = detr.optimizer(model, rec)
    assert isinstance(opt, torch.optim.AdamW)
    rest, backbone = opt.param_groups
    assert (rest["lr_mult"], backbone["lr_mult"]) == (1.0, 0.1) and backbone["params"] and rest["params"]
    # transformers froze the stem and res2: every backbone convolution trains here
    convs = [p for n, p in model.named_parameters() if "backbone" in n and "convolution" in n]
    assert convs and all(p.requires_grad for p in convs)
    sched = detr.schedule(rec)
    assert sched(0) == rec.lr and sched(rec.steps - 1) == pytest.approx(rec.lr * 0.1)   # no warm-up, one step
    mask = get_detector("mask_rcnn")
    mrec = mask.Recipe.from_dict(finetune_config(scale="tiny", parent=None)["recipe"])
    assert isinstance(mask.optimizer(mask.build(mask.Config.from_dict(
        finetune_config(scale="micro", parent=None)["detector"], "mask_rcnn"), 3), mrec), torch.optim.SGD)
    s = mask.schedule(mrec)
    assert s(0) == pytest.approx(0.02 * 0.001) and s(20) == 0.02 and s(100) == pytest.approx(0.002)


def test_scale_and_column_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"detector\.name: unknown detector 'yolo'"):
        finetune_config(scale="tiny", detector="yolo", parent=None)
    with pytest.raises(ConfigError, match=r"schedule: unknown '3x' for retinanet"):
        finetune_config(scale="tiny", detector="retinanet", schedule="3x", parent=None)
    with pytest.raises(ConfigError, match=r"detector\.anchor_sizes"):
        finetune_config(scale="tiny", detector="retinanet", parent=None, detector_overrides={"anchor_sizes": [8]})
    with pytest.raises(ConfigError, match=r"finetune\.momentum: unknown key"):
        finetune_config(scale="tiny", detector="detr", parent=None, recipe_overrides={"momentum": 0.9})
    with pytest.raises(ConfigError, match="protocol: unknown 'kitti'"):
        finetune_config(scale="tiny", parent=None, protocol="kitti")


def test_protocol_enters_the_config_only_when_not_coco():
    coco = finetune_config(scale="tiny", parent=None)
    voc = finetune_config(scale="tiny", parent=None, protocol="voc")
    assert "protocol" not in coco and voc["protocol"] == "voc" and run_key(coco) != run_key(voc)


def test_soco_weight_decay_reaches_the_sgd_detectors_not_detr():
    for name, wd in (("mask_rcnn", 2.5e-5), ("retinanet", 2.5e-5), ("detr", 1e-4)):
        assert finetune_config(scale="tiny", detector=name, parent="p", method="soco")["recipe"]["weight_decay"] == wd


def test_a_table_mixes_detectors():
    spec = load_spec("detectors_tiny")
    assert [c.detector for c in spec.columns] == ["mask_rcnn", "faster_rcnn_c4", "retinanet", "fcos", "detr"]
    plan = plan_table(spec, scale="tiny")
    jobs = {j.key: j for j in plan.jobs}
    fine = [j for j in plan.jobs if j.stage == "finetune"]
    assert len(fine) == 4 * 5 and len([j for j in plan.jobs if j.stage == "pretrain"]) == 3
    for cell in plan.cells:
        fkey = cell.chain[-2]
        assert jobs[fkey].config["detector"]["name"] == spec.columns[cell.col].detector
    # the Mask R-CNN column of this table is the same run as soco_table1's 1x column
    t1 = plan_table("soco_table1", scale="tiny")
    mask_keys = {c.chain[-2] for c in plan.cells if c.col == 0}
    assert mask_keys & {j.key for j in t1.jobs if j.stage == "finetune"}
