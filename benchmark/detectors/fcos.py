"""FCOS R50-FPN (Tian et al. 2019): torchvision's ``FCOS`` over ResNet C3-C5 -> FPN P3-P5,
P6/P7 from P5 (FCOS / mmdetection ``add_extra_convs='on_output'``), anchor-free: one point
per location with the level's stride as its size (regression ranges 0-64-128-256-512-inf),
GroupNorm(32) in the four-conv head towers, focal loss, GIoU box loss and centerness on the
regression branch, centre sampling radius 1.5 (the FCOS paper's improvements, as torchvision
implements them).

Recipe (mmdetection ``fcos_r50_caffe_fpn_gn-head_{1x,2x}_coco``): SGD lr 0.01 at 16 images,
90k / 180k iterations, steps at 60k/80k and 120k/160k, warm-up 500 iterations at 1/3 of the
lr (mmdetection holds it constant; here it rises linearly from 1/3), gradient clipping at
norm 35.

Keys from a method's export: as RetinaNet (backbone; a C2-C5 FPN's C3-C5 blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from benchmark.detectors.registry import register_detector
from benchmark.detectors.base import SGDRecipe, Transform
from benchmark.detectors.retinanet import OneStage, OneStageConfig, drop_background, fpn_p3_p7
from methods.config import ConfigError

STRIDES = (8, 16, 32, 64, 128)   # P3..P7


@dataclass
class FCOSConfig(OneStageConfig):
    center_sampling_radius: float = 1.5
    head_convs: int = 4

    def validate(self) -> None:
        super().validate()
        if self.fpn_channels % 32:
            raise ConfigError(f"detector.fpn_channels: GroupNorm(32) in the FCOS head needs a multiple of 32, "
                              f"got {self.fpn_channels}")


def _recipe(steps: int) -> SGDRecipe:
    return SGDRecipe(steps=steps, lr=0.01, warmup_steps=500, warmup_factor=1 / 3, grad_clip=35.0)


@register_detector("fcos")
class FCOSFPN(OneStage):
    title, feature = "FCOS", "FPN"
    Config = FCOSConfig
    Recipe = SGDRecipe
    recipes = {"1x": _recipe(90_000), "2x": _recipe(180_000)}

    @classmethod
    def build(cls, cfg: FCOSConfig, num_classes: int) -> FCOS:
        backbone = fpn_p3_p7(cfg, p6_from_c5=False)
        anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
        head = FCOSHead(cfg.fpn_channels, 1, num_classes, num_convs=cfg.head_convs)
        model = FCOS(backbone, num_classes, anchor_generator=anchors, head=head,
                     center_sampling_radius=cfg.center_sampling_radius, score_thresh=cfg.score_thresh,
                     nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
                     topk_candidates=cfg.topk_candidates)
        model.transform = Transform(cfg.min_size, cfg.max_size, cfg.test_min_size)
        return drop_background(model)
