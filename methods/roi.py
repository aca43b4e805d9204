"""Object-level features from a ResNet-FPN: feature maps, scale-aware level assignment,
RoIAlign over pyramid levels, precise RoI pooling, the R-CNN box head, and export of the
detector parts under the canonical keys (bare torchvision ResNet names, ``fpn.*``,
``box_head.*``) that the fine-tuning detectors load. Shared by SoCo (one level per box),
InsLoc (every level), AlignDet (the detectors' own necks and heads) and ReSim (precise RoI
pooling of its windows)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FeaturePyramidNetwork, roi_align

from methods.backbones import backbone_state, build_resnet, resnet_stages, stage_channels

FPN_STRIDES = (4, 8, 16, 32)       # P2..P5
C5_STRIDE = 32


class ResNetFPN(nn.Module):
    """ResNet + FPN (P2-P5), or the bare C5 map when ``fpn_channels`` is 0.

    The FPN is the very class (and arguments) torchvision's ``BackboneWithFPN`` builds for the
    detectors; its ``LastLevelMaxPool`` P6 has no parameters, so ``fpn.*`` keys transfer as is.
    ``norm`` = "bn" puts BatchNorm in the FPN (SoCo/InsLoc official ``norm_cfg=BN``;
    detectron2 fine-tuning ``FPN.NORM: SyncBN``)."""

    def __init__(self, backbone: str = "resnet50", fpn_channels: int = 256, norm: str = "bn",
                 zero_init_residual: bool = False):
        super().__init__()
        self.backbone = build_resnet(backbone, zero_init_residual=zero_init_residual)
        chans = stage_channels(backbone)
        if fpn_channels:
            self.fpn = FeaturePyramidNetwork(chans, fpn_channels, norm_layer=norm_layer(norm))
            self.out_channels, self.strides = fpn_channels, FPN_STRIDES
        else:
            self.fpn = None
            self.out_channels, self.strides = chans[-1], (C5_STRIDE,)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        cs = resnet_stages(self.backbone, x)
        if self.fpn is None:
            return [cs[-1]]
        return list(self.fpn(OrderedDict((f"p{i + 2}", c) for i, c in enumerate(cs))).values())


def norm_layer(norm: str):
    if norm not in ("bn", "none"):
        raise ValueError(f"norm: unknown {norm!r} (bn | none)")
    return nn.BatchNorm2d if norm == "bn" else None


def box_head(in_channels: int, roi_size: int = 7, conv_dim: int = 256, num_convs: int = 4,
             fc_dim: int = 1024, norm: str = "bn") -> nn.Module:
    """The 4conv1fc R-CNN box head (detectron2 ``FastRCNNConvFCHead``; torchvision's class, so
    ``box_head.*`` keys load into the fine-tuning Mask R-CNN as is)."""
    return FastRCNNConvFCHead((in_channels, roi_size, roi_size), [conv_dim] * num_convs, [fc_dim],
                              norm_layer=norm_layer(norm))


def assign_levels(boxes: torch.Tensor, thresholds=(48.0, 96.0, 192.0)) -> torch.Tensor:
    """Scale-aware assignment (SoCo ``assign_bboxs_to_feature_map``, ``aware_range`` 48/96/192):
    level index 0..3 (P2..P5) of each xyxy box from its size sqrt(wh) in the pixels of the
    view it lies in: <= t0 -> P2, <= t1 -> P3, <= t2 -> P4, else P5 (upper bounds inclusive,
    as the official ``size <= aware_range[j]``). The thresholds are never rescaled by the
    view's size: the same object is one level finer in a view half as large (SoCo's V3)."""
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    size = torch.sqrt(w * h)
    t = torch.tensor(thresholds, dtype=size.dtype, device=size.device)
    return torch.bucketize(size, t, right=False)


def multilevel_roi_align(feats: list[torch.Tensor], strides, boxes: torch.Tensor, levels: torch.Tensor,
                         roi_size: int = 7, sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign (``roi_size`` x ``roi_size``, aligned) of every (box, level) pair.

    ``boxes``: (N, K, 4) xyxy in image pixels, one row of K per image, or (N, K, L, 4): a box
    per (box, level) pair (InsLoc's query pools its augmented box on P5 only); ``levels``:
    (N, K, L) indices into ``feats`` (L levels per box: 1 for scale-aware assignment, all for
    InsLoc). ``sampling_ratio``: points per bin side (torchvision; <= 0: adaptive, ceil(bin
    size)). Returns (N * K * L, C, roi_size, roi_size) in (n, k, l) order.

    Each level pools every row, with the rows of other levels given empty boxes and their
    outputs zeroed, so the result is exactly the per-level selection without a data-dependent
    shape or host sync (``torch.compile`` traces it whole). With adaptive sampling an empty box
    samples nothing; every level's feature map (and the FPN layers that make it) stays in the
    autograd graph, with a zero gradient where no box picks it, so DDP with
    ``find_unused_parameters=False`` finds every parameter reduced on every step."""
    N, K, L = levels.shape
    if boxes.dim() == 3:
        boxes = boxes[:, :, None, :].expand(N, K, L, 4)
    dt = feats[0].dtype
    b = boxes.reshape(-1, 4).to(dt)
    lv = levels.reshape(-1)
    idx = torch.arange(N, device=boxes.device)[:, None, None].expand(N, K, L).reshape(-1, 1).to(dt)
    out = None
    for level, (f, s) in enumerate(zip(feats, strides)):
        mine = (lv == level)[:, None]
        rois = torch.cat([idx, b * mine.to(dt)], 1)
        pooled = roi_align(f, rois, (roi_size, roi_size), spatial_scale=1.0 / s,
                           sampling_ratio=sampling_ratio, aligned=True)
        pooled = torch.where(mine[:, :, None, None], pooled, pooled.new_zeros(()))
        out = pooled if out is None else out + pooled
    return out


def _hat_integral(t: torch.Tensor) -> torch.Tensor:
    """Antiderivative of the linear-interpolation kernel max(0, 1 - |t|), 0 at t = -1."""
    t = t.clamp(-1.0, 1.0)
    return torch.where(t < 0, 0.5 * (t + 1) ** 2, 1 - 0.5 * (1 - t) ** 2)


def prroi_pool(feat: torch.Tensor, boxes: torch.Tensor, spatial_scale: float) -> torch.Tensor:
    """Precise RoI pooling to 1x1 (Jiang et al. 2018, as the official lib/prroi_pool CUDA op,
    prroi_pooling_gpu_impl.cu:171-210): the exact integral of the bilinear interpolation of
    ``feat`` (features at integer positions, zero outside the map) over each box, divided by
    the box's area; 0 for an empty box. Box coordinates are multiplied by ``spatial_scale``
    with no half-pixel offset. ``feat`` (N, C, H, W), ``boxes`` (N, K, 4) xyxy -> (N, K, C).
    Separable, so two small matrix products; differentiable in ``feat``."""
    N, C, H, W = feat.shape
    b = boxes.to(torch.float32) * spatial_scale
    gx = torch.arange(W, device=feat.device, dtype=torch.float32)
    gy = torch.arange(H, device=feat.device, dtype=torch.float32)
    wx = _hat_integral(b[..., 2, None] - gx) - _hat_integral(b[..., 0, None] - gx)      # (N, K, W)
    wy = _hat_integral(b[..., 3, None] - gy) - _hat_integral(b[..., 1, None] - gy)      # (N, K, H)
    area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    inv = torch.where(area > 0, 1.0 / area.clamp(min=1e-12), torch.zeros_like(area))
    wx = wx * inv[..., None]
    dt = feat.dtype
    rows = torch.einsum("nkh,nchw->nkcw", wy.to(dt), feat)
    return torch.einsum("nkcw,nkw->nkc", rows, wx.to(dt))


def export_parts(backbone: nn.Module, **parts: nn.Module | None) -> dict[str, torch.Tensor]:
    """The canonical export: the backbone under bare torchvision names, each other part under
    ``<name>.*`` (``fpn=...``, ``box_head=...``); ``None`` parts are left out."""
    out = backbone_state(backbone)
    for prefix, m in parts.items():
        if m is not None:
            out.update({f"{prefix}.{k}": v.detach().cpu().clone() for k, v in m.state_dict().items()})
    return out
