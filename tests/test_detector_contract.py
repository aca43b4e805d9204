"""The contract every registered detector keeps, at the micro scale on CPU: its config resolves
from the scale, it builds, loads a method's export (MoCo v2: backbone only; SoCo: backbone,
FPN and box head) with a per-group report, trains one step under its own optimizer and
schedule, and evaluates (COCO metrics of its IoU types)."""
import json
import math

import pytest
import torch

from benchmark.experiments.config import finetune_config, pretrain_config
from benchmark.data.resolve import resolve_data
from benchmark.detectors import detector_config, get_detector, list_detectors, load_pretrained
from benchmark.stages.evaluate import run_evaluate
from benchmark.stages.finetune import run_finetune
from methods import build_method

ALL = ("detr", "faster_rcnn", "faster_rcnn_c4", "fcos", "mask_rcnn", "mask_rcnn_c4", "retinanet")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """MoCo v2's and SoCo's exports at their micro (= tiny) size, saved as weights.pt."""
    out = {}
    root = tmp_path_factory.mktemp("exports")
    for name in ("moco_v2", "soco"):
        cfg = dict(pretrain_config(name, scale="micro")["method"])
        cfg.pop("name")
        torch.manual_seed(0)
        state = build_method(name, **cfg).export()
        torch.save({"state_dict": state}, root / f"{name}.pt")
        out[name] = (state, root / f"{name}.pt")
    return out


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    import os
    old = os.environ.get("DETBENCH_CACHE")
    os.environ["DETBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return resolve_data(pretrain_config("moco_v2", scale="micro")["data"])
    finally:
        if old is None:
            os.environ.pop("DETBENCH_CACHE")
        else:
            os.environ["DETBENCH_CACHE"] = old


def test_every_detector_is_covered():
    assert tuple(list_detectors()) == ALL


# what a SoCo export (backbone + C2-C5 FPN + 4conv1fc box head) brings to each detector
SOCO_GROUPS = {"mask_rcnn": {"fpn", "box_head"}, "faster_rcnn": {"fpn", "box_head"}, "retinanet": {"fpn"}, "fcos": {"fpn"},
               "faster_rcnn_c4": set(), "mask_rcnn_c4": set(), "detr": set()}


@pytest.mark.parametrize("name", ALL)
def test_detector_contract(name, exports, micro_data, tmp_path):
    det = get_detector(name)
    cfg = finetune_config(scale="micro", detector=name, parent="p" * 16, method="soco")
    assert cfg["detector"]["name"] == name and "protocol" not in cfg
    det_cls, det_cfg = detector_config(cfg["detector"])
    assert det_cls is det

    # load reports, per group, for both exports
    for method, (state, _) in exports.items():
        model = det.build(det_cfg, num_classes=4)
        report = load_pretrained(model, state, det, source=method)
        bb = report.groups["backbone"]
        assert bb.loaded and not bb.missing and not bb.mismatched, (method, bb)
        want = SOCO_GROUPS[name] if method == "soco" else set()
        for g in ("fpn", "box_head"):
            r = report.groups[g]
            assert bool(r.loaded) == (g in want), (method, g, r)
            if method == "soco" and g not in want:   # pretrained parts with no place are reported
                assert r.unexpected, (method, g)
        sd = model.state_dict()
        k = det.detector_key("layer1.0.conv1.weight")
        assert torch.equal(sd[k], state["layer1.0.conv1.weight"])

    # one training step under the detector's own optimizer and schedule, then evaluation
    recipe = {**cfg["recipe"], "steps": 1, "num_workers": 0}
    out = run_finetune(cfg["detector"], recipe, micro_data, run_dir=tmp_path / "ft",
                       weights=str(exports["soco"][1]), seed=0, device="cpu", progress=False)
    assert out["steps"] == 1 and math.isfinite(out["final_loss"])
    saved = json.loads((tmp_path / "ft" / "load_report.json").read_text())
    assert saved["detector"] == name and saved["groups"]["backbone"]["loaded"]
    metrics = run_evaluate(str(tmp_path / "ft" / "model_final.pt"), micro_data, run_dir=tmp_path / "ev",
                           device="cpu", progress=False)
    assert set(metrics) == ({"bbox", "segm"} if det.with_masks else {"bbox"})
    assert all(math.isnan(v) or 0 <= v <= 100 for v in metrics["bbox"].values())
