import math

import pytest
import torch
import torchvision

from benchmark.detectors import PretrainedLoadError, UnknownDetector, build_detector, get_detector, load_pretrained
from methods.weights import read_state_dict
from benchmark.detectors.mask_rcnn import MaskRCNNConfig

MASK_RCNN = get_detector("mask_rcnn")

MICRO = dict(backbone="resnet18", fpn_channels=32, box_head_conv_dim=32, box_head_fc_dim=64,
             mask_head_dim=32, mask_head_convs=2, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
             rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
             rpn_post_nms_top_n_test=100, anchor_sizes=[8, 16, 32, 64, 128], min_size=[56, 64], max_size=107,
             test_min_size=64)


def _resnet18_export():
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def test_config_unknown_key_and_bad_type():
    with pytest.raises(ValueError, match=r"detector\.fpn_chanels: unknown key \(known: .*fpn_channels"):
        MaskRCNNConfig.from_dict({"fpn_chanels": 64})
    with pytest.raises(ValueError, match=r"detector\.fpn_channels: expected an integer"):
        MaskRCNNConfig.from_dict({"fpn_channels": "64"})
    with pytest.raises(ValueError, match=r"detector\.box_head"):
        MaskRCNNConfig.from_dict({"box_head": "3conv"})
    cfg = MaskRCNNConfig.from_dict({"min_size": [96, 128]})
    assert cfg.min_size == (96, 128) and MaskRCNNConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_defaults():
    c = MaskRCNNConfig()
    assert (c.backbone, c.fpn_channels, c.box_head, c.box_head_fc_dim) == ("resnet50", 256, "4conv1fc", 1024)
    assert (c.box_batch_size_per_image, c.rpn_batch_size_per_image, c.max_size) == (512, 256, 1333)


def test_unknown_detector_is_clear():
    with pytest.raises(UnknownDetector, match=r"detector\.name: unknown detector 'retina'.*retinanet"):
        build_detector({"name": "retina"}, 3)
    with pytest.raises(ValueError, match=r"detector\.name: 'fcos' given to the config of 'mask_rcnn'"):
        MaskRCNNConfig.from_dict({"name": "fcos"}, "mask_rcnn")


@pytest.mark.parametrize("extra", [{}, {"box_head": "2mlp", "norm": "frozen_bn", "head_norm": "bn"}])
def test_build_and_train_step(extra):
    torch.manual_seed(0)
    model = build_detector({"name": "mask_rcnn", **{**MICRO, **extra}}, num_classes=4)
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 5:30, 5:25] = 1
    masks[1, 30:60, 20:60] = 1
    targets = [{"boxes": torch.tensor([[5.0, 5, 25, 30], [20, 30, 60, 60]]), "labels": torch.tensor([1, 3]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 48, 64, dtype=torch.uint8)}]   # empty target is fine
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])
    assert out[0]["boxes"].shape[1] == 4 and out[0]["masks"].shape[1:] == (1, 64, 80)


def test_key_map():
    sd = build_detector({"name": "mask_rcnn", **MICRO}, 3).state_dict()
    for canon, det, group in [("conv1.weight", "backbone.body.conv1.weight", "backbone"),
                              ("layer4.1.bn2.running_var", "backbone.body.layer4.1.bn2.running_var", "backbone"),
                              ("fpn.layer_blocks.3.0.weight", "backbone.fpn.layer_blocks.3.0.weight", "fpn"),
                              ("box_head.5.weight", "roi_heads.box_head.5.weight", "box_head")]:
        assert MASK_RCNN.detector_key(canon) == det and det in sd and MASK_RCNN.key_group(det) == group
    assert MASK_RCNN.detector_key("fc.weight") is None
    assert MASK_RCNN.key_group("rpn.head.conv.0.0.weight") == "other"


def test_load_pretrained_resnet_export():
    model = build_detector({"name": "mask_rcnn", **MICRO}, 3)
    export = _resnet18_export()
    report = load_pretrained(model, export, MASK_RCNN)
    bb = report.groups["backbone"]
    assert bb.missing == [] and bb.mismatched == [] and bb.unexpected == []
    assert len(bb.loaded) == len(export)
    sd = model.state_dict()
    for k, v in export.items():
        assert torch.equal(sd["backbone.body." + k], v), k
    # FPN / heads were not in the export: reported missing, not an error
    assert report.groups["fpn"].missing and not report.groups["fpn"].loaded


def test_load_pretrained_fc_is_ignored_and_frozen_bn_accepts_bn_export(tmp_path):
    model = build_detector({"name": "mask_rcnn", **{**MICRO, "norm": "frozen_bn"}}, 3)
    torch.manual_seed(2)
    sd = torchvision.models.resnet18(weights=None).state_dict()   # with fc.*
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": sd}, path)
    report = load_pretrained(model, read_state_dict(path), MASK_RCNN, source=str(path))
    assert report.groups["backbone"].missing == []
    assert sorted(report.groups["other"].unexpected) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.body.layer2[0].bn1.running_mean, sd["layer2.0.bn1.running_mean"])
    d = report.to_dict()
    assert d["groups"]["backbone"]["loaded"] and "backbone" in d["summary"]


def test_load_pretrained_wrong_key_space_raises():
    model = build_detector({"name": "mask_rcnn", **MICRO}, 3)
    before = model.backbone.body.conv1.weight.clone()
    bad = {"module.encoder_q." + k: v for k, v in _resnet18_export().items()}
    with pytest.raises(PretrainedLoadError, match=r"backbone: no key loaded.*module\.encoder_q\.conv1\.weight"):
        load_pretrained(model, bad, MASK_RCNN)
    # a partial backbone is an error too
    partial = {k: v for k, v in _resnet18_export().items() if not k.startswith("layer4.")}
    with pytest.raises(PretrainedLoadError, match="missing"):
        load_pretrained(model, partial, MASK_RCNN)
    wrong_shape = dict(_resnet18_export(), **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(PretrainedLoadError, match="shape-mismatched"):
        load_pretrained(model, wrong_shape, MASK_RCNN)
    assert torch.equal(model.backbone.body.conv1.weight, before)   # a refused load changes nothing


def test_load_pretrained_detector_export_with_heads():
    """AlignDet-style export: the whole detector minus the classifiers; require all groups."""
    torch.manual_seed(3)
    src = build_detector({"name": "mask_rcnn", **MICRO}, 5)
    export = {k: v for k, v in src.state_dict().items()     # in the detector's own key space
              if "box_predictor" not in k and "mask_predictor" not in k}
    dst = build_detector({"name": "mask_rcnn", **MICRO}, 3)
    report = load_pretrained(dst, export, MASK_RCNN, require=("backbone", "fpn", "box_head"))
    assert not report.groups["box_head"].missing
    assert torch.equal(dst.roi_heads.box_head[0][0].weight, src.roi_heads.box_head[0][0].weight)
    assert torch.equal(dst.backbone.fpn.inner_blocks[0][0].weight, src.backbone.fpn.inner_blocks[0][0].weight)


def test_load_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt: cannot read"):
        read_state_dict(bad)
    odd = tmp_path / "odd.pt"
    torch.save({"state_dict": {"conv1.weight": 3}}, odd)
    with pytest.raises(ValueError, match="odd.pt: field 'state_dict'"):
        read_state_dict(odd)


def test_detr_backbone_computes_torchvisions_resnet():
    """The key map torchvision ResNet -> transformers' ResNet is exact: same weights, same C5."""
    detr = get_detector("detr")
    model = build_detector({"name": "detr", "backbone": "resnet18", "d_model": 32, "encoder_layers": 1,
                            "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 64, "num_queries": 5}, 3)
    torch.manual_seed(4)
    tv = torchvision.models.resnet18(weights=None)
    for m in tv.modules():   # non-trivial BN statistics, so a swapped BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    report = load_pretrained(model, {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, detr)
    assert not report.groups["backbone"].missing and not report.groups["backbone"].unexpected
    tv.eval()
    x = torch.rand(1, 3, 64, 64)
    c5 = torch.nn.Sequential(*list(tv.children())[:-2])(x)
    out = model.detr.model.backbone.model(x).feature_maps[-1]
    torch.testing.assert_close(out, c5, rtol=1e-4, atol=1e-4)


def test_c4_heads_share_res5_and_take_layer4():
    c4 = get_detector("mask_rcnn_c4")
    model = build_detector({"name": "mask_rcnn_c4", "backbone": "resnet18", "min_size": [64], "max_size": 80,
                            "test_min_size": 64, "mask_head_dim": 16}, 3)
    sd = model.state_dict()
    assert not any(k.startswith("roi_heads.mask_head") for k in sd)          # one copy of res5
    assert "roi_heads.box_head.norm.weight" in sd and c4.key_group("roi_heads.box_head.norm.weight") == "box_head"
    assert c4.detector_key("layer4.0.conv1.weight") == "roi_heads.box_head.res5.0.conv1.weight"
    assert c4.detector_key("layer3.0.conv1.weight") == "backbone.layer3.0.conv1.weight"
    report = load_pretrained(model, _resnet18_export(), c4)
    assert len(report.groups["backbone"].loaded) == len(_resnet18_export())
    assert report.groups["box_head"].missing == [f"roi_heads.box_head.norm.{k}" for k in
                                                 ("weight", "bias", "running_mean", "running_var")]
    assert model.roi_heads.mask_head.__self__ is model.roi_heads.box_head


def test_detr_trainable_bn_keeps_the_key_space():
    small = {"name": "detr", "backbone": "resnet18", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
             "attention_heads": 2, "ffn_dim": 64, "num_queries": 5}
    frozen = build_detector(small, 3)
    bn = build_detector({**small, "norm": "bn"}, 3)
    strip = {k for k in bn.state_dict() if not k.endswith("num_batches_tracked")}
    assert strip == set(frozen.state_dict())
    bns = [m for m in bn.detr.model.backbone.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20 and all(m.weight.requires_grad for m in bns)   # stem + 8 blocks x 2 + 3 shortcuts
    assert not any(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in bn.modules())
