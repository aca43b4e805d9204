"""Faster R-CNN R50-C4 (Ren et al. 2015; detectron2 ``Base-RCNN-C4.yaml``) as MoCo fine-tunes
it for VOC and the C4 rows of InsLoc / SoCo: the RPN and a 14x14 RoIAlign read C4 (stride
16); res5 is the RoI head (stride 2 -> 7x7, average-pooled), followed by the "extra norm" of
MoCo's detectron2 config (``Res5ROIHeadsExtraNorm`` in moco/detection/train_net.py: one BN
after res5, "as described in the MoCo paper").

Keys from a method's export: the whole ResNet is the backbone group (``layer4.*`` goes to
``roi_heads.box_head.res5.*``, the rest to ``backbone.*``); the extra norm is the box_head group (no export has it).
An FPN or a 4conv1fc box head (SoCo's) has no place here and is reported as unexpected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from benchmark.detectors.registry import register_detector
from benchmark.detectors.base import Detector, SGDRecipe, Transform, check_backbone, norm_layer, resnet_body
from benchmark.detectors.mask_rcnn import init_predictors
from benchmark.detectors.rcnn import RCNNConfig, RCNNRoIHeads, RoIPooler


@dataclass
class RCNNC4Config(RCNNConfig):
    """Defaults: detectron2 ``Base-RCNN-C4.yaml`` with MoCo's ``Base-RCNN-C4-BN.yaml``
    (SyncBN everywhere, nothing frozen, the extra norm after res5)."""
    backbone: str = "resnet50"
    norm: str = "bn"                   # SyncBN under torch.distributed
    res5_norm: bool = True             # MoCo's extra BN after res5
    trainable_layers: int = 5          # MoCo: RESNETS.FREEZE_AT 0
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # all on the one C4 level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch_size_per_image: int = 256
    # detectron2 Base-RCNN-C4: PRE_NMS_TOPK_TRAIN 12000, POST 2000; TEST 6000, POST 1000
    rpn_pre_nms_top_n_train: int = 12000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    mask_head_dim: int = 256           # Mask R-CNN C4: one 2x2 deconv to 256, then the logits
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_min_size: int = 800

    def validate(self) -> None:
        super().validate()
        check_backbone(self)


class Res5Head(nn.Module):
    """res5 on 14x14 RoI features (stride 2 in its first block -> 7x7), MoCo's extra norm,
    then the mean over space: one vector per RoI (detectron2 ``Res5ROIHeads``)."""

    def __init__(self, res5: nn.Module, out_channels: int, norm: nn.Module | None):
        super().__init__()
        self.res5 = res5
        self.norm = norm
        self.out_channels = out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res5(x)
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def c4_parts(cfg: RCNNC4Config):
    """(C4 backbone with ``out_channels``, res5 box head)."""
    body = resnet_body(cfg.backbone, cfg.norm, cfg.trainable_layers)
    c5 = body.inplanes
    res5 = body.layer4
    backbone = IntermediateLayerGetter(body, {"layer3": "0"})   # drops layer4, avgpool, fc
    backbone.out_channels = c5 // 2
    norm = norm_layer(cfg.norm)(c5) if cfg.res5_norm else None
    return backbone, Res5Head(res5, c5, norm)


@register_detector("faster_rcnn_c4")
class FasterRCNNC4(Detector):
    title, feature = "Faster R-CNN", "C4"
    Config = RCNNC4Config
    Recipe = SGDRecipe
    # MoCo's COCO C4 configs (coco_R_50_C4_{1x,2x}_moco.yaml): detectron2's 1x / 2x
    # 24k: the VOC07+12 protocol (MoCo detection/configs/pascal_voc_R_50_C4_24k.yaml: lr 0.02 at
    # batch 16, steps at 18k and 22k, 100 warm-up iterations)
    recipes = {"1x": SGDRecipe(), "2x": SGDRecipe(steps=180_000),
               "24k": SGDRecipe(steps=24_000, milestones=(18 / 24, 22 / 24), warmup_steps=100)}
    key_map = (("layer4.", "roi_heads.box_head.res5.", "backbone"), ("", "backbone.", "backbone"),
               (None, "roi_heads.box_head.norm.", "box_head"))

    @classmethod
    def build(cls, cfg: RCNNC4Config, num_classes: int) -> FasterRCNN:
        backbone, head = c4_parts(cfg)
        anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
        model = FasterRCNN(
            backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            # detectron2 C4: ROIAlignV2 14x14, sampling ratio 0 (adaptive); aligned as configured
            box_roi_pool=RoIPooler(["0"], 14, 0, cfg.roi_align_aligned),
            box_head=head, box_predictor=FastRCNNPredictor(head.out_channels, num_classes),
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh)
        model.roi_heads = RCNNRoIHeads.like(model.roi_heads, cfg.box_reg_loss)
        model.transform = Transform(cfg.min_size, cfg.max_size, cfg.test_min_size)
        cls.add_heads(model, cfg, num_classes)
        init_predictors(model)
        return model

    @classmethod
    def add_heads(cls, model: FasterRCNN, cfg: RCNNC4Config, num_classes: int) -> None:
        """Faster R-CNN has no more heads (Mask R-CNN C4 adds its mask branch here)."""

