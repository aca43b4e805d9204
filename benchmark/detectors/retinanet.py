"""RetinaNet R50-FPN (Lin et al. 2017, "Focal Loss for Dense Object Detection"): torchvision's
``RetinaNet`` over ResNet C3-C5 -> FPN P3-P5, P6/P7 from C5 (detectron2 / mmdetection
``add_extra_convs='on_input'``), 9 anchors per location (3 scales 2^{0,1/3,2/3} x 3 ratios),
focal loss (alpha 0.25, gamma 2) and L1 box loss (mmdetection), four 3x3 convs per head
branch, classification bias at prior 0.01.

Recipe (mmdetection ``retinanet_r50_fpn_{1x,2x}_coco``, detectron2 ``retinanet_R_50_FPN_*``):
SGD lr 0.01 at 16 images, 90k / 180k iterations, steps at 60k/80k and 120k/160k, linear
warm-up 500 iterations from 0.001 (mmdetection; detectron2 warms up for 1000).

Keys from a method's export: the backbone; the FPN where the method pretrained one over
C2-C5 (SoCo): its C3-C5 blocks (``fpn.inner_blocks.{1,2,3}``) go to this FPN's 0-2, its
C2 blocks have no place (unexpected), P6/P7 stay missing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from benchmark.detectors.registry import register_detector
from benchmark.detectors.base import (Detector, DetectorConfig, SGDRecipe, Transform, check_backbone,
                                      resnet_body)
from methods.config import ConfigError


@dataclass
class OneStageConfig(DetectorConfig):
    """What RetinaNet and FCOS share: ResNet + FPN P3-P7 and the test-time filtering
    (score 0.05, NMS 0.5, 1000 candidates per level, 100 detections per image)."""
    backbone: str = "resnet50"
    norm: str = "bn"                   # trainable BN (SyncBN), as every fine-tuning here
    trainable_layers: int = 5
    fpn_channels: int = 256
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_candidates: int = 1000
    detections_per_img: int = 100
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_min_size: int = 800

    def validate(self) -> None:
        check_backbone(self)


@dataclass
class RetinaNetConfig(OneStageConfig):
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # base size per level P3..P7
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4

    def validate(self) -> None:
        super().validate()
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"detector.anchor_sizes: expected 5 sizes (P3..P7), got {list(self.anchor_sizes)}")


def fpn_p3_p7(cfg: OneStageConfig, p6_from_c5: bool) -> BackboneWithFPN:
    """ResNet + FPN over C3..C5, P6 and P7 by stride-2 3x3 convs on C5 (RetinaNet) or on P5 (FCOS)."""
    body = resnet_body(cfg.backbone, cfg.norm, cfg.trainable_layers)
    c5 = body.inplanes
    extra = LastLevelP6P7(c5 if p6_from_c5 else cfg.fpn_channels, cfg.fpn_channels)
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c5 // 4, c5 // 2, c5],
                           cfg.fpn_channels, extra_blocks=extra)


_FPN_LEVEL = re.compile(r"^fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(.*)$")


def drop_background(model: nn.Module) -> nn.Module:
    """Detections of class 0 dropped at inference. Every detector here counts a background slot
    0 in ``num_classes``; the R-CNNs never predict it, but a sigmoid classifier (focal loss)
    scores it like any class: never a positive in training, yet an untrained head can rank it."""
    def hook(module, args, output):
        if module.training:
            return output
        return [{k: v[d["labels"] != 0] for k, v in d.items()} for d in output]
    model.register_forward_hook(hook)
    return model


class OneStage(Detector):
    """The key map of an FPN over C3-C5 (shared by RetinaNet and FCOS)."""
    key_map = (("fpn.", "backbone.fpn.", "fpn"), ("", "backbone.body.", "backbone"))
    # an export's C2-C5 FPN fits this C3-C5 one in part: its C2 level, and its norm layers
    # where this FPN has none, have no place (reported in the load report, marked in tables)
    loads_in_part = ("fpn",)

    @classmethod
    def detector_key(cls, key: str) -> str | None:
        m = _FPN_LEVEL.match(key)
        if m:   # a C2-C5 FPN's level i is this one's i - 1; its C2 level has no place here
            level = int(m.group(2)) - 1
            return f"backbone.fpn.{m.group(1)}.{level}.{m.group(3)}" if level >= 0 else None
        return super().detector_key(key)


@register_detector("retinanet")
class RetinaNetFPN(OneStage):
    title, feature = "RetinaNet", "FPN"
    Config = RetinaNetConfig
    Recipe = SGDRecipe
    recipes = {"1x": SGDRecipe(lr=0.01, warmup_steps=500),
               "2x": SGDRecipe(steps=180_000, lr=0.01, warmup_steps=500)}

    @classmethod
    def build(cls, cfg: RetinaNetConfig, num_classes: int) -> RetinaNet:
        backbone = fpn_p3_p7(cfg, p6_from_c5=True)
        sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
        head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
        head.regression_head._loss_type = "l1"   # mmdetection's L1 (torchvision's default too)
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head,
                          score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                          detections_per_img=cfg.detections_per_img, topk_candidates=cfg.topk_candidates,
                          fg_iou_thresh=cfg.fg_iou_thresh, bg_iou_thresh=cfg.bg_iou_thresh)
        model.transform = Transform(cfg.min_size, cfg.max_size, cfg.test_min_size)
        return drop_background(model)
