"""InsLoc (Yang, Wu, Zhou, Lin; CVPR 2021, "Instance Localization for Self-supervised
Detection Pretraining", arXiv:2102.08318; official code limbo0000/InstanceLoc).

Pseudo-code (paper Sec. 3, Fig. 2; official ``insloc_fpn.py``), recognisable in ``views``
and ``forward``:
    fg = image i;  bg_q, bg_k = two random images of the dataset, resized to 256 x 256
    x_q, b_q = paste(random_resized_crop(fg) rescaled to w, h ~ U[128, 255), bg_q)
    x_k, b_k = paste(random_resized_crop(fg) rescaled likewise, bg_k)   (independent draws)
    x_q, x_k = flip(MoCo v2 pixel aug(x)), boxes flipped with their pixels
    b'_q = random anchor with IoU(b'_q, b_q) > 0.5 (after NMS 0.7 on random scores)
    for level l in P2..P5:
        q_l = head(RoIAlign(f_q(x_q)[l], b'_q if l == P5 else b_q))     ResNet+FPN+4conv2fc+fc
        k_l = head'(RoIAlign(f_k(x_k)[l], b_k))                         momentum copy, Shuffle-BN
        L += InfoNCE(q_l, k_l, queue_l, tau=0.2)
    enqueue(k_P2..k_P5) with one shared pointer;  f_k = m f_k + (1 - m) f_q, m = 0.999

Choices and official-vs-paper decisions: docs/methods/insloc.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import box_iou, nms

from methods.augment import MOCO_V2_AUG, to_tensor
from methods.backbones import resnet_stages, stage_channels
from methods.config import ConfigError
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import momentum_copy, update_momentum
from methods.geometry import ViewGeometry, random_resized_crop, whole_view
from methods.losses import level_info_nce
from methods.queues import LevelQueues
from methods.registry import register_method
from methods.roi import ResNetFPN, box_head, export_parts, multilevel_roi_align
from methods.dist import gather
from methods.shuffle_bn import in_bn_groups, shuffle_bn

ARCHS = ("fpn", "c4")
C4_STRIDE = 16


# -- composites ---------------------------------------------------------------------------
def rescaled_size(w: int, h: int, bound: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale(img, bound)``: (w, h) scaled, aspect kept, so that the long side is at
    most max(bound) and the short side at most min(bound)."""
    s = min(max(bound) / max(w, h), min(bound) / min(w, h))
    return max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))


def anchor_grid(width: int, height: int, stride: int = 16, scales=(2, 4, 8, 16),
                ratios=(0.5, 0.75, 1.0, 1.5, 2.0)) -> torch.Tensor:
    """(A, 4) xyxy anchors as mmdet's ``AnchorGenerator(strides=[stride])`` lays them over a
    ``width`` x ``height`` image: base size = stride, ratio = h / w, centres at multiples of
    the stride (official InsLoc ``AnchorAugHead`` on P4)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    s = torch.tensor(scales, dtype=torch.float64)
    hr = r.sqrt()
    ws = (stride / hr[:, None] * s[None, :]).reshape(-1)
    hs = (stride * hr[:, None] * s[None, :]).reshape(-1)
    base = torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], 1)
    xs = torch.arange(math.ceil(width / stride), dtype=torch.float64) * stride
    ys = torch.arange(math.ceil(height / stride), dtype=torch.float64) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], -1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).float()


def anchor_augment(box: np.ndarray, anchors: torch.Tensor, rng: np.random.Generator,
                   iou_thresh: float = 0.5, nms_thresh: float = 0.7) -> np.ndarray:
    """InsLoc's bounding-box augmentation (Sec. 3.3, official ``AnchorAugHead`` +
    ``get_stage2_bboxes``): the anchors with IoU > ``iou_thresh`` to ``box``, NMS at
    ``nms_thresh`` with random scores, one survivor at random. No such anchor: ``box``."""
    b = torch.as_tensor(np.asarray(box, dtype=np.float32).reshape(1, 4))
    cand = anchors[box_iou(b, anchors)[0] > iou_thresh]
    if len(cand) == 0:
        return np.asarray(box, dtype=np.float32).reshape(4)
    keep = nms(cand, torch.from_numpy(rng.random(len(cand)).astype(np.float32)), nms_thresh)
    return cand[keep[int(rng.integers(len(keep)))]].numpy()


# -- model --------------------------------------------------------------------------------
class InsLocEncoder(ResNetFPN):
    """ResNet + FPN (P2-P5, BN) + RoIAlign of one box per level + 4conv2fc head + projection:
    the part that has a momentum twin. ``forward(images, boxes (N, L, 4))`` -> (N, L, dim).
    C4: RoIAlign on C4, res5 + average pool + fc1 in place of the 4conv1fc box head."""

    def __init__(self, cfg: "InsLoc.Config"):
        c4 = cfg.arch == "c4"
        super().__init__(cfg.backbone, 0 if c4 else cfg.fpn_channels, cfg.head_norm)
        self.c4 = c4
        self.roi_size = cfg.roi_size or (14 if c4 else 7)
        self.sampling_ratio = cfg.roi_sampling_ratio
        fc = cfg.head_fc_dim
        if c4:
            self.strides = (C4_STRIDE,)
            self.box_head = None
            self.fc1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(stage_channels(cfg.backbone)[-1], fc), nn.ReLU(inplace=True))
        else:
            self.box_head = box_head(self.out_channels, self.roi_size, cfg.head_conv_dim, cfg.head_num_convs,
                                     fc, cfg.head_norm)
            self.fc1 = None
        self.fc2 = nn.Sequential(nn.Linear(fc, fc), nn.ReLU(inplace=True))
        self.proj = nn.Linear(fc, cfg.dim)
        for m in (self.box_head, self.fc1, self.fc2):   # official ConvFCBBoxInsClsHead.init_weights
            for layer in (m.modules() if m is not None else ()):
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        nn.init.normal_(self.proj.weight, std=0.01)
        nn.init.zeros_(self.proj.bias)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.c4:
            return resnet_stages(self.backbone, x, num_stages=3)[-1:]
        return super().feature_maps(x)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        N, L = boxes.shape[:2]
        levels = torch.arange(L, device=boxes.device).expand(N, 1, L)
        roi = multilevel_roi_align(self.feature_maps(x), self.strides, boxes[:, None], levels,
                                   self.roi_size, self.sampling_ratio)
        h = self.fc1(self.backbone.layer4(roi)) if self.c4 else self.box_head(roi)
        return self.proj(self.fc2(h)).reshape(N, L, -1)


@register_method("insloc")
class InsLoc(PretrainMethod):
    # configs/FPN/insloc_fpn_200ep.py: SGD lr 0.03 (batch 256), momentum 0.9, nesterov, wd 1e-4,
    # cosine to 0 by epoch (lr_config CosineAnealing, min_lr 0, by_epoch=True: one lr per
    # epoch), no warm-up, 200 epochs (400 in the model zoo)
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256,
                            weight_decay=1e-4, momentum=0.9, nesterov=True, schedule="cosine",
                            cosine_per_epoch=True, warmup_epochs=0, epochs=200)
    # fine-tuning with the official R_50_FPN_*_insloc.yaml head: FastRCNNConvFCHeadExtraNorm
    # (4conv1fc + a norm after fc1) on the R-CNNs with FPN; the C4 detectors have no such field
    finetune_detector = {"box_head_extra_norm": True}
    # tiny: the composite shrinks 256 -> 64 px (as MoCo's 224 -> 64 crop): foreground sides
    # U[32, 64), anchor stride 16 -> 4 (anchors 8-64 px, the paper's 32-256 scaled by 1/4).
    # FPN 64 / box head conv 64, fc 256 equal the tiny detector's so every key transfers.
    # 100 steps x 32 keys: a 1024-key queue per level is refilled three times.
    scales = {"tiny": {"method": {"backbone": "resnet18", "fpn_channels": 64, "head_conv_dim": 64,
                                  "head_fc_dim": 256, "background_size": 64, "fg_size": (32, 64),
                                  "anchor_stride": 4, "queue_size": 1024},
                       "recipe": {"batch_size": 32}},
              "paper": {"method": {"bn_groups": 8, "shuffle_bn_splits": 8}}}   # official: 8 GPUs x 32
    sync_bn = False   # per-process BN (bn_groups) with Shuffle-BN, as MoCo v2 (official configs: no SyncBN)
    group_fields = ("bn_groups", "shuffle_bn_splits")
    needs_source = True

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        arch: str = "fpn"                # "fpn" (official) | "c4" (reconstruction, see module doc)
        # -- composites (official copy_and_paste.py; insloc_fpn_200ep.py) --------------------
        background_size: int = 256       # base_scale (256, 256)
        fg_size: tuple[int, ...] = (128, 255)        # fore_scale: w, h ~ U[lo, hi)
        fg_crop_scale: tuple[float, ...] = (0.2, 1.0)
        fg_crop_ratio: tuple[float, ...] = (0.5, 2.0)
        flip_prob: float = 0.5
        # -- bounding-box augmentation (AnchorAugHead, Sec. 3.3) -----------------------------
        box_aug: bool = True
        anchor_stride: int = 16
        anchor_scales: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
        anchor_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
        anchor_iou: float = 0.5
        anchor_nms: float = 0.7
        box_aug_levels: tuple[int, ...] = (-1,)      # levels pooling the augmented box: P5 only
        # -- model ---------------------------------------------------------------------------
        fpn_channels: int = 256
        head_norm: str = "bn"            # BN in FPN and box head (official norm_cfg=BN)
        head_num_convs: int = 4
        head_conv_dim: int = 256
        head_fc_dim: int = 1024
        roi_size: int = 0                # 0: 7 on FPN levels, 14 on C4
        roi_sampling_ratio: int = 0      # adaptive (official sample_num=0)
        dim: int = 128
        # -- contrast (momentum_cfg=dict(dim=128, K=65536, m=0.999, T=0.2)) ------------------
        queue_size: int = 65536
        temperature: float = 0.2
        momentum: float = 0.999
        level_weights: tuple[float, ...] = ()        # empty: 1 per level (level_loss_weights)
        # BatchNorm groups of the global batch (methods.shuffle_bn), a multiple of the process
        # count: one GPU's worth below paper scale, the official 8 GPUs at paper scale
        bn_groups: int = 1               # query encoder (per-process BN, official: no SyncBN)
        shuffle_bn_splits: int = 2       # key encoder (Shuffle-BN)

    def __init__(self, cfg: Config):
        _validate(cfg)
        super().__init__(cfg)
        self.encoder_q = InsLocEncoder(cfg)
        self.encoder_k = momentum_copy(self.encoder_q)
        L = self.encoder_q.num_levels
        self.level_names = ["c4"] if cfg.arch == "c4" else [f"p{i + 2}" for i in range(L)]
        self.aug_levels = sorted({i % L for i in cfg.box_aug_levels if -L <= i < L})
        if len(self.aug_levels) != len(set(cfg.box_aug_levels)):
            raise ConfigError(f"method.box_aug_levels: expected indices in [-{L}, {L}) for {L} levels, "
                              f"got {list(cfg.box_aug_levels)}")
        if cfg.level_weights and len(cfg.level_weights) != L:
            raise ConfigError(f"method.level_weights: expected {L} weights ({', '.join(self.level_names)}), "
                              f"got {list(cfg.level_weights)}")
        self.queues = LevelQueues(cfg.dim, cfg.queue_size, L)
        S = cfg.background_size
        self.anchors = anchor_grid(S, S, cfg.anchor_stride, cfg.anchor_scales, cfg.anchor_ratios)

    # -- views (DataLoader worker) --------------------------------------------------------
    def composite(self, fg: Image.Image, bg: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        """A random crop of ``fg`` rescaled and pasted at a random place on ``bg`` resized to
        ``background_size``; returns (composite, (4,) box of the pasted pixels)."""
        c, S = self.cfg, self.cfg.background_size
        canvas = whole_view(bg.width, bg.height, S).apply_image(bg)
        crop = random_resized_crop(fg.width, fg.height, rng, tuple(c.fg_crop_scale), tuple(c.fg_crop_ratio))
        bound = (int(rng.integers(*c.fg_size)), int(rng.integers(*c.fg_size)))
        instance = ViewGeometry(crop, rescaled_size(crop[2] - crop[0], crop[3] - crop[1], bound))
        w, h = instance.out_size
        x, y = int(rng.integers(0, S - w)), int(rng.integers(0, S - h))
        canvas.paste(instance.apply_image(fg), (x, y))
        box = instance.map_boxes(np.array([crop], dtype=np.float64))[0] + (x, y, x, y)
        return canvas, box

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        if source is None or len(source) == 0:
            raise ValueError("insloc: views need `source` (the dataset the backgrounds are drawn from)")
        c, S = self.cfg, self.cfg.background_size
        fg = Image.fromarray(record["image"])
        out = {}
        for name in ("q", "k"):
            bg = Image.fromarray(source.record(int(rng.integers(len(source))))["image"])
            img, box = self.composite(fg, bg, rng)
            view = whole_view(S, S, S, flip=bool(rng.random() < c.flip_prob))
            out[f"im_{name}"] = to_tensor(MOCO_V2_AUG(view.apply_image(img), rng))
            out[f"box_{name}"] = torch.from_numpy(view.map_boxes(box)[0].astype(np.float32))
        if c.box_aug:
            out["box_q_aug"] = torch.from_numpy(
                anchor_augment(out["box_q"].numpy(), self.anchors, rng, c.anchor_iou, c.anchor_nms))
        return out

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.encoder_q.parameters())}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        update_momentum(self.encoder_q, self.encoder_k, self.cfg.momentum)   # constant m (MoCo)

    def level_boxes(self, box: torch.Tensor, box_aug: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 4) -> (N, L, 4): the box each level pools; ``aug_levels`` take ``box_aug``
        (official ``box_replaced_with_gt=[True, True, True, False]``)."""
        boxes = box[:, None, :].repeat(1, self.encoder_q.num_levels, 1)
        if box_aug is not None:
            boxes[:, self.aug_levels] = box_aug[:, None, :]
        return boxes

    def forward(self, batch: dict) -> dict:
        q = in_bn_groups(self.encoder_q, self.encoder_q, batch["im_q"],
                         self.level_boxes(batch["box_q"], batch.get("box_q_aug")), groups=self.cfg.bn_groups)
        with torch.no_grad():
            k = shuffle_bn(self.encoder_k, self.encoder_k, batch["im_k"], self.level_boxes(batch["box_k"]),
                           groups=self.cfg.shuffle_bn_splits)
        loss, losses, logits = level_info_nce(q, k, self.queues.keys.clone(), self.cfg.temperature,
                                              self.cfg.level_weights or None)
        self.queues.enqueue(gather(k))
        logs = {f"loss_{n}": l.detach() for n, l in zip(self.level_names, losses)}
        logs["acc1"] = torch.stack([(lg.argmax(1) == 0).float().mean() for lg in logits]).mean()
        return {"loss": loss, **logs}

    def export(self) -> dict[str, torch.Tensor]:
        """Backbone (bare torchvision names; C4: res5 included), ``fpn.*`` and the box head's
        4 convs + fc1 as ``box_head.*``; fc2 and the projection are dropped."""
        return export_parts(self.encoder_q.backbone, fpn=self.encoder_q.fpn, box_head=self.encoder_q.box_head)


def _validate(c: "InsLoc.Config") -> None:
    def check(field, ok, want):
        if not ok:
            raise ConfigError(f"method.{field}: expected {want}, got {getattr(c, field)!r}")
    check("arch", c.arch in ARCHS, " | ".join(ARCHS))
    check("head_norm", c.head_norm in ("bn", "none"), "bn | none")
    check("background_size", c.background_size >= 32, ">= 32 px (P5 has stride 32)")
    check("fg_size", len(c.fg_size) == 2 and 1 <= c.fg_size[0] < c.fg_size[1] <= c.background_size,
          "[lo, hi) with 1 <= lo < hi <= background_size")
    check("fg_crop_scale", len(c.fg_crop_scale) == 2 and 0 < c.fg_crop_scale[0] <= c.fg_crop_scale[1] <= 1,
          "[lo, hi] in (0, 1]")
    check("fg_crop_ratio", len(c.fg_crop_ratio) == 2 and 0 < c.fg_crop_ratio[0] <= c.fg_crop_ratio[1],
          "[lo, hi] with 0 < lo <= hi")
    check("flip_prob", 0 <= c.flip_prob <= 1, "in [0, 1]")
    check("anchor_stride", c.anchor_stride > 0, "> 0")
    check("anchor_scales", len(c.anchor_scales) > 0 and min(c.anchor_scales) > 0, "positive scales")
    check("anchor_ratios", len(c.anchor_ratios) > 0 and min(c.anchor_ratios) > 0, "positive ratios")
    check("anchor_iou", 0 <= c.anchor_iou < 1, "in [0, 1)")
    check("anchor_nms", 0 < c.anchor_nms <= 1, "in (0, 1]")
    check("queue_size", c.queue_size > 0, "> 0")
    check("temperature", c.temperature > 0, "> 0")
    check("momentum", 0 <= c.momentum <= 1, "in [0, 1]")
    check("bn_groups", c.bn_groups >= 1, ">= 1")
    check("shuffle_bn_splits", c.shuffle_bn_splits >= 1, ">= 1")
