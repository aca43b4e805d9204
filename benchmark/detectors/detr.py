"""DETR R50 (Carion et al. 2020) from ``transformers``, built offline (``use_timm_backbone=False``,
no pretrained download: the ResNet is transformers' own, sized from ``backbone``), behind
torchvision's detection interface so fine-tuning and evaluation treat it like the others.

- Input: the shared resize/normalise transform (DETR's multi-scale short side 480-800 by 32,
  max 1333, test 800); the padding mask tells DETR which pixels are real. Targets go in as
  ``class_labels`` and boxes in (cx, cy, w, h) normalised by the unpadded image size.
- Training: Hungarian matching (class 1, L1 5, GIoU 2), losses CE (no-object weight 0.1)
  + 5 L1 + 2 GIoU, on every decoder layer (auxiliary losses, DETR Sec. 3.2); the returned
  dict holds the weighted terms, so their sum is the paper's loss.
- transformers freezes the backbone's stem and first stage when building a ResNet this way
  (and ``FrozenBatchNorm`` everywhere, as DETR does): the convolutions are unfrozen here, or
  a method's pretrained weights would never be fine-tuned there.
- Inference: per query, the most likely real class and its probability (no-object dropped),
  boxes back to the original image size.

Recipe (AlignDet's DETR fine-tuning, mmdetection ``detr_r50_8xb2-150e_coco``): AdamW lr 1e-4,
backbone lr x0.1, weight decay 1e-4, gradient clipping at norm 0.1, batch 16, 50 / 100 / 150
epochs with the lr divided by 10 at 40 / 80 / 100 (schedules "1x", "2x", "3x" here). An
epoch of COCO train2017 at batch 16 is 7393 iterations.

Keys from a method's export: the backbone only (torchvision ResNet names -> transformers'
``embedder`` / ``encoder.stages.{i}.layers.{j}.layer.{k}`` / ``shortcut``); an FPN or a box
head has no place in DETR and is reported as unexpected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from benchmark.detectors.registry import register_detector
from benchmark.detectors.base import NORMS, Detector, DetectorConfig, FinetuneRecipe, Transform
from methods.config import ConfigError

# torchvision ResNet -> transformers ResNetConfig (depths, widths, block type)
RESNETS = {"resnet18": ([2, 2, 2, 2], [64, 128, 256, 512], "basic"),
           "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512], "basic"),
           "resnet50": ([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck"),
           "resnet101": ([3, 4, 23, 3], [256, 512, 1024, 2048], "bottleneck")}
COCO_EPOCH = 7393            # ceil(118287 train2017 images / 16)
BACKBONE = "detr.model.backbone.model."


@dataclass
class DETRConfig(DetectorConfig):
    """Defaults: DETR R50 (DETR Sec. 4 / Table 1: 6+6 layers, d 256, 8 heads, FFN 2048,
    100 queries, dropout 0.1)."""
    backbone: str = "resnet50"
    # "frozen_bn": DETR's (and transformers') frozen BatchNorm in the backbone; "bn": trainable
    # BatchNorm (SyncBN when distributed), as the other detectors fine-tune here
    norm: str = "frozen_bn"
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    attention_heads: int = 8
    ffn_dim: int = 2048
    num_queries: int = 100
    dropout: float = 0.1
    auxiliary_loss: bool = True
    class_cost: int = 1
    bbox_cost: int = 5
    giou_cost: int = 2
    bbox_loss_coefficient: int = 5
    giou_loss_coefficient: int = 2
    eos_coefficient: float = 0.1
    min_size: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_min_size: int = 800

    def validate(self) -> None:
        self.choice("backbone", tuple(RESNETS))
        self.choice("norm", NORMS)
        if self.d_model % self.attention_heads:
            raise ConfigError(f"detector.d_model: {self.d_model} is not divisible by attention_heads "
                              f"{self.attention_heads}")
        if not self.min_size:
            raise ConfigError("detector.min_size: expected at least one size")


@dataclass
class DETRRecipe(FinetuneRecipe):
    steps: int = 50 * COCO_EPOCH
    lr: float = 1e-4
    milestones: tuple[float, ...] = (40 / 50,)
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    grad_clip: float | None = 0.1
    backbone_lr_mult: float = 0.1


class DETR(nn.Module):
    """transformers' ``DetrForObjectDetection`` with torchvision's detection interface."""

    def __init__(self, detr: nn.Module, transform: Transform, detections_per_img: int):
        super().__init__()
        self.transform = transform
        self.detr = detr
        self.detections_per_img = detections_per_img
        c = detr.config
        self.loss_weights = {"loss_ce": 1.0, "loss_bbox": c.bbox_loss_coefficient,
                             "loss_giou": c.giou_loss_coefficient}

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, targets = self.transform(images, targets)
        x = batch.tensors
        mask = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=torch.long, device=x.device)
        for i, (h, w) in enumerate(batch.image_sizes):
            mask[i, :h, :w] = 1
        if self.training:
            if targets is None:
                raise ValueError("DETR: targets are required in training mode")
            labels = [{"class_labels": t["labels"], "boxes": _normalized_cxcywh(t["boxes"], h, w)}
                      for t, (h, w) in zip(targets, batch.image_sizes)]
            out = self.detr(pixel_values=x, pixel_mask=mask, labels=labels)
            # weighted terms of the final and auxiliary decoder layers ("loss_ce_0", ...)
            return {k: v * self.loss_weights[re.sub(r"_\d+$", "", k)] for k, v in out.loss_dict.items()
                    if re.sub(r"_\d+$", "", k) in self.loss_weights}
        out = self.detr(pixel_values=x, pixel_mask=mask)
        prob = out.logits.softmax(-1)[..., 1:-1]      # drop background slot 0 and no-object
        scores, labels = prob.max(-1)
        detections = []
        for s, lab, b, (h, w) in zip(scores, labels + 1, out.pred_boxes, batch.image_sizes):
            keep = s.argsort(descending=True)[:self.detections_per_img]
            cx, cy, bw, bh = b[keep].unbind(-1)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            boxes = boxes * boxes.new_tensor([w, h, w, h])
            detections.append({"boxes": boxes, "scores": s[keep], "labels": lab[keep]})
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def _trainable_bn(module: nn.Module) -> None:
    """transformers' frozen BatchNorm -> ``nn.BatchNorm2d`` with the same state (same keys)."""
    for name, child in module.named_children():
        if type(child).__name__ == "DetrFrozenBatchNorm2d":
            bn = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, k).copy_(getattr(child, k))
            setattr(module, name, bn)
        else:
            _trainable_bn(child)


def _normalized_cxcywh(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], -1)


_STAGE = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.*)$")
_SHORTCUT = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.*)$")


@register_detector("detr")
class DETRR50(Detector):
    title, feature = "DETR", "C5"
    Config = DETRConfig
    Recipe = DETRRecipe
    recipes = {"1x": DETRRecipe(),
               "2x": DETRRecipe(steps=100 * COCO_EPOCH, milestones=(80 / 100,)),
               "3x": DETRRecipe(steps=150 * COCO_EPOCH, milestones=(100 / 150,))}
    key_map = ((None, BACKBONE, "backbone"),)
    takes_method_overrides = False    # AlignDet fine-tunes DETR with one recipe for every method

    @classmethod
    def detector_key(cls, key: str) -> str | None:
        """torchvision ResNet name -> transformers ResNet name (None: no place in DETR)."""
        part = {"conv": "convolution", "bn": "normalization"}
        if m := re.match(r"^(conv|bn)1\.(.*)$", key):
            return f"{BACKBONE}embedder.embedder.{part[m.group(1)]}.{m.group(2)}"
        if m := _STAGE.match(key):
            stage, block, kind, k, rest = m.groups()
            return (f"{BACKBONE}encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(k) - 1}."
                    f"{part[kind]}.{rest}")
        if m := _SHORTCUT.match(key):
            stage, block, i, rest = m.groups()
            return (f"{BACKBONE}encoder.stages.{int(stage) - 1}.layers.{block}.shortcut."
                    f"{('convolution', 'normalization')[int(i)]}.{rest}")
        return None

    @classmethod
    def build(cls, cfg: DETRConfig, num_classes: int) -> DETR:
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
        depths, widths, block = RESNETS[cfg.backbone]
        backbone = ResNetConfig(depths=depths, hidden_sizes=widths, layer_type=block, out_features=["stage4"])
        hf = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                        num_labels=num_classes, num_queries=cfg.num_queries, d_model=cfg.d_model,
                        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                        encoder_attention_heads=cfg.attention_heads, decoder_attention_heads=cfg.attention_heads,
                        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                        auxiliary_loss=cfg.auxiliary_loss, class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost,
                        giou_cost=cfg.giou_cost, bbox_loss_coefficient=cfg.bbox_loss_coefficient,
                        giou_loss_coefficient=cfg.giou_loss_coefficient, eos_coefficient=cfg.eos_coefficient)
        detr = DetrForObjectDetection(hf)
        detr.model.unfreeze_backbone()   # transformers froze the stem and res2 (see the module doc)
        if cfg.norm == "bn":
            _trainable_bn(detr.model.backbone.model)
        transform = Transform(cfg.min_size, cfg.max_size, cfg.test_min_size)
        return DETR(detr, transform, detections_per_img=cfg.num_queries)

    @classmethod
    def optimizer(cls, model: nn.Module, recipe: DETRRecipe) -> torch.optim.Optimizer:
        """AdamW; the backbone at ``backbone_lr_mult`` x lr (TrainLoop reads ``lr_mult``)."""
        backbone, rest = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (backbone if n.startswith(BACKBONE) else rest).append(p)
        return torch.optim.AdamW([{"params": rest, "lr_mult": 1.0},
                                  {"params": backbone, "lr_mult": recipe.backbone_lr_mult}],
                                 lr=recipe.lr, weight_decay=recipe.weight_decay)

