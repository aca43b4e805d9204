"""Faster R-CNN R50-FPN (Ren et al. 2015, with Lin et al. 2017's FPN; detectron2
``faster_rcnn_R_50_FPN_1x.yaml``): the Mask R-CNN FPN detector of ``mask_rcnn.py`` without its
mask branch. The same pieces, config fields (less the mask head's), recipes and key map, so a
method's export loads the same way and AlignDet's R-CNN pretraining is shared by both
(its mask head is not pretrained). Box metrics only.
"""
from __future__ import annotations

from dataclasses import dataclass

from torchvision.models.detection import MaskRCNN

from benchmark.detectors.registry import register_detector
from benchmark.detectors.mask_rcnn import MaskRCNNConfig, MaskRCNNFPN
from methods.config import ConfigError

MASK_FIELDS = ("mask_head_dim", "mask_head_convs")


@dataclass
class FasterRCNNConfig(MaskRCNNConfig):
    """Mask R-CNN FPN's config without the mask head's fields (rejected if given, absent from
    the run's identity)."""

    @classmethod
    def from_dict(cls, d: dict | None, name: str = "") -> "FasterRCNNConfig":
        given = [k for k in MASK_FIELDS if k in (d or {})]
        if given:
            raise ConfigError(f"detector.{given[0]}: unknown key (Faster R-CNN has no mask head)")
        return super().from_dict(d, name)

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if k not in MASK_FIELDS}


@register_detector("faster_rcnn")
class FasterRCNNFPN(MaskRCNNFPN):
    title, feature = "Faster R-CNN", "FPN"
    Config = FasterRCNNConfig
    with_masks = False

    @classmethod
    def build(cls, cfg: FasterRCNNConfig, num_classes: int) -> MaskRCNN:
        """Mask R-CNN's builder with the mask branch removed: torchvision's ``RoIHeads``
        without a mask RoI pool, head and predictor is Faster R-CNN's (``has_mask()`` false)."""
        model = super().build(cfg, num_classes)
        rh = model.roi_heads
        rh.mask_roi_pool = rh.mask_head = rh.mask_predictor = None
        return model
