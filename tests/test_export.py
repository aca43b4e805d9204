"""Weights out: key sets against the names detectron2, mmdetection and torchvision use for R50,
bit-exact round trips through the files, unmapped keys named, the ``detbench export`` command.

Reference names (facts, not code): detectron2 ``modeling/backbone/resnet.py`` (``stem.conv1``,
``res{2..5}.{block}.conv{1..3}`` with ``.norm``, ``shortcut`` on block 0), ``fpn.py``
(``fpn_lateral{2..5}``, ``fpn_output{2..5}``, ``top_block.p6/p7``), ``roi_heads/box_head.py``
(``conv{k}``, ``fc{k}``); mmdetection ``backbones/resnet.py`` (torchvision names), ``necks/fpn.py``
(``lateral_convs``, ``fpn_convs``, mmcv ``ConvModule`` = ``conv`` + ``bn``),
``bbox_heads/convfc_bbox_head.py`` (``shared_convs``, ``shared_fcs``). R50 depths 3-4-6-3."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from benchmark.stages.export import (ExportError, export_run, from_framework, load_export, save_export,
                                     to_framework)

R50_DEPTHS = (3, 4, 6, 3)
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _randomised(state: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + 7)
            for k, v in state.items()}


def _prefixed(prefix: str, m: nn.Module) -> dict:
    return {f"{prefix}{k}": v for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def r50_fpn_4conv1fc() -> dict:
    """Canonical state of an R50 + FPN (C2-C5, no norm) + 4conv1fc box head with BN."""
    torch.manual_seed(0)
    state = {k: v for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    state.update(_prefixed("fpn.", FeaturePyramidNetwork([256, 512, 1024, 2048], 256)))
    state.update(_prefixed("box_head.", FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024],
                                                           norm_layer=nn.BatchNorm2d)))
    return _randomised(state)


def _d2_resnet_names() -> set[str]:
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{p}" for p in BN}
    for stage, depth in enumerate(R50_DEPTHS, start=2):
        for b in range(depth):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if b == 0 else [])
            for c in convs:
                names.add(f"res{stage}.{b}.{c}.weight")
                names |= {f"res{stage}.{b}.{c}.norm.{p}" for p in BN}
    return names


def _mmdet_resnet_names() -> set[str]:
    names = {"backbone.conv1.weight"} | {f"backbone.bn1.{p}" for p in BN}
    for stage, depth in enumerate(R50_DEPTHS, start=1):
        for b in range(depth):
            pre = f"backbone.layer{stage}.{b}"
            for j in (1, 2, 3):
                names.add(f"{pre}.conv{j}.weight")
                names |= {f"{pre}.bn{j}.{p}" for p in BN}
            if b == 0:
                names.add(f"{pre}.downsample.0.weight")
                names |= {f"{pre}.downsample.1.{p}" for p in BN}
    return names


def test_detectron2_names_for_r50_fpn(r50_fpn_4conv1fc):
    mapped, unmapped = to_framework(r50_fpn_4conv1fc, "detectron2")
    resnet = _d2_resnet_names()
    assert len(resnet) == 265 + 53          # 265 parameters and statistics (MSRA R-50.pkl) + 53 BN counters
    assert {"res2.0.conv1.weight", "res2.0.conv1.norm.running_mean", "res2.0.shortcut.weight",
            "res5.2.conv3.norm.running_var", "stem.conv1.norm.bias"} <= resnet
    fpn = {f"backbone.fpn_{kind}{lvl}.{p}" for kind in ("lateral", "output") for lvl in (2, 3, 4, 5)
           for p in ("weight", "bias")}
    head = ({f"roi_heads.box_head.conv{k}.weight" for k in (1, 2, 3, 4)}
            | {f"roi_heads.box_head.conv{k}.norm.{p}" for k in (1, 2, 3, 4) for p in BN}
            | {"roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias"})
    assert unmapped == [] and set(mapped) == resnet | fpn | head
    assert mapped["backbone.fpn_lateral2.weight"].shape == (256, 256, 1, 1)     # C2 feeds fpn_lateral2
    assert mapped["backbone.fpn_lateral5.weight"].shape == (256, 2048, 1, 1)
    assert mapped["roi_heads.box_head.fc1.weight"].shape == (1024, 256 * 7 * 7)


def test_mmdet_names_for_r50_fpn(r50_fpn_4conv1fc):
    mapped, unmapped = to_framework(r50_fpn_4conv1fc, "mmdet")
    neck = {f"neck.{kind}.{i}.conv.{p}" for kind in ("lateral_convs", "fpn_convs") for i in range(4)
            for p in ("weight", "bias")}
    head = ({f"roi_head.bbox_head.shared_convs.{i}.conv.weight" for i in range(4)}
            | {f"roi_head.bbox_head.shared_convs.{i}.bn.{p}" for i in range(4) for p in BN}
            | {"roi_head.bbox_head.shared_fcs.0.weight", "roi_head.bbox_head.shared_fcs.0.bias"})
    assert unmapped == [] and set(mapped) == _mmdet_resnet_names() | neck | head
    assert mapped["neck.lateral_convs.3.conv.weight"].shape == (256, 2048, 1, 1)


def test_torchvision_names_are_the_v2_detectors():
    """torchvision's own Faster R-CNN v2 (FPN with BN, 4conv1fc with BN) is the reference."""
    det = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=21).state_dict()
    keep = ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.")
    ref = {k for k in det if k.startswith(keep)}
    canon = {}
    for k in ref:
        for a, b in (("backbone.body.", ""), ("backbone.fpn.", "fpn."), ("roi_heads.box_head.", "box_head.")):
            if k.startswith(a):
                canon[b + k[len(a):]] = det[k]
    mapped, unmapped = to_framework(canon, "torchvision")
    assert unmapped == [] and set(mapped) == ref
    d2, _ = to_framework(canon, "detectron2")      # FPN with norm: detectron2's ``.norm``
    assert "backbone.fpn_lateral3.norm.running_var" in d2 and "backbone.fpn_output5.norm.weight" in d2
    mm, _ = to_framework(canon, "mmdet")
    assert "neck.lateral_convs.1.bn.running_var" in mm and "neck.fpn_convs.3.conv.weight" in mm


@pytest.mark.parametrize("framework", ["detectron2", "mmdet", "torchvision"])
def test_round_trip_through_the_file_is_bit_exact(r50_fpn_4conv1fc, tmp_path, framework):
    path = tmp_path / f"w.{framework}"
    rep = save_export(r50_fpn_4conv1fc, framework, path)
    assert rep["keys"] == len(r50_fpn_4conv1fc) and rep["left_out"] == []
    back = load_export(path, framework)
    assert set(back) == set(r50_fpn_4conv1fc)
    for k, v in r50_fpn_4conv1fc.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_detectron2_file_format(r50_fpn_4conv1fc, tmp_path):
    save_export(r50_fpn_4conv1fc, "detectron2", tmp_path / "w.pkl", meta={"run": "abc"})
    with open(tmp_path / "w.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and isinstance(obj["__author__"], str)
    assert all(type(v).__module__ == "numpy" for v in obj["model"].values())
    assert obj["detbench"] == {"run": "abc", "left_out": [], "kind": "pretrain", "ratios": 3}


def test_basic_blocks_two_mlp_head_and_p6p7_levels(tmp_path):
    """ResNet-18 (the tiny scale), an FPN from C3 with P6/P7 (RetinaNet/FCOS), a 2-fc head."""
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    state.update(_prefixed("fpn.", FeaturePyramidNetwork([128, 256, 512], 64, extra_blocks=LastLevelP6P7(64, 64))))
    state.update(_prefixed("box_head.", TwoMLPHead(64 * 49, 128)))
    state = _randomised(state)
    d2, unmapped = to_framework(state, "detectron2")
    assert unmapped == []
    assert {"res2.1.conv2.norm.weight", "res3.0.shortcut.norm.running_mean", "backbone.fpn_lateral3.weight",
            "backbone.fpn_output5.bias", "backbone.top_block.p6.weight", "backbone.top_block.p7.bias",
            "roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc2.bias"} <= set(d2)
    assert not any("fpn_lateral2" in k or "conv3" in k for k in d2)
    mm, _ = to_framework(state, "mmdet")
    assert {"neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.weight", "neck.fpn_convs.4.conv.bias",
            "roi_head.bbox_head.shared_fcs.1.weight"} <= set(mm)
    assert mm["neck.lateral_convs.0.conv.weight"].shape[1] == 128
    for fw in ("detectron2", "mmdet", "torchvision"):
        save_export(state, fw, tmp_path / fw)
        back = load_export(tmp_path / fw, fw)
        assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items()), fw


def test_group_norm_is_mmcv_gn_and_reads_back():
    """mmcv ConvModule names a GroupNorm ``gn`` (a BatchNorm ``bn``); detectron2 ``.norm`` either way."""
    gn = lambda c: nn.GroupNorm(8, c)
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    state.update(_prefixed("fpn.", FeaturePyramidNetwork([64, 128, 256, 512], 32, norm_layer=gn)))
    state.update(_prefixed("box_head.", FastRCNNConvFCHead((32, 7, 7), [32] * 2, [64], norm_layer=gn)))
    state = _randomised(state)
    mm, unmapped = to_framework(state, "mmdet")
    assert unmapped == []
    assert {"neck.lateral_convs.0.gn.weight", "neck.fpn_convs.3.gn.bias", "roi_head.bbox_head.shared_convs.1.gn.weight",
            "roi_head.bbox_head.shared_fcs.0.weight"} <= set(mm) and not any(".bn." in k for k in mm)
    d2, _ = to_framework(state, "detectron2")
    assert {"backbone.fpn_lateral2.norm.weight", "roi_heads.box_head.conv2.norm.bias"} <= set(d2)
    for fw, out in (("mmdet", mm), ("detectron2", d2)):
        back = from_framework(out, fw)
        assert set(back) == set(state) and all(back[k] is v for k, v in state.items()), fw


def test_framework_keys_with_no_canonical_name_are_named(r50_fpn_4conv1fc):
    mm, _ = to_framework(r50_fpn_4conv1fc, "mmdet")
    odd = {**mm, "neck.fpn_convs.4.gn.weight": torch.zeros(1), "roi_head.bbox_head.fc_cls.weight": torch.zeros(1)}
    with pytest.raises(ExportError, match=r"2 mmdet keys have no canonical name: "
                                          r"\['neck.fpn_convs.4.gn.weight', 'roi_head.bbox_head.fc_cls.weight'\]"):
        from_framework(odd, "mmdet")
    tv, _ = to_framework(r50_fpn_4conv1fc, "torchvision")
    with pytest.raises(ExportError, match=r"1 torchvision keys have no canonical name: \['backbone.other.weight'\]"):
        from_framework({**tv, "backbone.other.weight": torch.zeros(1)}, "torchvision")


def test_unmapped_keys_are_named_never_dropped(r50_fpn_4conv1fc, tmp_path):
    state = {**r50_fpn_4conv1fc, "fc.weight": torch.zeros(3, 2048), "rpn.head.extra.weight": torch.zeros(3)}
    with pytest.raises(ExportError, match=r"2 keys have no detectron2 name: \['fc.weight', 'rpn.head.extra.weight'\]"):
        save_export(state, "detectron2", tmp_path / "a.pkl")
    assert not (tmp_path / "a.pkl").exists()
    rep = save_export(state, "mmdet", tmp_path / "b.pth", allow_unmapped=True)
    assert rep["left_out"] == ["fc.weight", "rpn.head.extra.weight"]
    assert torch.load(tmp_path / "b.pth")["meta"]["detbench"]["left_out"] == rep["left_out"]
    _, unmapped = to_framework(state, "torchvision")   # rpn.* already has its torchvision name
    assert unmapped == ["fc.weight"]
    with pytest.raises(ExportError, match="unknown framework 'caffe'"):
        to_framework(state, "caffe")


K1, K2 = "0123456789abcdef", "fedcba9876543210"   # run keys: 16 hex digits


def _store_with_run(root, state):
    from benchmark.runs.store import RunStore
    store = RunStore(root)
    cfg = {"stage": "pretrain", "method": {"name": "moco_v2"}, "seed": 0, "label": "pretrain/moco_v2/seed0"}
    d = store.begin(K1, cfg)
    torch.save({"state_dict": state, "method": "moco_v2"}, d / "weights.pt")
    store.finish(K1, {"steps": 1})
    store.begin(K2, {**cfg, "seed": 1})      # unfinished
    return store


def test_export_command(isolated, capsys):
    from benchmark.cli import main
    state = _randomised({k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")})
    store = _store_with_run(isolated / "runs", state)
    assert main(["export", "--run", K1, "--to", "detectron2"]) == 0
    out = capsys.readouterr().out
    report, _, fragment = out.partition("\n\n# ")   # the JSON report, then the config fragment to copy
    rep = json.loads(report)
    assert rep["path"] == str(isolated / "results" / "exports" / K1 / "detectron2.pkl")
    assert rep["config_path"].endswith("detectron2.yaml") and "config" not in rep
    head, _, config = fragment.partition(":\n")
    assert head == rep["config_path"] and open(rep["config_path"]).read() == config.removesuffix("\n")
    assert "STRIDE_IN_1X1: False" in config and "FREEZE_AT: 0" in config
    with open(rep["path"], "rb") as f:
        assert pickle.load(f)["detbench"]["method"] == "moco_v2"
    assert main(["export", "--run", K1, "--to", "mmdet", "--out", str(isolated / "x.pth")]) == 0
    back = load_export(isolated / "x.pth", "mmdet")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert main(["export", "--run", K2, "--to", "mmdet"]) == 2
    assert "is interrupted, not done" in capsys.readouterr().err
    assert main(["export", "--run", "00000000deadbeef", "--to", "mmdet"]) == 2
    assert "no run '00000000deadbeef'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown framework"):
        export_run(store, K1, "caffe")


def test_fine_tuned_model_exports_its_parts(isolated, capsys):
    """A fine-tuning run's model_final.pt: backbone, FPN and box head renamed; RPN, box predictor
    and mask head converted for detectron2 (issue 26 defect 5) and read back."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from benchmark.runs.store import RunStore
    store = RunStore(isolated / "runs")
    d = store.begin("ft", {"stage": "finetune", "seed": 0})
    model = MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=3)
    torch.save({"state_dict": model.state_dict(), "num_classes": 3}, d / "model_final.pt")
    store.finish("ft", {"steps": 1})
    rep = export_run(store, "ft", "detectron2")
    assert rep["left_out"] == [] and rep["no_place"] == []
    back = load_export(rep["path"], "detectron2")
    assert torch.equal(back["box_head.fc7.weight"], model.roi_heads.box_head.fc7.weight)
    assert torch.equal(back["fpn.layer_blocks.3.0.bias"], model.backbone.fpn.layer_blocks[3][0].bias)
    assert torch.equal(back["roi_heads.box_predictor.cls_score.weight"], model.roi_heads.box_predictor.cls_score.weight)
    rep = export_run(store, "ft", "torchvision")
    assert rep["left_out"] == [] and set(torch.load(rep["path"])) == set(model.state_dict())


def test_fpn_levels_must_be_readable():
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    state.update(_prefixed("fpn.", FeaturePyramidNetwork([100, 200], 32)))
    with pytest.raises(ExportError, match="100 input channels match no ResNet stage"):
        to_framework(state, "detectron2")
