"""Fine-tuning like detectron2 and strict loading of pretrained weights
(section 4): aligned RoIAlign, L1 box loss, precise BN, the config fields that record them,
groups that must load, and the table mark of a run that loaded only part of its weights."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from benchmark.experiments.config import finetune_config
from benchmark.detectors import PretrainedLoadError, build_detector, get_detector, load_pretrained
from benchmark.detectors.base import GroupReport, LoadReport
from benchmark.detectors.rcnn import RoIPooler, l1_box_loss
from benchmark.stages.finetune import precise_bn
from benchmark.reporting.results import groups_not_loaded
from benchmark.runs.identity import run_key
from methods.config import ConfigError

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"
MICRO = {"backbone": "resnet18", "fpn_channels": 16, "box_head_conv_dim": 16, "box_head_fc_dim": 32,
         "mask_head_dim": 8, "mask_head_convs": 1, "min_size": [64], "max_size": 64, "test_min_size": 64,
         "rpn_batch_size_per_image": 16, "box_batch_size_per_image": 16,
         "anchor_sizes": [8, 16, 32, 64, 128]}


# ------------------------------------------------------------------ aligned RoIAlign
def _ramp(h: int, w: int) -> torch.Tensor:
    """A feature map whose value is its x coordinate (bilinear sampling returns x exactly)."""
    return torch.arange(w, dtype=torch.float32).expand(1, 1, h, w).clone()


def test_aligned_roi_align_is_the_half_pixel_shift_on_one_level():
    x = {"0": _ramp(16, 16)}
    box = [torch.tensor([[2.0, 2.0, 6.0, 6.0]])]
    old = RoIPooler(["0"], 2, 1, aligned=False)(x, box, [(16, 16)])
    new = RoIPooler(["0"], 2, 1, aligned=True)(x, box, [(16, 16)])
    # two bins of width 2 over x in [2, 6], one sample at each bin centre: 3 and 5 (torchvision),
    # 2.5 and 4.5 with detectron2's half-pixel offset (pixel i covers [i, i+1), centre i + 0.5)
    torch.testing.assert_close(old[0, 0, 0], torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(new[0, 0, 0], torch.tensor([2.5, 4.5]))


def test_aligned_roi_align_on_two_levels_maps_levels_as_torchvision_does():
    x = {"0": _ramp(64, 64), "1": _ramp(32, 32)}       # strides 1 and 2 of a 64-px image
    boxes = [torch.tensor([[2.0, 2.0, 6.0, 6.0], [8.0, 8.0, 48.0, 48.0]])]   # sizes 4 -> P0, 40 -> P1
    old = RoIPooler(["0", "1"], 1, 1, aligned=False)(x, boxes, [(64, 64)])
    new = RoIPooler(["0", "1"], 1, 1, aligned=True)(x, boxes, [(64, 64)])
    # level 0: centre 4 -> 3.5; level 1 (scale 1/2): x in [4, 24], centre 14 -> 13.5
    torch.testing.assert_close(old.flatten(), torch.tensor([4.0, 14.0]))
    torch.testing.assert_close(new.flatten(), torch.tensor([3.5, 13.5]))
    # and equals torchvision's roi_align with aligned=True at each box's level
    ref = roi_align(x["1"], torch.tensor([[0.0, 8, 8, 48, 48]]), 1, spatial_scale=0.5, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(new[1], ref[0])


def test_detectors_use_the_configured_pooler():
    for name, over in (("mask_rcnn", MICRO), ("faster_rcnn_c4", {"backbone": "resnet18"}),
                       ("mask_rcnn_c4", {"backbone": "resnet18"})):
        for aligned in (False, True):
            m = build_detector({"name": name, **over, "roi_align_aligned": aligned}, 3)
            pools = [m.roi_heads.box_roi_pool] + ([m.roi_heads.mask_roi_pool] if m.roi_heads.has_mask() else [])
            assert all(isinstance(p, RoIPooler) and p.aligned == aligned for p in pools), name
    m = build_detector({"name": "mask_rcnn", **MICRO, "roi_sampling_ratio": 0}, 3)
    assert m.roi_heads.box_roi_pool.sampling_ratio == 0 == m.roi_heads.mask_roi_pool.sampling_ratio


# ------------------------------------------------------------------ L1 box loss
def test_l1_box_loss_by_hand():
    # 3 sampled RoIs over 2 images, 3 classes (0 = background): RoI 0 class 1, RoI 1
    # background, RoI 2 class 2; 4 deltas per class
    reg = torch.zeros(3, 12)
    reg[0, 4:8] = torch.tensor([1.0, -1.0, 0.5, 0.0])     # class 1 of RoI 0
    reg[1] = 7.0                                          # background: never counted
    reg[2, 8:12] = torch.tensor([0.0, 0.0, 0.0, 2.0])     # class 2 of RoI 2
    reg[2, 4:8] = 9.0                                     # the other class of RoI 2: not counted
    targets = [torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0]])]
    labels = [torch.tensor([1, 0]), torch.tensor([2])]
    # |1| + |-1| + |0.5| + 0 + 0 + 0 + 0 + |2 - 1| = 3.5, over 3 sampled RoIs
    assert l1_box_loss(reg, labels, targets).item() == pytest.approx(3.5 / 3)


def test_l1_replaces_only_the_box_regression_loss_of_the_roi_heads():
    def losses(box_reg_loss: str) -> dict:
        torch.manual_seed(0)
        m = build_detector({"name": "mask_rcnn", **MICRO, "box_reg_loss": box_reg_loss}, 3).train()
        target = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 60.0, 50.0]]),
                   "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 64, 64, dtype=torch.uint8)}]
        torch.manual_seed(1)
        out = m([torch.rand(3, 64, 64)], target)
        out["loss_box_reg"].backward()
        assert m.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
        return {k: v.item() for k, v in out.items()}
    smooth, l1 = losses("smooth_l1"), losses("l1")
    # same RoIs and predictions; only the box loss changes, and smooth L1 (beta 1/9) <= L1
    assert {k: v for k, v in smooth.items() if k != "loss_box_reg"} == \
           {k: v for k, v in l1.items() if k != "loss_box_reg"}
    assert 0 < smooth["loss_box_reg"] < l1["loss_box_reg"]


# ------------------------------------------------------------------ precise BN
def test_precise_bn_sets_running_stats_to_the_mean_over_batches_and_keeps_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, momentum=0.1)).train()
    model[1].running_mean.fill_(5.0)
    model[1].num_batches_tracked.fill_(17)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    batches = [torch.randn(4, 1, 3, 3) * s + s for s in (1.0, 2.0, 3.0, 4.0)]
    used = precise_bn(model, iter(batches), model, iters=3)
    assert used == 3
    with torch.no_grad():
        feats = [model[0](b) for b in batches[:3]]                        # the conv is unchanged
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    for k, v in model.state_dict().items():
        if "running" not in k:
            assert torch.equal(v, weights[k]), k                          # incl. num_batches_tracked
    assert model[1].momentum == 0.1


def test_precise_bn_leaves_eval_and_frozen_bn_alone():
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = nn.Sequential(nn.BatchNorm2d(2), FrozenBatchNorm2d(2))
    model[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert precise_bn(model, iter([torch.randn(2, 2, 3, 3)]), model, iters=5) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finetune_with_precise_bn_changes_only_bn_statistics(tmp_path):
    from benchmark.data.resolve import resolve_data
    from benchmark.experiments.config import pretrain_config
    from benchmark.stages.finetune import run_finetune
    data = resolve_data(pretrain_config("moco_v2", scale="micro")["data"])
    cfg = finetune_config(scale="micro", detector="mask_rcnn", parent=None, recipe_overrides={"precise_bn_iters": 2})
    recipe = {**cfg["recipe"], "steps": 1, "num_workers": 0}
    run_finetune(cfg["detector"], recipe, data, run_dir=tmp_path, weights=None, seed=0, device="cpu", progress=False)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]   # after the last step
    final = torch.load(tmp_path / "model_final.pt", weights_only=False)["state_dict"]
    stats = [k for k in final if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(final[k], trained[k]) for k in stats)
    assert all(torch.equal(final[k], trained[k]) for k in final if k not in stats)


# ------------------------------------------------------------------ the run's config
def test_fields_enter_the_config_only_away_from_torchvision():
    plain = finetune_config(scale="micro", detector="mask_rcnn", parent=None)
    legacy = finetune_config(scale="micro", detector="mask_rcnn", parent=None,
                             detector_overrides={"roi_align_aligned": False, "box_reg_loss": "smooth_l1",
                                                 "roi_sampling_ratio": 2},
                             recipe_overrides={"precise_bn_iters": 0, "drop_groups": []})
    assert legacy == plain and run_key(legacy) == run_key(plain)
    for k in ("roi_align_aligned", "box_reg_loss", "roi_sampling_ratio"):
        assert k not in plain["detector"]
    assert "precise_bn_iters" not in plain["recipe"] and "drop_groups" not in plain["recipe"]
    d2 = finetune_config(scale="micro", detector="faster_rcnn_c4", parent=None,
                         detector_overrides={"roi_align_aligned": True, "box_reg_loss": "l1"},
                         recipe_overrides={"precise_bn_iters": 200, "drop_groups": ["fpn"]})
    assert (d2["detector"]["roi_align_aligned"], d2["detector"]["box_reg_loss"]) == (True, "l1")
    assert (d2["recipe"]["precise_bn_iters"], d2["recipe"]["drop_groups"]) == (200, ["fpn"])
    with pytest.raises(ConfigError, match="detector.box_reg_loss"):
        finetune_config(scale="micro", detector="mask_rcnn", parent=None, detector_overrides={"box_reg_loss": "l2"})
    with pytest.raises(ConfigError, match="finetune.drop_groups: unknown group 'backbone'"):
        finetune_config(scale="micro", detector="mask_rcnn", parent=None, recipe_overrides={"drop_groups": ["backbone"]})
    with pytest.raises(ConfigError, match="finetune.precise_bn_iters"):
        finetune_config(scale="micro", detector="mask_rcnn", parent=None, recipe_overrides={"precise_bn_iters": -1})


def test_small_and_paper_fine_tune_like_detectron2_tiny_like_torchvision(monkeypatch):
    monkeypatch.setenv("COCO_ROOT", "/nonexistent/coco")
    monkeypatch.setenv("IMAGENET_ROOT", "/nonexistent/imagenet")
    for det in ("mask_rcnn", "faster_rcnn_c4", "mask_rcnn_c4"):
        for scale in ("small", "paper"):
            c = finetune_config(scale=scale, detector=det, parent=None)
            assert (c["detector"]["roi_align_aligned"], c["detector"]["box_reg_loss"]) == (True, "l1"), (scale, det)
            assert c["recipe"]["precise_bn_iters"] == 200, (scale, det)
        for scale in ("tiny", "tiny_long", "micro"):
            c = finetune_config(scale=scale, detector=det, parent=None)
            assert not {"roi_align_aligned", "box_reg_loss", "roi_sampling_ratio"} & set(c["detector"])
            assert "precise_bn_iters" not in c["recipe"]


def test_model_final_without_the_fields_builds_torchvisions_heads():
    """A config saved before the fields existed (or at their legacy values) builds the legacy heads."""
    m = build_detector({"name": "mask_rcnn", **MICRO}, 3)
    assert not m.roi_heads.box_roi_pool.aligned and m.roi_heads.box_reg_loss == "smooth_l1"
    assert m.roi_heads.box_roi_pool.sampling_ratio == 2


# ------------------------------------------------------------------ strict loading
def _export(**det_over) -> dict:
    """A SoCo-like export (canonical keys: backbone, fpn.*, box_head.*) of a micro Mask R-CNN."""
    torch.manual_seed(5)
    src = build_detector({"name": "mask_rcnn", **MICRO, **det_over}, 3)
    sd = src.state_dict()
    out = {k[len("backbone.body."):]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    out.update({"fpn." + k[len("backbone.fpn."):]: v for k, v in sd.items() if k.startswith("backbone.fpn.")})
    out.update({"box_head." + k[len("roi_heads.box_head."):]: v for k, v in sd.items()
                if k.startswith("roi_heads.box_head.")})
    return out


def test_a_group_of_the_file_that_does_not_load_is_an_error_naming_it():
    det = get_detector("mask_rcnn")
    model = build_detector({"name": "mask_rcnn", **MICRO, "fpn_channels": 32}, 3)   # the export's FPN is 16 wide
    before = model.backbone.body.conv1.weight.clone()
    with pytest.raises(PretrainedLoadError, match=r"fpn: the weights file has this group but it does not load "
                                                  r"whole.*--set finetune.drop_groups=\[fpn\]"):
        load_pretrained(model, _export(), det)
    assert torch.equal(model.backbone.body.conv1.weight, before)          # nothing loaded
    # a box head with norm layers the detector lacks: the extra keys have no place
    model = build_detector({"name": "mask_rcnn", **MICRO}, 3)
    with pytest.raises(PretrainedLoadError, match=r"box_head: .* file keys with no place"):
        load_pretrained(model, _export(head_norm="bn"), det)


def test_drop_groups_leaves_a_group_out_and_says_so():
    det = get_detector("mask_rcnn")
    model = build_detector({"name": "mask_rcnn", **MICRO, "fpn_channels": 32}, 3)
    fpn_before = model.backbone.fpn.inner_blocks[0][0].weight.clone()
    state = {k: v for k, v in _export().items() if not k.startswith("box_head.")}
    report = load_pretrained(model, state, det, drop=("fpn",))
    assert torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, fpn_before)
    assert report.groups["fpn"].dropped and not report.groups["fpn"].loaded
    assert report.not_loaded == {"fpn": "dropped (recipe.drop_groups)"}
    assert groups_not_loaded(report.to_dict()) == ["fpn"]
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])


def test_groups_with_no_place_or_loaded_in_part_are_reported_not_refused():
    state = _export(head_norm="bn")                       # a BN FPN and box head, as SoCo's
    c4 = get_detector("faster_rcnn_c4")
    report = load_pretrained(build_detector({"name": "faster_rcnn_c4", "backbone": "resnet18"}, 3), state, c4)
    assert report.not_loaded == {"fpn": "no place in faster_rcnn_c4", "box_head": "no place in faster_rcnn_c4"}
    retina = get_detector("retinanet")
    report = load_pretrained(build_detector({"name": "retinanet", "backbone": "resnet18", "fpn_channels": 16}, 3),
                             state, retina)
    assert report.groups["fpn"].loaded and report.not_loaded["fpn"].startswith("loaded in part")
    assert sorted(groups_not_loaded(report.to_dict())) == ["box_head", "fpn"]
    # a backbone-only export (supervised, MoCo) leaves nothing of the file behind
    backbone = {k: v for k, v in state.items() if not k.startswith(("fpn.", "box_head."))}
    report = load_pretrained(build_detector({"name": "mask_rcnn", **MICRO}, 3), backbone, get_detector("mask_rcnn"))
    assert report.not_loaded == {} and groups_not_loaded(report.to_dict()) == []


def test_no_committed_finetuning_run_would_now_fail_its_load():
    """Every committed load report passes today's checks; what it left of the file is as expected:
    nothing for a backbone-only export, a SoCo/InsLoc export into Mask R-CNN FPN (whose FPN
    and box head load) or an AlignDet export into the detector it pretrained; the FPN and box
    head elsewhere."""
    fields = [f.name for f in dataclasses.fields(GroupReport)]
    reports = sorted(RUNS.glob("*/load_report.json"))
    assert reports
    for path in reports:
        d = json.loads(path.read_text())
        cfg = json.loads((path.parent / "config.json").read_text())
        det = get_detector(cfg["detector"]["name"])
        rep = LoadReport(groups={g: GroupReport(**{k: r.get(k, []) for k in fields}) for g, r in d["groups"].items()})
        assert rep.problems(det, drop=tuple(cfg["recipe"].get("drop_groups", ()))) == [], path
        in_file = {g for g, r in d["groups"].items() if g != "other" and (r["loaded"] or r["unexpected"])}
        parent = json.loads((RUNS / cfg["parent"] / "config.json").read_text()) if cfg.get("parent") else {}
        if det.name == "mask_rcnn" or parent.get("method", {}).get("name") == "aligndet":
            # Mask R-CNN FPN takes every group of an export; an AlignDet export is this detector's own
            assert groups_not_loaded(d) == [], path
            assert all(d["groups"][g]["loaded"] for g in in_file), path
        else:
            assert set(groups_not_loaded(d)) == in_file - {"backbone"}, path


# ------------------------------------------------------------------ the table mark
def test_tables_mark_cells_whose_runs_loaded_part_of_the_weights():
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.render import _markdown, cell_values
    from benchmark.reporting.results import load_runs
    df = load_runs(RUNS, use_sacct=False)
    plan = plan_table("detectors_tiny", scale="tiny", seeds=(0,))
    cells = cell_values(plan, df)
    cols = [c.detector for c in plan.spec.columns]
    soco = next(i for i, r in enumerate(plan.spec.rows) if r.method == "soco")
    moco = next(i for i, r in enumerate(plan.spec.rows) if r.method == "moco_v2")
    for ci, det in enumerate(cols):
        c = cells[(soco, ci)]
        if not c["runs"]:
            continue
        assert ("not_loaded" in c) == (det != "mask_rcnn"), det
        assert "not_loaded" not in cells[(moco, ci)]
    md = _markdown(plan, cells, df, "V", "runs", None)
    assert md.count("†") >= 2 and "†: the fine-tuning run loaded only part of the pretrained weights" in md
