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
(``benchmark.stages.finetune.precise_bn``).

RoIAlign's backward on CPU with a fixed sampling grid (the tiny scale's ``roi_sampling_ratio``
2) is :func:`roi_align_grad_input`: torchvision's CPU kernel, vectorised. It gives torchvision's
gradient bit for bit (same weights, same order of additions) at 2-3x its speed; RoIAlign's
backward was 10-13 % of a tiny Mask R-CNN step (`tools.bench.finetune_bench --profile`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _setup_scales

from benchmark.detectors.base import DetectorConfig

BOX_REG_LOSSES = ("smooth_l1", "l1")


@dataclass
class RCNNConfig(DetectorConfig):
    """The RoI-head options every R-CNN config has (see the module docstring)."""
    roi_align_aligned: bool = False        # True: detectron2 ROIAlignV2
    box_reg_loss: str = "smooth_l1"        # "l1": detectron2 (SMOOTH_L1_BETA 0)

    def validate(self) -> None:
        super().validate()
        self.choice("box_reg_loss", BOX_REG_LOSSES)


def _sample_axis(start: torch.Tensor, bin_size: torch.Tensor, pooled: int, grid: int, size: int):
    """The bilinear taps along one axis of RoIAlign's sampling points, as torchvision's CPU
    ``bilinear_interpolate_gradient`` computes them: for every RoI, bin and sample, the two
    neighbouring pixel indices [R, pooled, grid, 2] and their weights (0 outside [-1, size])."""
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)
    i = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    y = start[:, None, None] + p[:, None] * bin_size[:, None, None] + i * bin_size[:, None, None] / grid
    inside = (y >= -1) & (y <= size)
    y = y.clamp(min=0)
    low = y.long()
    edge = low >= size - 1
    low = low.clamp(max=size - 1)
    y = torch.where(edge, low.to(y.dtype), y)
    frac = y - low
    return torch.stack([low, torch.where(edge, low, low + 1)], -1), torch.stack([1 - frac, frac], -1) * inside[..., None]


def roi_align_grad_input(grad: torch.Tensor, rois: torch.Tensor, input_shape, spatial_scale: float,
                         sampling_ratio: int, aligned: bool, max_elements: int = 1 << 17) -> torch.Tensor:
    """The gradient of RoIAlign's input for a fixed ``sampling_ratio`` > 0: torchvision's CPU
    backward kernel vectorised (every RoI, bin, sample point and bilinear corner adds
    ``grad * w / count`` to its pixel, in the kernel's order, so the sums are the same bit for
    bit). Bins are taken in chunks of at most ``max_elements`` scattered values (512 KiB: the
    products stay in cache; one chunk of a 256-RoI step is as slow as torchvision's kernel)."""
    n, c, h, w = input_shape
    ph, pw = grad.shape[-2:]
    b = rois[:, 1:] * spatial_scale - (0.5 if aligned else 0.0)
    roi_w, roi_h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if not aligned:   # the legacy RoIAlign makes every RoI at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    yi, yw = _sample_axis(b[:, 1], roi_h / ph, ph, sampling_ratio, h)
    xi, xw = _sample_axis(b[:, 0], roi_w / pw, pw, sampling_ratio, w)
    # dims: RoI, bin y, bin x, sample y, sample x, corner y, corner x -> [RoI x bin, tap]
    taps, count = 4 * sampling_ratio ** 2, sampling_ratio ** 2
    pixel = (((rois[:, 0].long() * h)[:, None, None, None, None, None, None] + yi[:, :, None, :, None, :, None]) * w
             + xi[:, None, :, None, :, None, :]).reshape(-1, taps)
    weight = (yw[:, :, None, :, None, :, None] * xw[:, None, :, None, :, None, :]).reshape(-1, taps, 1)
    power_of_two = count & (count - 1) == 0
    if power_of_two:   # grad * (w / count) == grad * w / count: scaling by 2^-k commutes with rounding
        weight = weight / count
    g = grad.permute(0, 2, 3, 1).reshape(-1, 1, c)
    out = grad.new_zeros(n * h * w, c)
    step = max(1, max_elements // (taps * c))   # bins per chunk
    for b in range(0, len(pixel), step):
        src = torch.bmm(weight[b:b + step], g[b:b + step])   # over one term: the plain product w * grad
        if not power_of_two:
            src.div_(count)
        out.index_add_(0, pixel[b:b + step].reshape(-1), src.reshape(-1, c))
    return out.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


class _RoIAlignCPU(torch.autograd.Function):
    """torchvision's RoIAlign forward; the backward of :func:`roi_align_grad_input`."""

    @staticmethod
    def forward(ctx, feat, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = feat.shape, spatial_scale, sampling_ratio, aligned
        return torch.ops.torchvision.roi_align(feat, rois, spatial_scale, output_size[0], output_size[1],
                                               sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        rois, = ctx.saved_tensors
        return roi_align_grad_input(grad, rois, *ctx.args), None, None, None, None, None


def roi_align(feat: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision's ``roi_align`` on ``[K, 5]`` RoIs; on CPU with a fixed sampling grid its
    backward is the vectorised :func:`roi_align_grad_input` (the same numbers, 2-3x faster)."""
    if feat.device.type == "cpu" and sampling_ratio > 0 and feat.requires_grad and torch.is_grad_enabled():
        return _RoIAlignCPU.apply(feat, rois.detach(), tuple(output_size), spatial_scale, sampling_ratio, aligned)
    return tv_roi_align(feat, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                        aligned=aligned)


class RoIPooler(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign (same level mapping: canonical size 224 at level 4,
    as detectron2's ``ROIPooler``; the same pooled values) with ``aligned`` as an option, over
    :func:`roi_align`."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool = False):
        super().__init__(featmap_names, output_size=output_size, sampling_ratio=sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])

        def pool(feat: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
            return roi_align(feat, r, self.output_size, scale, self.sampling_ratio, self.aligned)

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
