"""Mask R-CNN R50-C4 (He et al. 2017; detectron2 ``mask_rcnn_R_50_C4``, MoCo's
``coco_R_50_C4_*_moco.yaml``): Faster R-CNN C4 plus a mask branch on the same res5 features
(detectron2 ``Res5ROIHeads``: the 7x7 res5 output of the positive RoIs, one 2x2 deconv to
256 channels, ReLU, 1x1 logits per class; no extra convolutions)."""
from __future__ import annotations

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from benchmark.detectors.registry import register_detector
from benchmark.detectors.faster_rcnn_c4 import FasterRCNNC4, RCNNC4Config
from benchmark.detectors.rcnn import RCNNRoIHeads, RoIPooler


class C4RoIHeads(RCNNRoIHeads):
    """torchvision's RoI heads whose mask head *is* the box head's res5 (no second copy of
    its weights): ``mask_head`` reads ``box_head.features``. The mask branch pools its own
    14x14 RoIs (the positives) and runs res5 on them again; same result as detectron2's
    reuse of the box branch features, computed twice."""

    @property
    def mask_head(self):
        return self.box_head.features if self.mask_predictor is not None else None

    @mask_head.setter
    def mask_head(self, value) -> None:
        if value is not None:
            raise ValueError("C4RoIHeads: the mask head is the box head's res5; pass mask_head=None")


@register_detector("mask_rcnn_c4")
class MaskRCNNC4(FasterRCNNC4):
    title, feature = "Mask R-CNN", "C4"
    with_masks = True

    @classmethod
    def add_heads(cls, model: FasterRCNN, cfg: RCNNC4Config, num_classes: int) -> None:
        rh = model.roi_heads
        heads = C4RoIHeads(
            rh.box_roi_pool, rh.box_head, rh.box_predictor, 0.5, 0.5, cfg.box_batch_size_per_image, 0.25,
            None, cfg.box_score_thresh, rh.nms_thresh, cfg.box_detections_per_img,
            mask_roi_pool=RoIPooler(["0"], 14, 0, cfg.roi_align_aligned),
            mask_predictor=MaskRCNNPredictor(rh.box_head.out_channels, cfg.mask_head_dim, num_classes),
            box_reg_loss=cfg.box_reg_loss)
        model.roi_heads = heads
