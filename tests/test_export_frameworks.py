"""Issue 26: exports that the real frameworks load whole, with the config fragment written
beside them. torchvision's real detection models (exec of the fragment); detectron2 (not on
PyPI) against its documented key names and shapes for the config the fragment emits
(``config/defaults.py`` keys; ``modeling/backbone/fpn.py``, ``roi_heads/box_head.py``,
``rpn.py``, ``fast_rcnn.py``, ``mask_head.py``, ``meta_arch/retinanet.py``); mmdet's config dict.
"""
from __future__ import annotations

import pickle
import pickletools
import runpy

import pytest
import torch
import yaml
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from benchmark.stages.export import (ExportError, detector_to_canonical, load_export, save_export,
                                     to_framework)

from test_export import _prefixed, _randomised   # the same state-dict builders
from tools.d2_reference import D2_KEYS, flat as _flat, fpn_box_shapes as _d2_shapes

EXPORTED = ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.")


def _pretrain(arch: str, fpn_norm: bool, head: str | None, c: int = 256, fc: int = 1024) -> dict:
    """A method's canonical export: SoCo / InsLoc (FPN with BN, 4conv1fc with BN), MoCo (backbone)."""
    body = (resnet50 if arch == "r50" else resnet18)()
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
    chans = [256, 512, 1024, 2048] if arch == "r50" else [64, 128, 256, 512]
    if head is not None:
        state.update(_prefixed("fpn.", FeaturePyramidNetwork(chans, c, norm_layer=nn.BatchNorm2d if fpn_norm else None)))
    if head == "4conv1fc":
        state.update(_prefixed("box_head.", FastRCNNConvFCHead((c, 7, 7), [c] * 4, [fc], norm_layer=nn.BatchNorm2d)))
    elif head == "2mlp":
        state.update(_prefixed("box_head.", TwoMLPHead(c * 49, fc)))
    return _randomised(state)


def _load_fragment(rep: dict):
    """Run the torchvision fragment as a user would; returns (model, missing, unexpected)."""
    ns = runpy.run_path(rep["config_path"])
    return ns["model"], ns["missing"], ns["unexpected"]


def _assert_loads_whole(rep: dict, groups=EXPORTED):
    model, missing, unexpected = _load_fragment(rep)
    saved = torch.load(rep["path"], weights_only=True)
    assert unexpected == []
    groups = tuple(g for g in groups if any(k.startswith(g) for k in saved))   # the groups the export holds
    assert [k for k in missing if k.startswith(groups)] == []
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())
    return model, missing


# ------------------------------------------------------------------ defect 1: torchvision builder named
@pytest.mark.parametrize("arch,fpn_norm,head,builder", [
    ("r50", True, "4conv1fc", "maskrcnn_resnet50_fpn_v2("),     # SoCo, InsLoc R50
    ("r50", False, "2mlp", "maskrcnn_resnet50_fpn("),           # FPN + TwoMLPHead: v1
    ("r50", False, None, "maskrcnn_resnet50_fpn_v2("),          # MoCo / PixPro: backbone only
    ("r18", True, "4conv1fc", "BackboneWithFPN(resnet18"),      # the tiny scale: from parts
])
def test_torchvision_fragment_names_the_model_and_loads_whole(tmp_path, arch, fpn_norm, head, builder):
    state = _pretrain(arch, fpn_norm, head)
    rep = save_export(state, "torchvision", tmp_path / "tv.pth")
    assert builder in rep["config"] and rep["no_place"] == []
    model, missing = _assert_loads_whole(rep)
    assert not any(k.startswith("backbone.body.") for k in missing)


def test_v1_builder_would_lose_the_soco_heads(tmp_path):
    """Why the builder must be named: SoCo's R50 export into v1 silently drops its FPN norms and
    its whole box head (strict=False)."""
    rep = save_export(_pretrain("r50", True, "4conv1fc"), "torchvision", tmp_path / "tv.pth")
    v1 = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    r = v1.load_state_dict(torch.load(rep["path"], weights_only=True), strict=False)
    assert len([k for k in r.unexpected_keys if k.startswith("backbone.fpn.")]) == 40
    assert len([k for k in r.unexpected_keys if k.startswith("roi_heads.box_head.")]) == 26
    assert "maskrcnn_resnet50_fpn(" not in rep["config"]


# ------------------------------------------------------------------ fine-tuned detectors
def _finetuned(name: str, **cfg):
    from benchmark.detectors.registry import build_detector
    torch.manual_seed(0)
    model = build_detector({"name": name, "backbone": "resnet18", **cfg}, 3)
    return model, detector_to_canonical(_randomised(model.state_dict()))


def test_retinanet_torchvision_export_keeps_torchvision_names(tmp_path):
    """Defect 3: the fine-tuned RetinaNet's head is torchvision's ``head.*``; the fragment
    builds a RetinaNet (P6/P7 from C5) that takes every key."""
    _, state = _finetuned("retinanet", fpn_channels=32)
    rep = save_export(state, "torchvision", tmp_path / "tv.pth")
    assert rep["left_out"] == []
    model, missing = _assert_loads_whole(rep, groups=("",))
    assert missing == []


def test_mask_rcnn_torchvision_export_loads_whole(tmp_path):
    _, state = _finetuned("mask_rcnn", fpn_channels=32, head_norm="bn", box_head_conv_dim=32, box_head_fc_dim=64,
                          mask_head_dim=32)
    rep = save_export(state, "torchvision", tmp_path / "tv.pth")
    model, missing, unexpected = _load_fragment(rep)
    assert unexpected == [] and missing == []


# ------------------------------------------------------------------ defect 4: C4
def test_c4_exports_load_whole_or_name_what_has_no_place(tmp_path):
    model, state = _finetuned("mask_rcnn_c4")
    d2 = save_export(state, "detectron2", tmp_path / "d2.pkl")
    with open(d2["path"], "rb") as f:
        keys = set(pickle.load(f)["model"])
    assert {"res2.0.conv1.weight", "res4.1.conv2.norm.running_var", "res5.1.conv1.weight",   # bare: matching_heuristics
            "res5.norm.weight",                                                    # MoCo's Res5ROIHeadsExtraNorm
            "proposal_generator.rpn_head.objectness_logits.weight", "roi_heads.mask_head.deconv.weight",
            "roi_heads.mask_head.predictor.weight"} <= keys
    cfg = yaml.safe_load(d2["config"])["MODEL"]
    assert cfg["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm" and cfg["MASK_ON"] is True
    back = load_export(d2["path"], "detectron2")
    assert set(back) == set(state)
    for k, v in state.items():
        if k == "roi_heads.box_predictor.bbox_pred.weight" or k.endswith("mask_fcn_logits.weight"):
            n = 4 if "bbox_pred" in k else 1     # the background's slots, never used: zeros
            assert torch.equal(back[k][n:], v[n:]) and not back[k][:n].any(), k
        elif k.endswith(("bbox_pred.bias", "mask_fcn_logits.bias")):
            n = 4 if "bbox_pred" in k else 1
            assert torch.equal(back[k][n:], v[n:]), k
        else:
            assert torch.equal(back[k], v), k
    mm = save_export(state, "mmdet", tmp_path / "mm.pth")
    mkeys = set(torch.load(mm["path"])["state_dict"])
    assert {"backbone.layer3.0.conv1.weight", "roi_head.shared_head.layer4.0.conv1.weight",
            "roi_head.shared_head.norm.weight", "rpn_head.rpn_cls.weight"} <= mkeys
    assert not any(k.startswith("backbone.layer4.") for k in mkeys)
    assert set(load_export(mm["path"], "mmdet")) == set(state)
    with pytest.raises(ExportError, match=r"keys have no torchvision name: \['box_head.norm.weight'.*"
                                          r"torchvision has no C4 R-CNN"):
        save_export(state, "torchvision", tmp_path / "tv.pth")


def test_c4_rpn_anchors_are_reordered_for_detectron2():
    """torchvision orders a location's anchors ratio-major (5 sizes x 3 ratios on C4),
    detectron2 size-major: detectron2's anchor s*3+r is torchvision's r*5+s."""
    _, state = _finetuned("faster_rcnn_c4")
    state["rpn.head.cls_logits.weight"] = torch.arange(15.0).view(15, 1, 1, 1).expand(15, 256, 1, 1).clone()
    state["rpn.head.bbox_pred.bias"] = torch.arange(60.0)
    d2, _ = to_framework(state, "detectron2")
    obj = d2["proposal_generator.rpn_head.objectness_logits.weight"][:, 0, 0, 0]
    assert obj[:6].tolist() == [0, 5, 10, 1, 6, 11]                 # sizes 32 (r=0,1,2), then 64
    deltas = d2["proposal_generator.rpn_head.anchor_deltas.bias"]
    assert deltas[4:8].tolist() == [20, 21, 22, 23]                  # d2 anchor 1 = tv anchor 5 (ratio 1, size 32)
    mm, _ = to_framework(state, "mmdet")                              # mmdet: ratio-major, as torchvision
    assert torch.equal(mm["rpn_head.rpn_cls.weight"], state["rpn.head.cls_logits.weight"])


# ------------------------------------------------------------------ defect 5: class order
def test_rcnn_heads_convert_class_order_for_detectron2_and_mmdet():
    _, state = _finetuned("mask_rcnn", fpn_channels=32, box_head_conv_dim=32, box_head_fc_dim=64, mask_head_dim=32)
    state["roi_heads.box_predictor.cls_score.bias"] = torch.tensor([9.0, 1.0, 2.0])   # background, c1, c2
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.arange(12.0)
    for fw, cls, reg in (("detectron2", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
                         ("mmdet", "roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg")):
        out, left = to_framework(state, fw)
        assert left == []
        assert out[f"{cls}.bias"].tolist() == [1.0, 2.0, 9.0]        # background last
        assert out[f"{reg}.bias"].tolist() == list(range(4, 12))      # K x 4, no background group
        assert out[f"{cls}.weight"].shape == (3, 64) and out[f"{reg}.weight"].shape == (8, 64)
    d2, _ = to_framework(state, "detectron2")
    assert {"roi_heads.mask_head.mask_fcn4.weight", "proposal_generator.rpn_head.conv.weight"} <= set(d2)
    assert d2["roi_heads.mask_head.predictor.weight"].shape[0] == 2


def test_retinanet_classes_and_anchors_for_detectron2_and_mmdet(tmp_path):
    _, state = _finetuned("retinanet", fpn_channels=32)
    w = state["head.classification_head.cls_logits.bias"] = torch.arange(27.0)   # 9 anchors x 3 classes (0: bg)
    d2, left = to_framework(state, "detectron2")
    assert left == []
    # detectron2 anchor 1 (size 2^(1/3), ratio 0.5) is torchvision's anchor 1 * 3 + 0 = 3 (ratio-major)
    assert d2["head.cls_score.bias"][:4].tolist() == [1, 2, 10, 11]
    mm, _ = to_framework(state, "mmdet")
    assert mm["bbox_head.retina_cls.bias"][:4].tolist() == [1, 2, 4, 5]
    assert set(load_export(save_export(state, "mmdet", tmp_path / "m.pth")["path"], "mmdet")) == set(state)
    assert torch.equal(load_export(save_export(state, "detectron2", tmp_path / "d.pkl")["path"], "detectron2")
                       ["head.classification_head.cls_logits.bias"], torch.where(w % 3 == 0, 0.0, w))


# ------------------------------------------------------------------ defect 6: old numpy
def _globals(path) -> set[tuple[str, str]]:
    found, strings, proto = set(), [], 0
    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "PROTO":
                proto = arg
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif op.name == "STACK_GLOBAL":
                found.add((strings[-2], strings[-1]))
            elif op.name in ("GLOBAL", "INST"):
                found.add(tuple(arg.split(" ", 1)))
    return found, proto


def test_detectron2_pickle_is_readable_by_old_numpy(tmp_path):
    rep = save_export(_pretrain("r18", False, None), "detectron2", tmp_path / "d2.pkl")
    found, proto = _globals(rep["path"])
    assert proto <= 4
    assert found == {("numpy", "ndarray"), ("builtins", "bytearray")}    # no numpy._core.* reconstructor
    with open(rep["path"], "rb") as f:
        arr = pickle.load(f)["model"]["res2.0.conv1.weight"]
    assert arr.flags.writeable and arr.dtype.str == "<f4"


# ------------------------------------------------------------------ defects 2 and 7: full config keys
# detectron2's config keys and parameter shapes: tools/d2_reference.py (shared with tools/export_load_table.py)


@pytest.mark.parametrize("arch", ["r50", "r18"])
def test_detectron2_fragment_has_every_key_the_soco_export_needs(tmp_path, arch):
    rep = save_export(_pretrain(arch, True, "4conv1fc", c=256 if arch == "r50" else 64, fc=1024 if arch == "r50" else 128),
                      "detectron2", tmp_path / "d2.pkl")
    cfg = _flat(yaml.safe_load(open(rep["config_path"])))
    assert set(cfg) <= D2_KEYS
    assert cfg["MODEL.FPN.NORM"] == cfg["MODEL.RESNETS.NORM"] == cfg["MODEL.ROI_BOX_HEAD.NORM"] == "SyncBN"
    assert (cfg["MODEL.ROI_BOX_HEAD.NAME"], cfg["MODEL.ROI_BOX_HEAD.NUM_CONV"], cfg["MODEL.ROI_BOX_HEAD.NUM_FC"]) == \
        ("FastRCNNConvFCHead", 4, 1)
    assert cfg["MODEL.BACKBONE.FREEZE_AT"] == 0 and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert cfg["INPUT.FORMAT"] == "RGB" and cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert cfg["MODEL.RESNETS.DEPTH"] == (50 if arch == "r50" else 18)
    assert cfg.get("MODEL.RESNETS.RES2_OUT_CHANNELS") == (None if arch == "r50" else 64)
    with open(rep["path"], "rb") as f:
        model = pickle.load(f)["model"]
    chans = [256, 512, 1024, 2048] if arch == "r50" else [64, 128, 256, 512]
    for k, shape in _d2_shapes(cfg, chans).items():
        assert model[k].shape == shape, k
    assert not any(k.startswith(("backbone.fpn_lateral", "roi_heads.box_head.conv")) and k.endswith(".bias")
                   and ".norm." not in k for k in model)      # NORM set: detectron2's convs have no bias


def test_mmdet_fragment_retinanet_neck_and_rcnn_head(tmp_path):
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    state.update(_prefixed("fpn.", FeaturePyramidNetwork([128, 256, 512], 64, extra_blocks=LastLevelP6P7(512, 64))))
    rep = save_export(_randomised(state), "mmdet", tmp_path / "mm.pth")
    ns = runpy.run_path(rep["config_path"])
    neck = ns["model"]["neck"]
    assert neck["relu_before_extra_convs"] is True and neck["add_extra_convs"] == "on_input"
    assert (neck["start_level"], neck["num_outs"], neck["in_channels"]) == (1, 5, [64, 128, 256, 512])
    assert ns["load_from"] == rep["path"] and ns["model"]["backbone"]["style"] == "pytorch"
    rep = save_export(_pretrain("r50", True, "4conv1fc"), "mmdet", tmp_path / "soco.pth")
    m = runpy.run_path(rep["config_path"])["model"]
    assert m["roi_head"]["bbox_head"]["type"] == "Shared4Conv1FCBBoxHead"
    assert m["roi_head"]["bbox_head"]["norm_cfg"]["type"] == m["neck"]["norm_cfg"]["type"] == "SyncBN"
    assert m["backbone"]["norm_eval"] is False and m["backbone"]["frozen_stages"] == -1
    assert m["data_preprocessor"]["bgr_to_rgb"] is True


def test_a_group_with_no_place_is_listed_in_the_fragment(tmp_path):
    """InsLoc's fine-tuning extra norm after fc1 has no detectron2 module: listed, never dropped."""
    _, state = _finetuned("mask_rcnn", fpn_channels=32, box_head_conv_dim=32, box_head_fc_dim=64, mask_head_dim=32,
                          box_head_extra_norm=True)
    with pytest.raises(ExportError, match=r"keys have no detectron2 name: \['box_head.extra_norm.weight'"):
        save_export(state, "detectron2", tmp_path / "d2.pkl")
    rep = save_export(state, "detectron2", tmp_path / "d2.pkl", allow_unmapped=True)
    assert len(rep["left_out"]) == 5 and all(k.startswith("box_head.extra_norm.") for k in rep["left_out"])
    tv = save_export(state, "torchvision", tmp_path / "tv.pth")        # torchvision: the module is added
    assert "extra_norm" in tv["config"]
    model, missing, unexpected = _load_fragment(tv)
    assert unexpected == [] and missing == []


def test_mmdet_fragment_gives_the_heads_the_export_widths(tmp_path):
    """Found loading into the real mmdet (tests/test_export_mmdet.py): mmdet's defaults are R50's
    (RPN and RoI extractor 256, box head in_channels 256), so a 64-channel FPN's box head did not
    load (shape mismatch of shared_convs.0) until the fragment set the widths."""
    rep = save_export(_pretrain("r18", True, "4conv1fc", c=64, fc=128), "mmdet", tmp_path / "mm.pth")
    m = runpy.run_path(rep["config_path"])["model"]
    assert m["roi_head"]["bbox_head"]["in_channels"] == 64 and m["roi_head"]["bbox_roi_extractor"]["out_channels"] == 64
    assert m["rpn_head"] == {"in_channels": 64, "feat_channels": 64}
    _, state = _finetuned("mask_rcnn", fpn_channels=32, box_head_conv_dim=32, box_head_fc_dim=64, mask_head_dim=32)
    roi = runpy.run_path(save_export(state, "mmdet", tmp_path / "ft.pth")["config_path"])["model"]["roi_head"]
    assert roi["mask_head"]["in_channels"] == roi["mask_roi_extractor"]["out_channels"] == 32
    _, state = _finetuned("mask_rcnn_c4")      # C4: the RPN on C4 (256 at R18), the heads on res5 (512)
    m = runpy.run_path(save_export(state, "mmdet", tmp_path / "c4.pth")["config_path"])["model"]
    assert m["rpn_head"]["in_channels"] == 256 and m["roi_head"]["bbox_head"]["in_channels"] == 512
    assert m["roi_head"]["mask_head"]["in_channels"] == 512


def test_fcos_torchvision_fragment_has_the_export_classes(tmp_path):
    """The FCOS fragment built FCOS(num_classes=91) (describe did not read FCOS's classes), into
    which the 3-class head did not load."""
    _, state = _finetuned("fcos", fpn_channels=32)
    rep = save_export(state, "torchvision", tmp_path / "tv.pth")
    assert "FCOS(backbone, num_classes=3)" in rep["config"]
    model, missing = _assert_loads_whole(rep, groups=("",))
    assert missing == []
