"""Mask R-CNN R50-FPN (He et al. 2017) as fine-tuned by MoCo v2 / SoCo / PixPro: torchvision's
``MaskRCNN`` over a ``BackboneWithFPN`` (ResNet C2-C5 -> P2-P5 + max-pooled P6), with the FPN,
RPN, box head and mask head sized from the config so the tiny scale can shrink them.

Keys from a method's export:

=========  ==========================================  ====================================
group      canonical key                               detector key
=========  ==========================================  ====================================
backbone   ``conv1.weight``, ``layer1.0.bn1.running_mean``  ``backbone.body.<same>``
fpn        ``fpn.inner_blocks.0.0.weight``             ``backbone.fpn.<same>``
box_head   ``box_head.0.0.weight`` (FastRCNNConvFCHead)  ``roi_heads.box_head.<same>``
=========  ==========================================  ====================================

``box_head_extra_norm`` (InsLoc's rows) adds ``roi_heads.box_head.extra_norm.*``: a layer of
fine-tuning only, reported in the ``other`` group (freshly initialised, as the predictors),
and loaded from ``box_head.extra_norm.*`` when an export has it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from benchmark.detectors.registry import register_detector
from benchmark.detectors.base import Detector, SGDRecipe, Transform, check_backbone, resnet_body
from benchmark.detectors.rcnn import RCNNConfig, RCNNRoIHeads, RoIPooler
from methods.config import ConfigError

HEAD_NORMS = ("none", "bn")
BOX_HEADS = ("4conv1fc", "2mlp")


@dataclass
class MaskRCNNConfig(RCNNConfig):
    """Defaults: detectron2 ``Base-RCNN-FPN.yaml`` with MoCo's fine-tuning changes."""
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
    # InsLoc's fine-tuning head (official transfer/detection/train_net.py,
    # FastRCNNConvFCHeadExtraNorm in R_50_FPN_1x_insloc.yaml): 4conv1fc + a BatchNorm (SyncBN
    # when distributed) over fc1's output after its ReLU
    box_head_extra_norm: bool = False
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
    # RoIAlign sampling points per bin in the box and mask heads; detectron2: 0 (adaptive,
    # ROI_BOX_HEAD / ROI_MASK_HEAD.POOLER_SAMPLING_RATIO), torchvision: 2
    roi_sampling_ratio: int = 2

    def validate(self) -> None:
        super().validate()
        check_backbone(self)
        self.choice("head_norm", HEAD_NORMS)
        self.choice("box_head", BOX_HEADS)
        if self.box_head_extra_norm and self.box_head != "4conv1fc":
            raise ConfigError(f"detector.box_head_extra_norm: the extra norm follows fc1 of the 4conv1fc box head, "
                              f"not {self.box_head!r} (set box_head: 4conv1fc or box_head_extra_norm: false)")
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"detector.anchor_sizes: expected 5 sizes (P2..P6), got {list(self.anchor_sizes)}")


def fpn_backbone(cfg) -> BackboneWithFPN:
    """ResNet + FPN over C2..C5 with a max-pooled P6 ('pool')."""
    body = resnet_body(cfg.backbone, cfg.norm, cfg.trainable_layers)
    c2 = body.inplanes // 8  # 64 for basic blocks, 256 for bottlenecks
    return BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [c2, c2 * 2, c2 * 4, c2 * 8], cfg.fpn_channels, extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if cfg.head_norm == "bn" else None)


def box_head(cfg: MaskRCNNConfig) -> nn.Module:
    c = cfg.fpn_channels
    if cfg.box_head == "4conv1fc":
        head = FastRCNNConvFCHead((c, 7, 7), [cfg.box_head_conv_dim] * cfg.box_head_num_convs,
                                  [cfg.box_head_fc_dim],
                                  norm_layer=nn.BatchNorm2d if cfg.head_norm == "bn" else None)
        if cfg.box_head_extra_norm:   # runs last: convs -> flatten -> fc1 -> ReLU -> extra_norm
            head.add_module("extra_norm", nn.BatchNorm1d(cfg.box_head_fc_dim))
        return head
    return TwoMLPHead(c * 7 * 7, cfg.box_head_fc_dim)


def init_predictors(model) -> None:
    """detectron2's initialisation of the final layers (FastRCNNOutputLayers: cls_score
    N(0, 0.01), bbox_pred N(0, 0.001); MaskRCNNConvUpsampleHead: predictor N(0, 0.001)).
    torchvision's default Linear init gives large initial logits and diverges at lr 0.02."""
    pred = model.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, std=0.01)
    nn.init.normal_(pred.bbox_pred.weight, std=0.001)
    for layer in (pred.cls_score, pred.bbox_pred):
        nn.init.zeros_(layer.bias)
    if model.roi_heads.mask_predictor is not None:
        logits = model.roi_heads.mask_predictor.mask_fcn_logits
        nn.init.normal_(logits.weight, std=0.001)
        nn.init.zeros_(logits.bias)


@register_detector("mask_rcnn")
class MaskRCNNFPN(Detector):
    title, feature = "Mask R-CNN", "FPN"
    Config = MaskRCNNConfig
    Recipe = SGDRecipe
    # detectron2 1x / 2x: 90k / 180k iterations at 16 images, lr 0.02, drops at 60k, 80k
    # (120k, 160k), 1k warm-up iterations
    recipes = {"1x": SGDRecipe(), "2x": SGDRecipe(steps=180_000)}
    key_map = (("fpn.", "backbone.fpn.", "fpn"), ("box_head.", "roi_heads.box_head.", "box_head"),
               ("", "backbone.body.", "backbone"), (None, "roi_heads.box_head.extra_norm.", "other"))
    with_masks = True

    @classmethod
    def build(cls, cfg: MaskRCNNConfig, num_classes: int) -> MaskRCNN:
        c = cfg.fpn_channels
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * 5)
        levels = ["0", "1", "2", "3"]
        head_norm = nn.BatchNorm2d if cfg.head_norm == "bn" else None
        model = MaskRCNN(
            fpn_backbone(cfg), num_classes=None,
            min_size=cfg.min_size, max_size=cfg.max_size,
            rpn_anchor_generator=anchors, rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=RoIPooler(levels, 7, cfg.roi_sampling_ratio, cfg.roi_align_aligned),
            box_head=box_head(cfg),
            box_predictor=FastRCNNPredictor(cfg.box_head_fc_dim, num_classes),
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_detections_per_img=cfg.box_detections_per_img,
            box_score_thresh=cfg.box_score_thresh,
            mask_roi_pool=RoIPooler(levels, 14, cfg.roi_sampling_ratio, cfg.roi_align_aligned),
            mask_head=MaskRCNNHeads(c, [cfg.mask_head_dim] * cfg.mask_head_convs, 1, norm_layer=head_norm),
            mask_predictor=MaskRCNNPredictor(cfg.mask_head_dim, cfg.mask_head_dim, num_classes),
        )
        model.roi_heads = RCNNRoIHeads.like(model.roi_heads, cfg.box_reg_loss)
        init_predictors(model)
        model.transform = Transform(cfg.min_size, cfg.max_size, cfg.test_min_size)
        return model
