"""detectron2's RoI heads as options of torchvision's R-CNNs (Mask R-CNN FPN, Faster / Mask
R-CNN C4, and any R-CNN built from their parts).

Every row of soco_table1 was fine-tuned with detectron2 (MoCo's, SoCo's, InsLoc's and PixPro's
detectron2 configs). Where torchvision's R-CNN differs, ``RCNNConfig`` has a field whose
default is torchvision's behaviour (the runs made before these options keep their keys: at
that default a field is left out of a run's config) and whose other value is detectron2's:

- ``roi_align_aligned``: RoIAlign with the half-pixel offset (detectron2 ``ROIAlignV2``, the
  ``POOLER_TYPE`` of ``Base-RCNN-FPN.yaml`` / ``Base-RCNN-C4.yaml``) in the box and mask
  heads; torchvision's ``MultiScaleRoIAlign`` calls RoIAlign with ``aligned=False``.
- ``box_reg_loss``: "l1" is detectron2's box regression loss of the RoI heads
  (``MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA`` 0.0: smooth L1 with beta 0 = L1, summed over the
  foreground and divided by the number of sampled RoIs); "smooth_l1" is torchvision's
  (beta 1/9, same normalisation).

Precise BN (detectron2 ``TEST.PRECISE_BN``) is a fine-tuning recipe field
(``benchmark.finetune.precise_bn``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales

from benchmark.detectors.base import DetectorConfig

BOX_REG_LOSSES = ("smooth_l1", "l1")


@dataclass
class RCNNConfig(DetectorConfig):
    """The RoI-head options every R-CNN config has (see the module docstring)."""
    roi_align_aligned: bool = False        # True: detectron2 ROIAlignV2
    box_reg_loss: str = "smooth_l1"        # "l1": detectron2 (SMOOTH_L1_BETA 0)
    # at torchvision's behaviour a field is left out of a run's config (earlier keys stay)
    ADDED_LATER = {"roi_align_aligned": False, "box_reg_loss": "smooth_l1"}

    def validate(self) -> None:
        super().validate()
        self.choice("box_reg_loss", BOX_REG_LOSSES)


class RoIPooler(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign (same level mapping: canonical size 224 at level 4,
    as detectron2's ``ROIPooler``) with ``aligned`` as an option."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool = False):
        super().__init__(featmap_names, output_size=output_size, sampling_ratio=sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        if not self.aligned:
            return super().forward(x, boxes, image_shapes)
        feats = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])

        def pool(feat: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
            return roi_align(feat, r, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio,
                             aligned=True)

        if len(feats) == 1:
            return pool(feats[0], rois, self.scales[0])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = pool(feat, rois[idx], scale).to(out.dtype)
        return out


def l1_box_loss(box_regression: torch.Tensor, labels: list[torch.Tensor],
                regression_targets: list[torch.Tensor]) -> torch.Tensor:
    """detectron2's RoI box regression loss at SMOOTH_L1_BETA 0 (``FastRCNNOutputLayers``):
    L1 between the class-specific deltas of the foreground RoIs and their targets, summed and
    divided by the number of sampled RoIs (foreground and background)."""
    labels_ = torch.cat(labels)
    targets = torch.cat(regression_targets)
    fg = torch.where(labels_ > 0)[0]
    deltas = box_regression.reshape(len(labels_), -1, 4)[fg, labels_[fg]]
    return F.l1_loss(deltas, targets[fg], reduction="sum") / max(labels_.numel(), 1)


class RCNNRoIHeads(RoIHeads):
    """torchvision's RoI heads with ``box_reg_loss`` as an option. In training with "l1",
    torchvision's forward runs unchanged and its ``loss_box_reg`` is replaced by
    :func:`l1_box_loss` on the same sampled RoIs and the same box predictions."""

    def __init__(self, *args, box_reg_loss: str = "smooth_l1", **kwargs):
        super().__init__(*args, **kwargs)
        self.box_reg_loss = box_reg_loss
        self._sampled: tuple | None = None

    @classmethod
    def like(cls, heads: RoIHeads, box_reg_loss: str) -> "RCNNRoIHeads":
        """The same heads (the same modules and thresholds) as ``heads``, a torchvision ``RoIHeads``."""
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
                   mask_predictor=heads.mask_predictor, box_reg_loss=box_reg_loss)

    def select_training_samples(self, proposals, targets):
        out = super().select_training_samples(proposals, targets)
        self._sampled = (out[2], out[3])     # labels, regression targets of the sampled RoIs
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if not (self.training and self.box_reg_loss == "l1"):
            return super().forward(features, proposals, image_shapes, targets)
        kept = {}
        hook = self.box_predictor.register_forward_hook(lambda m, a, out: kept.update(regression=out[1]))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        (labels, regression_targets), self._sampled = self._sampled, None
        losses["loss_box_reg"] = l1_box_loss(kept["regression"], labels, regression_targets)
        return result, losses
