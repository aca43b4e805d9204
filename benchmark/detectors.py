"""Detector builders for fine-tuning, and the canonical key space pretrained weights travel in.

One builder, ``build_detector(cfg, num_classes)``: torchvision's ``MaskRCNN`` over a
``BackboneWithFPN`` (torchvision ResNet, P2-P5 + max-pool P6), with the FPN, RPN, box head
and mask head sized from ``DetectorConfig`` so the tiny scale can shrink them.

Canonical key space (DESIGN.md, "The method interface"): what ``method.export()`` writes.

=========  ==========================================  ====================================
group      canonical key                               detector key
=========  ==========================================  ====================================
backbone   ``conv1.weight``, ``layer1.0.bn1.running_mean``  ``backbone.body.<same>``
fpn        ``fpn.inner_blocks.0.0.weight``             ``backbone.fpn.<same>``
box_head   ``box_head.0.0.weight`` (FastRCNNConvFCHead)  ``roi_heads.box_head.<same>``
other      ``rpn.*``, ``roi_heads.*`` (AlignDet)       unchanged
=========  ==========================================  ====================================

``load_pretrained`` maps canonical keys (or detector keys, passed through) into a detector
and reports, per group, what loaded, what is missing, unexpected or of the wrong shape.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from methods.base import dataclass_from_dict
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

log = logging.getLogger(__name__)

DETECTORS = ("mask_rcnn", "fcos", "retinanet", "detr")
IMPLEMENTED = ("mask_rcnn",)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
NORMS = ("bn", "frozen_bn")
HEAD_NORMS = ("none", "bn")
BOX_HEADS = ("4conv1fc", "2mlp")
GROUPS = ("backbone", "fpn", "box_head", "other")


# --------------------------------------------------------------------------- config
@dataclass
class DetectorConfig:
    """Detector architecture. Defaults: Mask R-CNN R50-FPN as fine-tuned by MoCo v2 / SoCo /
    PixPro (detectron2 ``Base-RCNN-FPN.yaml``; He et al. 2017, Mask R-CNN)."""
    name: str = "mask_rcnn"            # mask_rcnn | (fcos | retinanet | detr: not yet)
    backbone: str = "resnet50"         # any torchvision ResNet factory, weights=None
    # "bn": trainable BatchNorm, SyncBN under torch.distributed (MoCo Sec. 4.2 / SoCo
    # fine-tuning recipe: "SyncBN ... in backbone, FPN and heads"); "frozen_bn": detectron2's
    # default for supervised ImageNet weights.
    norm: str = "bn"
    head_norm: str = "none"            # "bn": BN (SyncBN) also in FPN, box and mask heads
    fpn_channels: int = 256
    box_head: str = "4conv1fc"         # FastRCNNConvFCHead (SoCo's pretraining uses it) | 2mlp
    box_head_conv_dim: int = 256
    box_head_num_convs: int = 4
    box_head_fc_dim: int = 1024
    mask_head_dim: int = 256
    mask_head_convs: int = 4
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch_size_per_image: int = 256
    # detectron2 Base-RCNN-FPN: PRE_NMS_TOPK_TRAIN 2000 (per level), _TEST 1000,
    # POST_NMS_TOPK_TRAIN/TEST 1000 (per image)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    # multi-scale training of MoCo's detectron2 configs (INPUT.MIN_SIZE_TRAIN)
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_min_size: int = 800
    trainable_layers: int = 5          # 5 = whole backbone trains (MoCo/SoCo fine-tuning)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DetectorConfig":
        cfg = dataclass_from_dict(cls, d, "detector")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        def choice(key, allowed):
            if getattr(self, key) not in allowed:
                raise ValueError(f"detector.{key}: unknown {getattr(self, key)!r} ({' | '.join(allowed)})")
        choice("name", DETECTORS)
        choice("backbone", BACKBONES)
        choice("norm", NORMS)
        choice("head_norm", HEAD_NORMS)
        choice("box_head", BOX_HEADS)
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"detector.trainable_layers: expected 0..5, got {self.trainable_layers}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"detector.anchor_sizes: expected 5 sizes (P2..P6), got {list(self.anchor_sizes)}")
        if not self.min_size:
            raise ValueError("detector.min_size: expected at least one size")


# --------------------------------------------------------------------------- building
class _Transform(GeneralizedRCNNTransform):
    """torchvision's transform with a separate test size (training draws from ``min_size``)."""

    def __init__(self, min_size, max_size, test_min_size: int, **kw):
        super().__init__(min_size, max_size, **kw)
        self.test_min_size = test_min_size

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        train_sizes, self.min_size = self.min_size, (self.test_min_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = train_sizes


def _norm_layer(kind: str):
    return FrozenBatchNorm2d if kind == "frozen_bn" else nn.BatchNorm2d


def build_backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    """ResNet (weights=None) + FPN over C2..C5 with a max-pooled P6 ('pool')."""
    body = getattr(tv_resnet, cfg.backbone)(weights=None, norm_layer=_norm_layer(cfg.norm))
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        train.append("bn1")
    for n, p in body.named_parameters():
        if not any(n.startswith(t) for t in train):
            p.requires_grad_(False)
    c2 = body.inplanes // 8  # 64 for basic blocks, 256 for bottlenecks
    return BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [c2, c2 * 2, c2 * 4, c2 * 8], cfg.fpn_channels, extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if cfg.head_norm == "bn" else None)


def build_box_head(cfg: DetectorConfig) -> nn.Module:
    c = cfg.fpn_channels
    if cfg.box_head == "4conv1fc":
        return FastRCNNConvFCHead((c, 7, 7), [cfg.box_head_conv_dim] * cfg.box_head_num_convs,
                                  [cfg.box_head_fc_dim],
                                  norm_layer=nn.BatchNorm2d if cfg.head_norm == "bn" else None)
    return TwoMLPHead(c * 7 * 7, cfg.box_head_fc_dim)


def build_detector(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    """Detector for ``num_classes`` classes including background."""
    if isinstance(cfg, dict):
        cfg = DetectorConfig.from_dict(cfg)
    if cfg.name not in IMPLEMENTED:
        raise NotImplementedError(f"detector.name: {cfg.name!r} is planned but not implemented yet "
                                  f"(available: {', '.join(IMPLEMENTED)})")
    backbone = build_backbone(cfg)
    c = cfg.fpn_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * 5)
    rpn_head = RPNHead(c, anchors.num_anchors_per_location()[0])
    levels = ["0", "1", "2", "3"]
    head_norm = nn.BatchNorm2d if cfg.head_norm == "bn" else None
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=build_box_head(cfg),
        box_predictor=FastRCNNPredictor(cfg.box_head_fc_dim, num_classes),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [cfg.mask_head_dim] * cfg.mask_head_convs, 1, norm_layer=head_norm),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_dim, cfg.mask_head_dim, num_classes),
    )
    _init_predictors(model)
    model.transform = _Transform(cfg.min_size, cfg.max_size, cfg.test_min_size,
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return model


def _init_predictors(model: MaskRCNN) -> None:
    """detectron2's initialisation of the final layers (FastRCNNOutputLayers: cls_score
    N(0, 0.01), bbox_pred N(0, 0.001); MaskRCNNConvUpsampleHead: predictor N(0, 0.001)).
    torchvision's default Linear init gives large initial logits and diverges at lr 0.02."""
    pred = model.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, std=0.01)
    nn.init.normal_(pred.bbox_pred.weight, std=0.001)
    for layer in (pred.cls_score, pred.bbox_pred):
        nn.init.zeros_(layer.bias)
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    nn.init.normal_(logits.weight, std=0.001)
    nn.init.zeros_(logits.bias)


def maybe_sync_bn(model: nn.Module) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when torch.distributed runs on GPUs (SyncBN
    recipe of MoCo/SoCo fine-tuning). On CPU (gloo) SyncBN has no kernel: BN stays per rank."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if next(model.parameters()).device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.warning("distributed on CPU: BatchNorm statistics stay per process (no SyncBN kernel)")
    return model


# --------------------------------------------------------------------------- key spaces
_TO_CANON = (("backbone.body.", ""), ("backbone.fpn.", "fpn."), ("roi_heads.box_head.", "box_head."))


def _detector_key(k: str) -> str | None:
    """Canonical (or detector) key -> detector key; None for keys with no place (``fc.*``)."""
    if k.startswith(("backbone.", "rpn.", "roi_heads.")):
        return k  # already a detector key (e.g. AlignDet's export, a model_final.pt)
    if k.startswith("fpn."):
        return "backbone." + k
    if k.startswith("box_head."):
        return "roi_heads." + k
    if k.startswith("fc."):
        return None
    return "backbone.body." + k


def detector_to_canonical(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        for a, b in _TO_CANON:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    return out


def canonical_to_detector(state_dict: dict) -> dict:
    return {dk: v for k, v in state_dict.items() if (dk := _detector_key(k)) is not None}


def key_group(detector_key: str) -> str:
    if detector_key.startswith("backbone.body."):
        return "backbone"
    if detector_key.startswith("backbone.fpn."):
        return "fpn"
    if detector_key.startswith("roi_heads.box_head."):
        return "box_head"
    return "other"


# --------------------------------------------------------------------------- loading
@dataclass
class GroupReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # "key: file (shape) vs model (shape)"


@dataclass
class LoadReport:
    groups: dict[str, GroupReport] = field(default_factory=lambda: {g: GroupReport() for g in GROUPS})
    source: str = ""

    def to_dict(self) -> dict:
        return {"source": self.source,
                "groups": {g: dataclasses.asdict(r) for g, r in self.groups.items()},
                "summary": self.summary()}

    def summary(self) -> str:
        return "; ".join(f"{g}: {len(r.loaded)} loaded, {len(r.missing)} missing, "
                         f"{len(r.unexpected)} unexpected, {len(r.mismatched)} shape-mismatched"
                         for g, r in self.groups.items())

    def save(self, path: Path) -> None:
        from benchmark.fsutil import atomic_write_json
        atomic_write_json(path, self.to_dict())


class PretrainedLoadError(RuntimeError):
    """Pretrained weights did not fit the detector (wrong key space, missing keys)."""


def _ignorable(k: str) -> bool:
    return k.endswith("num_batches_tracked")


def load_pretrained(model: nn.Module, state: dict, *, require: tuple[str, ...] = ("backbone",),
                    source: str = "<state dict>") -> LoadReport:
    """Load canonical-key weights into ``model`` (strict=False) and report per group.

    Raises ``PretrainedLoadError`` (and loads nothing) if a group in ``require`` got no key
    at all, misses any key, or has a shape mismatch. Other groups' problems are logged and
    reported only.
    """
    target = model.module if hasattr(model, "module") else model
    own = target.state_dict()
    mapped = {}
    report = LoadReport(source=source)
    for k, v in state.items():
        dk = _detector_key(k)
        if dk is None:
            report.groups["other"].unexpected.append(k)
            continue
        mapped[dk] = v
    to_load = {}
    for dk, v in mapped.items():
        g = report.groups[key_group(dk)]
        if dk not in own:
            if not _ignorable(dk):
                g.unexpected.append(dk)
        elif not torch.is_tensor(v):
            g.mismatched.append(f"{dk}: file has {type(v).__name__}, model expects a tensor")
        elif tuple(v.shape) != tuple(own[dk].shape):
            g.mismatched.append(f"{dk}: file {tuple(v.shape)} vs model {tuple(own[dk].shape)}")
        else:
            to_load[dk] = v
            g.loaded.append(dk)
    for dk in own:
        if dk not in mapped and not _ignorable(dk):
            report.groups[key_group(dk)].missing.append(dk)
    log.info("pretrained weights %s: %s", source, report.summary())
    problems = []
    for g in require:
        if g not in report.groups:
            raise ValueError(f"load_pretrained: unknown group {g!r} in require ({', '.join(GROUPS)})")
        r = report.groups[g]
        if not r.loaded:
            example = next(iter(state), "<empty>")
            problems.append(f"{g}: no key loaded (first key in file: {example!r}; expected the canonical "
                            f"key space, e.g. 'conv1.weight', 'fpn.inner_blocks.0.0.weight', "
                            f"'box_head.0.0.weight')")
        elif r.missing or r.mismatched:
            problems.append(f"{g}: {len(r.missing)} missing (e.g. {r.missing[:3]}), "
                            f"{len(r.mismatched)} shape-mismatched (e.g. {r.mismatched[:3]})")
    if problems:
        raise PretrainedLoadError(f"{source}: pretrained weights do not fit the detector: " + "; ".join(problems))
    target.load_state_dict(to_load, strict=False)   # only after the checks: a refusal changes nothing
    return report


def load_weights_file(path: str | Path) -> dict:
    """Read a ``weights.pt`` (``{"state_dict": ...}``) or a bare state dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot read pretrained weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: field 'state_dict': expected a non-empty dict of tensors, "
                         f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{path}: field 'state_dict': entries that are not name -> tensor, e.g. {bad[:3]}")
    return obj

