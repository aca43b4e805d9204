"""AlignDet (Li, Wu, Wang, Chen, Qin, Xiao, Wang, Zheng, Pan; ICCV 2023, "AlignDet: Aligning
Pre-training and Fine-tuning in Object Detection", arXiv:2307.11077; official code
liming-ai/AlignDet on mmdet 2.25).

Box-domain pretraining of the very detector that will be fine-tuned (Faster/Mask R-CNN,
RetinaNet, FCOS, DETR), over a frozen backbone produced by an image-domain method (the run's
parent). Pseudo-code (paper Sec. 3.2, Fig. 3), recognisable in ``forward``:
    b          = selective-search proposals of the image, each its own instance id
    V1, V2     = two views (resize short side in {640..800}, flip, one RandAugment op)
    f          = frozen backbone (no gradient, BN in eval mode)
    online     = the detector's neck + heads, classification branch -> 256-d embedding
    target     = EMA of online (momentum 0.996 -> 1, cosine, per step)
    z1, y1, L_reg = online(f(V1), b1)      samples (RoIs / anchors / points) with instance ids
    z2, y2        = target(f(V2), b2)      (no gradient)
    L = contrastive(z1, y1, z2, y2) + L_reg     (``methods.losses.instance_contrastive``)

The detector is injected (``detector_spec`` / ``attach_detector``, methods/base.py).

Choices and official-vs-paper decisions: docs/methods/aligndet.md
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from methods.augment import to_tensor
from methods.config import ConfigError
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import cosine_schedule, momentum_copy, update_momentum
from methods.geometry import whole_view
from methods.heads import MLPHead
from methods.losses import BACKGROUND, instance_contrastive
from methods.pseudo_classes import roi_features
from methods.randaug import SOFT_TEACHER_OPS, one_of
from methods.registry import register_method
from methods.roi import export_parts

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos", "detr")


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class BoxDomainRecipe:
    """A detector's box-domain recipe: the ``PretrainRecipe`` plus what it cannot express yet
    and the pretraining stage must apply: the multistep drops, as fractions of the run (lr x 0.1
    at each), and gradient clipping (max norm, None: none)."""
    recipe: PretrainRecipe
    milestones: tuple[float, ...]
    clip_grad: float | None = None


# Faster/Mask R-CNN, RetinaNet, FCOS (paper Sec. 4.1; official schedule_1x.py): SGD momentum
# 0.9, wd 1e-4, lr 0.02 at batch 16 (0.01 RetinaNet/FCOS), 12 epochs, lr x0.1 at epochs 8 and
# 11, linear warm-up over 500 iterations = 500 / ceil(118287 / 16) = 0.0676 COCO epochs.
_SGD_1X = PretrainRecipe(optimizer="sgd", base_lr=0.02, lr_batch=16, batch_size=16, weight_decay=1e-4,
                         momentum=0.9, schedule="multistep", warmup_epochs=500 / 7393, epochs=12)
# DETR (official configs/selfsup/detr.py): AdamW lr 2e-4 with auto_scale_lr(enable=True,
# base_batch_size=64), i.e. 2e-4 per 64 images; launched on 8 GPUs x samples_per_gpu 2 = 16
# images, mmdet 2.25 apis/train.py auto_scale_lr trains at 2e-4 * 16 / 64 = 5e-5. wd 1e-4,
# gradient clipping at max norm 0.1, 50 epochs, lr x0.1 at epoch 40, no warm-up.
_DETR = PretrainRecipe(optimizer="adamw", base_lr=2e-4, lr_batch=64, batch_size=16, weight_decay=1e-4,
                       momentum=0.9, schedule="multistep", warmup_epochs=0, epochs=50)
RECIPES = {
    "mask_rcnn": BoxDomainRecipe(_SGD_1X, (8 / 12, 11 / 12)),
    "retinanet": BoxDomainRecipe(dataclasses.replace(_SGD_1X, base_lr=0.01), (8 / 12, 11 / 12)),
    "fcos": BoxDomainRecipe(dataclasses.replace(_SGD_1X, base_lr=0.01), (8 / 12, 11 / 12)),
    "detr": BoxDomainRecipe(_DETR, (40 / 50,), clip_grad=0.1),
}

# What each detector's builder must be asked for (the pretrained parts must exist there)
DETECTOR_OVERRIDES = {"mask_rcnn": {"box_head": "4conv1fc"}}
# Faster and Mask R-CNN share one pretrained model (the mask head is not pretrained): a run for
# Faster R-CNN is the Mask R-CNN run (same config, same run key); its export loads into both
SHARED = {"faster_rcnn": "mask_rcnn"}
# Pseudo boxes per image, by detector (0: all); RetinaNet: official SelectTopKProposals(50)
MAX_PROPOSALS = {"retinanet": 50}


# --------------------------------------------------------------------------- method
@register_method("aligndet")
class AlignDet(PretrainMethod):
    recipe = RECIPES["mask_rcnn"].recipe     # the default detector's; ``recipe_for`` for the others
    # Official README: fine-tuning after AlignDet uses lr x 1.5 and weight decay x 0.5, factors
    # on each detector's own recipe (R-CNN 0.02 -> 0.03; RetinaNet/FCOS 0.01 -> 0.015)
    finetune_factors = {"lr": 1.5, "weight_decay": 0.5}
    # box-domain pretraining reads the detection training images, unlabeled (paper Sec. 4.1:
    # COCO train2017; the recipe's 500 warm-up iterations count its 7393 iterations per epoch)
    pretrain_images = "train"
    # tiny: 128-px scenes; views at the tiny detector's training sizes; 8 boxes per image;
    # batch 4 (lr 0.005 by the linear rule). The tiny scale counts 4 paper epochs per step, so
    # 12 epochs would be 3 steps: 400 "epochs" give 100 steps, 20 of them (5 steps) warm-up.
    # DETR: 64 pseudo-classes, not 256: the tiny set has ~2k proposals (~30 per class), the
    # micro one ~100 (k-means needs at least k points).
    scales = {"tiny": {"method": {"short_sides": [112, 128, 144], "max_size": 160, "max_proposals": 8,
                                  "detr_classes": 64},
                       "recipe": {"batch_size": 4, "epochs": 400, "warmup_epochs": 20}}}

    @dataclass
    class Config(MethodConfig):
        detector: str = "mask_rcnn"     # faster_rcnn (= mask_rcnn) | mask_rcnn | retinanet | fcos | detr
        embed_dim: int = 256            # the classification branch's output (paper Sec. 3.2)
        temperature: float = 0.5        # official ContrastiveLoss(temperature=0.5) in every config
        contrastive_weight: float = 1.0
        momentum: float = 0.996         # official SelfSupDetector base_momentum; cosine to 1
        # -- views (official coco_soft-teacher.py) --------------------------------------------
        short_sides: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
        max_size: int = 1333
        size_divisor: int = 32          # mmdet Pad(size_divisor=32)
        flip_prob: float = 0.5
        rand_ops: tuple[str, ...] = tuple(SOFT_TEACHER_OPS)
        max_proposals: int = -1         # pseudo boxes per image: -1 the detector's default, 0 all
        # -- proposals: official file train2017_ratio3size0008: ratio in [1/3, 3], scale in [0, 0.8]
        ss_mode: str = "fast"
        ss_max_side: int = 0
        ss_min_scale: float = 0.0
        # -- R-CNN (official train_cfg) -------------------------------------------------------
        rpn_samples: int = 4096
        rpn_pos_fraction: float = 1.0
        roi_samples: int = 4096
        roi_pos_iou: float = 0.5
        # -- RetinaNet (official train_cfg.sampler: RandomSampler(num=2048, pos_fraction=1.0,
        # neg_pos_ub=-1), per image): the anchors that enter the loss; 0: every non-ignored one
        retina_samples: int = 2048
        retina_pos_fraction: float = 1.0
        # -- FCOS (official SelfSupFCOSHead.loss: sampler.num = 2048 points per view over the
        # GPU's images, positives first): "pool" = over the loss pool's images (one GPU's), or
        # "image" = 2048 for each image
        fcos_points: int = 2048
        fcos_points_per: str = "pool"
        # -- DETR (official configs/_base_/models/selfsup_detr_r50.py) ------------------------------
        detr_classes: int = 256          # k-means pseudo-classes of the proposals
        detr_no_object_weight: float = 0.1
        detr_cost: tuple[float, ...] = (1.0, 5.0, 2.0)     # Hungarian cost: class, L1, GIoU
        detr_loss: tuple[float, ...] = (1.0, 5.0, 2.0)     # loss weights: class, L1, GIoU
        # -- the loss pool: the official loss is one GPU's (samples_per_gpu=2), its contrastive
        # negatives, normalisations and padding those 2 images'; the step's loss is their mean
        pool_images: int = 2

        def __post_init__(self):
            self.detector = SHARED.get(self.detector, self.detector)

    def __init__(self, cfg: Config):
        _validate(cfg)
        super().__init__(cfg)
        self.backbone: nn.Module | None = None
        self.online: nn.Module | None = None
        self.target: nn.Module | None = None
        self.current_momentum = cfg.momentum
        # the progress k / K at the start of the next iteration (``momentum_update``); a buffer,
        # so a resumed run's checkpoint carries it
        self.register_buffer("ema_progress", torch.zeros((), dtype=torch.float64))

    @classmethod
    def pretrain_detector(cls, method_cfg: dict) -> str | None:
        return method_cfg.get("detector", cls.Config.detector)

    @staticmethod
    def recipe_for(detector: str) -> BoxDomainRecipe:
        """The box-domain recipe of ``detector`` (the class's ``recipe`` is Mask R-CNN's)."""
        if detector not in RECIPES:
            raise ConfigError(f"method.detector: unknown {detector!r} ({' | '.join(DETECTORS)})")
        return RECIPES[detector]

    # -- what the harness provides ----------------------------------------------------------
    def proposal_params(self) -> dict | None:
        return {"mode": self.cfg.ss_mode, "max_side": self.cfg.ss_max_side or None,
                "filter_kwargs": {"min_scale": self.cfg.ss_min_scale}}

    def detector_spec(self) -> dict | None:
        return {"name": self.cfg.detector, **DETECTOR_OVERRIDES.get(self.cfg.detector, {})}

    def pseudo_class_params(self) -> dict | None:
        # paper Sec. 3.3: PCA to 256 dimensions, then k-means into 256 classes (detr_classes)
        return {"k": self.cfg.detr_classes, "pca_dim": 256} if self.cfg.detector == "detr" else None

    def attach_detector(self, detector: nn.Module) -> None:
        """Split the injected detector into the frozen backbone and the online neck + heads
        (classification branch -> embedding); the target is the online part's EMA copy."""
        if self.online is not None:
            raise RuntimeError("aligndet: a detector is attached already")
        heads_cls = HEADS[self.cfg.detector]
        backbone, online = heads_cls.from_detector(detector, self.cfg)
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.eval()
        self.online = online
        self.target = momentum_copy(online)

    @torch.no_grad()
    def proposal_features(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(P, C): the input of DETR's pseudo-class clustering (``methods.pseudo_classes``) for
        one normalised image (3, H, W) and its proposals (P, 4, pixels): RoIAlign of each box on
        the frozen backbone's last feature map, averaged over the 7x7 cells."""
        online = self._attached()
        feats = online.backbone_features(self.backbone.eval(), ImageList(image[None], [tuple(image.shape[-2:])]))
        fmap = feats[0] if isinstance(feats, tuple) else list(feats.values())[-1]
        return roi_features(fmap, [boxes], stride=image.shape[-1] / fmap.shape[-1])

    # -- views (DataLoader worker) --------------------------------------------------------
    def pseudo_boxes(self, record: dict) -> np.ndarray:
        if record.get("proposals") is None:
            raise ValueError(f"aligndet: record {record.get('index', '?')} has no 'proposals' "
                             f"(AlignDet reads the selective-search proposal cache)")
        boxes = np.asarray(record["proposals"], dtype=np.float64).reshape(-1, 4)
        k = self.cfg.max_proposals if self.cfg.max_proposals >= 0 else MAX_PROPOSALS.get(self.cfg.detector, 0)
        return boxes[:k] if k else boxes

    def pseudo_class_labels(self, record: dict, n: int) -> np.ndarray:
        """DETR: the k-means class of each of the first ``n`` proposals (``record
        ["pseudo_classes"]``, aligned with ``record["proposals"]``; methods/pseudo_classes.py)."""
        labels = record.get("pseudo_classes")
        where = f"aligndet: record {record.get('index', '?')}"
        if labels is None:
            raise ValueError(f"{where} has no 'pseudo_classes' (DETR reads the proposals' k-means classes)")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(np.asarray(record["proposals"]).reshape(-1, 4)):
            raise ValueError(f"{where}: 'pseudo_classes' has {len(labels)} entries for "
                             f"{len(np.asarray(record['proposals']).reshape(-1, 4))} proposals")
        if len(labels) and not (0 <= labels.min() and labels.max() < self.cfg.detr_classes):
            raise ValueError(f"{where}: 'pseudo_classes' outside [0, {self.cfg.detr_classes})")
        return labels[:n]

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        """Two views of the whole image (no crop): short side from ``short_sides`` (long side
        <= ``max_size``), flip, one soft-teacher RandAugment op; pseudo boxes follow."""
        c = self.cfg
        img = Image.fromarray(record["image"])
        W, H = img.size
        boxes = self.pseudo_boxes(record)
        out = {}
        if c.detector == "detr":
            out["classes"] = torch.from_numpy(self.pseudo_class_labels(record, len(boxes)))
        for v in ("v1", "v2"):
            s = c.short_sides[int(rng.integers(len(c.short_sides)))]
            scale = min(s / min(W, H), c.max_size / max(W, H))
            g = whole_view(W, H, (max(1, round(W * scale)), max(1, round(H * scale))),
                           flip=bool(rng.random() < c.flip_prob))
            pil, _ = one_of(g.apply_image(img), rng, tuple(c.rand_ops))
            out[v] = to_tensor(pil)
            b = g.map_boxes(boxes)
            b[:, [0, 2]] = b[:, [0, 2]].clip(0, g.out_size[0])
            b[:, [1, 3]] = b[:, [1, 3]].clip(0, g.out_size[1])
            out[f"boxes_{v}"] = torch.from_numpy(b.astype(np.float32))
        out["seed"] = int(rng.integers(2 ** 62))   # the torch draws of its pool (sampling, dropout)
        return out

    def check_split(self, batch_per_process: int) -> None:
        if batch_per_process % self.cfg.pool_images:
            raise ConfigError(f"method.pool_images: {batch_per_process} images per process do not form pools "
                              f"of {self.cfg.pool_images} (the per-process batch must be a multiple of it)")

    def collate(self, samples: list[dict]) -> dict:
        """``pools``: the batch in pools of ``pool_images`` images (``collate_pool``), the
        unit the loss is computed on, whatever the process count."""
        self.check_split(len(samples))
        P = self.cfg.pool_images
        return {"pools": [self.collate_pool(samples[i:i + P]) for i in range(0, len(samples), P)]}

    def collate_pool(self, samples: list[dict]) -> dict:
        """Views padded (bottom/right, zeros = the mean colour) to a common size divisible by
        ``size_divisor``; ``sizes_v*`` (N, 2) the unpadded (h, w); ``ids``: per image the
        instance id of each pseudo box, unique within the pool (ids run 0, 1, ... over the
        pool; the same box has the same id in both views); ``seed`` the first image's."""
        out, offset, ids = {"seed": samples[0]["seed"]}, 0, []
        for s in samples:
            n = len(s["boxes_v1"])
            ids.append(torch.arange(offset, offset + n))
            offset += n
        out["ids"] = ids
        if "classes" in samples[0]:
            out["classes"] = [s["classes"] for s in samples]
        d = self.cfg.size_divisor
        for v in ("v1", "v2"):
            imgs = [s[v] for s in samples]
            H = math.ceil(max(t.shape[1] for t in imgs) / d) * d
            W = math.ceil(max(t.shape[2] for t in imgs) / d) * d
            batch = imgs[0].new_zeros(len(imgs), 3, H, W)
            for i, t in enumerate(imgs):
                batch[i, :, :t.shape[1], :t.shape[2]] = t
            out[v] = batch
            out[f"sizes_{v}"] = torch.tensor([t.shape[1:] for t in imgs], dtype=torch.long)
            out[f"boxes_{v}"] = [s[f"boxes_{v}"] for s in samples]
        return out

    # -- model ----------------------------------------------------------------------------
    def _attached(self) -> nn.Module:
        if self.online is None:
            raise RuntimeError("aligndet: no detector attached (the harness calls "
                               "attach_detector(build(detector_spec())) before training)")
        return self.online

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()      # frozen: BN statistics never move (official norm_eval=True)
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self._attached().parameters() if p.requires_grad]}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """target = m target + (1 - m) online after the optimizer step of iteration k (0-based)
        of K, m = 1 - (1 - m0)(cos(pi k / K) + 1)/2: official ``MomentumUpdateHook``, which sets
        m in ``before_train_iter`` from ``runner.iter`` = k and applies it in ``after_train_iter``
        (m0 after the first step, m((K-1)/K) < 1 after the last). The harness calls this after
        the step with ``progress`` = (k + 1) / K (benchmark/stages/pretrain.py): k / K is the
        progress of the previous call (0 before the first), kept in ``ema_progress``."""
        self.current_momentum = cosine_schedule(float(self.ema_progress), self.cfg.momentum)
        online = self._attached()
        update_momentum(online, self.target, self.current_momentum, copied=online.copied)
        self.ema_progress.fill_(progress)

    def forward(self, batch: dict) -> dict:
        """The mean over the batch's pools of each pool's loss (``pool_loss``); every torch
        draw of a pool (RoI and point sampling, DETR's dropout) from its seed, so a pool
        trains alike on any process."""
        device = batch["pools"][0]["v1"].device
        outs = []
        for pool in batch["pools"]:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(pool["seed"])
                outs.append(self.pool_loss(pool))
        return {k: torch.stack([o[k] for o in outs]).mean() for k in outs[0]}

    def pool_loss(self, batch: dict) -> dict:
        online = self._attached()
        ids = batch["ids"]
        extra = {"classes": batch["classes"]} if "classes" in batch else {}   # DETR's pseudo-classes
        im1 = ImageList(batch["v1"], _sizes(batch["sizes_v1"]))
        im2 = ImageList(batch["v2"], _sizes(batch["sizes_v2"]))
        with torch.no_grad():
            f1 = online.backbone_features(self.backbone, im1)
            f2 = online.backbone_features(self.backbone, im2)
        z1, y1, reg = online(im1, f1, batch["boxes_v1"], ids, **extra)
        with torch.no_grad():
            z2, y2, _ = self.target(im2, f2, batch["boxes_v2"], ids, **extra)
        con = self.cfg.contrastive_weight * instance_contrastive(z1, y1, z2, y2, self.cfg.temperature)
        loss = con + sum(reg.values())
        logs = {k: v.detach() for k, v in reg.items()}
        return {"loss": loss, "loss_contrastive": con.detach(), **logs,
                "samples_per_id": (y1 >= 0).sum().float().detach() / max(1, sum(len(i) for i in ids))}

    def export(self) -> dict[str, torch.Tensor]:
        """Backbone (bare torchvision names) + the online neck and heads without their final
        classifiers/regressors, in the detector registry's key space."""
        return self._attached().export_state(self.backbone)


def _sizes(sizes: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in sizes.tolist()]


# --------------------------------------------------------------------------- heads
class _Heads(nn.Module):
    """The online part of a detector: ``forward(images, backbone features, boxes, ids)`` ->
    (sample embeddings, sample ids, regression losses); ``export_parts`` names its pretrained
    modules by their key prefix in the export."""

    copied: tuple[str, ...] = ()     # parameters the target copies instead of averaging

    @staticmethod
    def backbone_features(backbone: nn.Module, images: ImageList):
        return backbone(images.tensors)

    def export_state(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        return export_parts(backbone, **self.export_parts())


class RCNNHeads(_Heads):
    """FPN + RPN + RoIAlign + 4conv1fc box head + (fc-ReLU-fc embedding, L1 box regression)
    of a torchvision Faster/Mask R-CNN. ``forward`` -> (RoI embeddings, RoI ids, losses)."""

    def __init__(self, detector: nn.Module, cfg: AlignDet.Config):
        super().__init__()
        from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
        rh = detector.roi_heads
        fcs = [m for m in rh.box_head.modules() if isinstance(m, nn.Linear)]
        if not fcs:
            raise TypeError(f"aligndet: {cfg.detector}: roi_heads.box_head has no fc layer (expected "
                            f"torchvision's FastRCNNConvFCHead), got {type(rh.box_head).__name__}")
        fc = fcs[-1].out_features
        self.fpn = detector.backbone.fpn
        self.rpn = detector.rpn
        # official rpn sampler: RandomSampler(num=4096, pos_fraction=1.0): every positive, then
        # negatives up to 4096
        self.rpn.fg_bg_sampler = BalancedPositiveNegativeSampler(cfg.rpn_samples, cfg.rpn_pos_fraction)
        self.box_roi_pool = rh.box_roi_pool
        self.box_head = rh.box_head
        self.embed = MLPHead(fc, fc, cfg.embed_dim)      # official fc_cls: Linear-ReLU-Linear
        self.bbox_pred = nn.Linear(fc, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)   # mmdet fc_reg init
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = rh.box_coder
        # official rcnn assigner: pos 0.5, neg 0.5, min_pos_iou 0.5 (low-quality matches below
        # 0.5 never count)
        self.matcher = Matcher(cfg.roi_pos_iou, cfg.roi_pos_iou, allow_low_quality_matches=False)
        self.roi_samples = cfg.roi_samples

    @classmethod
    def from_detector(cls, detector: nn.Module, cfg) -> tuple[nn.Module, nn.Module]:
        for attr in ("backbone", "rpn", "roi_heads"):
            if not hasattr(detector, attr):
                raise TypeError(f"aligndet: detector {cfg.detector!r} has no .{attr} "
                                f"(expected a torchvision Faster/Mask R-CNN)")
        return detector.backbone.body, cls(detector, cfg)

    def sample_rois(self, proposals, boxes, ids):
        rois, roi_ids, targets = [], [], []
        for props, gt, gid in zip(proposals, boxes, ids):
            if len(gt) == 0:
                rois.append(props[:0])
                roi_ids.append(gid[:0])
                targets.append(props.new_zeros(0, 4))
                continue
            props = torch.cat([props, gt])                      # official add_gt_as_proposals
            m = self.matcher(box_iou(gt, props))
            pos = torch.nonzero(m >= 0).squeeze(1)
            if len(pos) > self.roi_samples:
                pos = pos[torch.randperm(len(pos), device=pos.device)[:self.roi_samples]]
            r, j = props[pos], m[pos]
            rois.append(r)
            roi_ids.append(gid[j])
            targets.append(self.box_coder.encode_single(gt[j], r))
        return rois, torch.cat(roi_ids), torch.cat(targets)

    def forward(self, images: ImageList, feats: dict, boxes: list, ids: list):
        feats = self.fpn(feats)
        proposals, rpn_losses = self.rpn(images, feats, [{"boxes": b} for b in boxes])
        rois, roi_ids, reg_targets = self.sample_rois(proposals, boxes, ids)
        x = self.box_head(self.box_roi_pool(feats, rois, images.image_sizes))
        emb, deltas = self.embed(x), self.bbox_pred(x)
        l1 = (deltas - reg_targets).abs().sum() / max(1, len(reg_targets))   # mmdet L1Loss, avg over RoIs
        return emb, roi_ids, {"loss_rpn_cls": rpn_losses["loss_objectness"],
                              "loss_rpn_box": rpn_losses["loss_rpn_box_reg"], "loss_box_l1": l1}

    def export_parts(self) -> dict[str, nn.Module]:
        return {"fpn": self.fpn, "rpn": self.rpn, "box_head": self.box_head}


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, A*k, H, W) -> (N, H*W*A, k): torchvision's order of anchors (location-major)."""
    N, _, H, W = x.shape
    return x.view(N, -1, k, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, k)


class DenseHeads(_Heads):
    """FPN + the towers of a torchvision one-stage detector (RetinaNet, FCOS), its output
    conv ``cls_logits`` replaced by an embedding head. Subclasses assign anchors/points."""

    embed_kernel = 1        # the first conv of the embedding head (RetinaNet 1x1, FCOS 3x3)

    def __init__(self, detector: nn.Module, cfg: AlignDet.Config):
        super().__init__()
        head = detector.head
        self.fpn = detector.backbone.fpn
        self.anchor_generator = detector.anchor_generator
        self.cls_convs = head.classification_head.conv
        self.reg_convs = head.regression_head.conv
        self.bbox_reg = head.regression_head.bbox_reg
        C, A = head.classification_head.cls_logits.in_channels, head.classification_head.num_anchors
        k = self.embed_kernel
        # official retina_cls / conv_cls: "following mocov2, fc-relu-fc" as convs -> 256 per anchor
        self.embed = nn.Sequential(nn.Conv2d(C, C, k, padding=k // 2), nn.ReLU(inplace=True),
                                   nn.Conv2d(C, A * cfg.embed_dim, 1))
        self.embed_dim = cfg.embed_dim
        self.box_coder = detector.box_coder

    @classmethod
    def from_detector(cls, detector: nn.Module, cfg) -> tuple[nn.Module, nn.Module]:
        head = getattr(detector, "head", None)
        if not (hasattr(detector, "backbone") and hasattr(detector, "anchor_generator")
                and hasattr(head, "classification_head") and hasattr(head.classification_head, "cls_logits")):
            raise TypeError(f"aligndet: detector {cfg.detector!r}: expected a torchvision one-stage "
                            f"detector (.backbone, .anchor_generator, .head.classification_head.cls_logits)")
        return detector.backbone.body, cls(detector, cfg)

    def dense(self, images: ImageList, feats: dict):
        """Per image: anchors (R, 4); batched: embeddings (N, R, D), tower features of the
        regression branch per level, and the anchors per level."""
        levels = list(self.fpn(feats).values())
        anchors = self.anchor_generator(images, levels)
        emb = torch.cat([_flatten(self.embed(self.cls_convs(f)), self.embed_dim) for f in levels], 1)
        reg = [self.reg_convs(f) for f in levels]
        A = self.anchor_generator.num_anchors_per_location()[0]
        per_level = [f.shape[-2] * f.shape[-1] * A for f in levels]     # anchors per level
        return anchors, emb, reg, per_level

    def export_parts(self) -> dict[str, nn.Module]:
        """torchvision detector keys: the C3-C5 FPN under the detector's own ``backbone.fpn.*``
        (the canonical ``fpn.*`` is a C2-C5 FPN, whose levels the one-stage detectors shift by
        one) and the two towers; the output convs (``cls_logits``, ``bbox_reg``, FCOS
        ``bbox_ctrness``) are dropped."""
        return {"backbone.fpn": self.fpn, "head.classification_head.conv": self.cls_convs,
                "head.regression_head.conv": self.reg_convs}


def random_sample(pos: torch.Tensor, neg: torch.Tensor, num: int,
                  pos_fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet's ``RandomSampler`` (mmdet/core/bbox/samplers/random_sampler.py, neg_pos_ub=-1)
    over index sets: at most int(num * pos_fraction) of the positives ``pos``, drawn at random
    when there are more, then negatives drawn at random to fill ``num`` in all. The draws are
    torch's (the pool's seed, ``AlignDet.forward``)."""
    k = int(num * pos_fraction)
    if len(pos) > k:
        pos = pos[torch.randperm(len(pos), device=pos.device)[:k]]
    k = num - len(pos)
    if len(neg) > k:
        neg = neg[torch.randperm(len(neg), device=neg.device)[:k]]
    return pos, neg


class RetinaHeads(DenseHeads):
    """RetinaNet: anchors with IoU >= 0.5 to a pseudo box are its samples, < 0.4 background,
    between ignored (official MaxIoUAssigner(0.5, 0.4, min_pos_iou=0)); per image at most
    ``retina_samples`` of them enter the losses, positives first (``retina_pos_fraction``),
    background filling the rest (official RandomSampler(num=2048, pos_fraction=1.0): mmdet's
    AnchorHead samples when the loss is not a focal loss); L1 on the encoded deltas of the
    sampled positives, averaged over them (official ``loss_single_bbox``)."""

    embed_kernel = 1

    def __init__(self, detector: nn.Module, cfg: AlignDet.Config):
        super().__init__(detector, cfg)
        from torchvision.models.detection._utils import Matcher
        self.matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.samples, self.pos_fraction = cfg.retina_samples, cfg.retina_pos_fraction

    def forward(self, images: ImageList, feats: dict, boxes: list, ids: list):
        anchors, emb, reg, _ = self.dense(images, feats)
        deltas = torch.cat([_flatten(self.bbox_reg(f), 4) for f in reg], 1)
        z, y, pos_deltas, pos_targets = [], [], [], []
        for i, (a, gt, gid) in enumerate(zip(anchors, boxes, ids)):
            if len(gt):
                m = self.matcher(box_iou(gt, a))
            else:
                m = torch.full((len(a),), self.matcher.BELOW_LOW_THRESHOLD, dtype=torch.long, device=a.device)
            pos = torch.nonzero(m >= 0).squeeze(1)
            neg = torch.nonzero(m == self.matcher.BELOW_LOW_THRESHOLD).squeeze(1)
            if self.samples:
                pos, neg = random_sample(pos, neg, self.samples, self.pos_fraction)
            lab = torch.full((len(a),), BACKGROUND, dtype=torch.long, device=a.device)
            lab[pos] = gid[m[pos]]
            keep = torch.cat([pos, neg]).sort().values          # the image's samples, in anchor order
            z.append(emb[i, keep])
            y.append(lab[keep])
            if len(pos):
                pos_deltas.append(deltas[i, pos])
                pos_targets.append(self.box_coder.encode_single(gt[m[pos]], a[pos]))
        d = torch.cat(pos_deltas) if pos_deltas else deltas.new_zeros(0, 4)
        t = torch.cat(pos_targets) if pos_targets else deltas.new_zeros(0, 4)
        l1 = (d - t).abs().sum() / max(1, len(t)) + deltas.sum() * 0.0
        return torch.cat(z), torch.cat(y), {"loss_box_l1": l1}


class FCOSHeads(DenseHeads):
    """FCOS: the fine-tuning detector's point assignment (a point is a sample of the
    smallest pseudo box that contains it within ``center_sampling_radius`` strides of its
    centre and whose size range fits the point's level); ``fcos_points`` points enter the
    losses, positives first, background filling the rest, over the pool's images
    (``fcos_points_per: pool``; official ``SelfSupFCOSHead.loss`` samples sampler.num = 2048
    points of the flattened per-GPU batch, per view) or per image; IoU loss (-log IoU,
    weighted by the centerness target) and centerness BCE on the sampled positives."""

    embed_kernel = 3

    def __init__(self, detector: nn.Module, cfg: AlignDet.Config):
        super().__init__(detector, cfg)
        self.bbox_ctrness = detector.head.regression_head.bbox_ctrness
        self.radius = float(getattr(detector, "center_sampling_radius", 1.5))
        self.max_points = cfg.fcos_points
        self.per_pool = cfg.fcos_points_per == "pool"

    def assign(self, points: torch.Tensor, gt: torch.Tensor, per_level: list[int]) -> torch.Tensor:
        """Index of each point's pseudo box, -1 for background. ``points``: the (R, 4) one-per-
        location anchors of torchvision's FCOS (size 8 x 2^level, centre = the point)."""
        if len(gt) == 0:
            return torch.full((len(points),), -1, dtype=torch.long, device=points.device)
        centre = (points[:, :2] + points[:, 2:]) / 2
        size = points[:, 2] - points[:, 0]
        gt_centre = (gt[:, :2] + gt[:, 2:]) / 2
        near = (centre[:, None] - gt_centre[None]).abs().amax(2) < self.radius * size[:, None]
        x, y = centre[:, 0:1], centre[:, 1:2]
        ltrb = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], 2)   # (R, M, 4)
        inside = ltrb.amin(2) > 0
        lo, hi = size * 4, size * 8               # FCOS's size ranges, (0, 64], (64, 128], ...
        lo[:per_level[0]] = 0
        hi[-per_level[-1]:] = float("inf")
        reach = ltrb.amax(2)
        fits = (reach > lo[:, None]) & (reach < hi[:, None])
        area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        score = (near & inside & fits).float() * (1e8 - area[None])     # smallest box wins
        best, idx = score.max(1)
        idx[best < 1e-5] = -1
        return idx

    def forward(self, images: ImageList, feats: dict, boxes: list, ids: list):
        anchors, emb, reg, per_level = self.dense(images, feats)
        deltas = torch.cat([_flatten(F.relu(self.bbox_reg(f)), 4) for f in reg], 1)
        ctr = torch.cat([_flatten(self.bbox_ctrness(f), 1) for f in reg], 1)[..., 0]
        N, R = emb.shape[:2]
        # per point of the pool (image-major): its label (instance id or background) and box
        lab = torch.full((N, R), BACKGROUND, dtype=torch.long, device=emb.device)
        box = emb.new_zeros(N, R, 4)
        for i, (a, gt, gid) in enumerate(zip(anchors, boxes, ids)):
            m = self.assign(a, gt, per_level)
            lab[i, m >= 0] = gid[m[m >= 0]]
            box[i, m >= 0] = gt[m[m >= 0]]
        lab, box, points = lab.view(-1), box.view(-1, 4), torch.cat(anchors)
        keep, pos = [], []
        for a, b in ([(0, N)] if self.per_pool else [(i, i + 1) for i in range(N)]):
            fg = lab[a * R:b * R] >= 0
            p, n = random_sample(torch.nonzero(fg).squeeze(1) + a * R, torch.nonzero(~fg).squeeze(1) + a * R,
                                 self.max_points)
            keep.append(torch.cat([p, n]))
            pos.append(p)
        keep, pos = torch.cat(keep), torch.cat(pos)
        pred = self.box_coder.decode(deltas.reshape(-1, 4)[pos], points[pos])   # BoxLinearCoder (l, t, r, b)
        centre = (points[pos, :2] + points[pos, 2:]) / 2
        losses = fcos_box_losses(pred, box[pos], centre, ctr.reshape(-1)[pos])
        zero = deltas.sum() * 0.0 + ctr.sum() * 0.0    # every output in the graph (DDP)
        return emb.reshape(N * R, -1)[keep], lab[keep], {k: v + zero for k, v in losses.items()}


def fcos_box_losses(pred: torch.Tensor, target: torch.Tensor, centre: torch.Tensor,
                    ctr_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """FCOS's losses on positive points (Tian et al. 2019, Eq. 2 and 3; mmdet ``FCOSHead``):
    IoU loss -log IoU(pred, target) weighted by the centerness target and normalised by its
    sum, and BCE of the centerness logit against sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))
    of the point ``centre`` in its box, averaged over points. Zero without positives."""
    if len(target) == 0:
        return {"loss_box_iou": pred.sum() * 0.0, "loss_centerness": ctr_logit.sum() * 0.0}
    x, y = centre[:, 0], centre[:, 1]
    l, t, r, b = x - target[:, 0], y - target[:, 1], target[:, 2] - x, target[:, 3] - y
    ctr = torch.sqrt((torch.minimum(l, r) / torch.maximum(l, r)) * (torch.minimum(t, b) / torch.maximum(t, b)))
    inter = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    union = (pred[:, 2:] - pred[:, :2]).prod(1) + (target[:, 2:] - target[:, :2]).prod(1) - inter
    iou = inter / union.clamp(min=1e-6)
    iou_loss = (-torch.log(iou.clamp(min=1e-6)) * ctr).sum() / ctr.sum().clamp(min=1e-6)
    return {"loss_box_iou": iou_loss,
            "loss_centerness": F.binary_cross_entropy_with_logits(ctr_logit, ctr, reduction="mean")}


def _cxcywh(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, gt_classes: torch.Tensor, gt_boxes: torch.Tensor,
                    cost: tuple[float, float, float] = (1.0, 5.0, 2.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """DETR's bipartite matching (Carion et al. 2020, Eq. 1): (query index, box index) pairs
    minimising  w_cls * -p(class) + w_L1 * |b - b_gt|_1 + w_GIoU * -GIoU(b, b_gt)  over
    ``logits`` (Q, K+1), normalised cxcywh ``boxes`` (Q, 4) and the image's boxes (M, 4)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou
    if len(gt_boxes) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    c = (-cost[0] * logits.softmax(-1)[:, gt_classes] + cost[1] * torch.cdist(boxes, gt_boxes, p=1)
         - cost[2] * generalized_box_iou(_xyxy(boxes), _xyxy(gt_boxes)))
    q, g = linear_sum_assignment(c.float().cpu().numpy())
    return torch.as_tensor(q, device=boxes.device), torch.as_tensor(g, device=boxes.device)


def detr_set_loss(logits: torch.Tensor, boxes: torch.Tensor, q: torch.Tensor, classes: torch.Tensor,
                  gt_boxes: torch.Tensor, num_boxes: float, no_object_weight: float = 0.1,
                  weights: tuple[float, float, float] = (1.0, 5.0, 2.0)) -> dict[str, torch.Tensor]:
    """DETR's losses of one decoder layer over a batch (Carion et al. 2020, Sec. 3.1):
    ``logits`` (N*Q, K+1), ``boxes`` (N*Q, 4) normalised cxcywh; ``q`` the matched rows,
    ``classes``/``gt_boxes`` their targets. Cross-entropy with the no-object class weighted
    ``no_object_weight`` (weighted mean), L1 and 1 - GIoU summed over matches / ``num_boxes``."""
    from torchvision.ops import generalized_box_iou
    K = logits.shape[1] - 1
    target = torch.full((len(logits),), K, dtype=torch.long, device=logits.device)
    target[q] = classes
    w = torch.ones(K + 1, device=logits.device)
    w[K] = no_object_weight
    ce = F.cross_entropy(logits, target, weight=w)
    b = boxes[q]
    l1 = (b - gt_boxes).abs().sum() / num_boxes
    giou = (1 - torch.diag(generalized_box_iou(_xyxy(b), _xyxy(gt_boxes)))).sum() / num_boxes if len(q) else b.sum() * 0
    return {"cls": weights[0] * ce, "l1": weights[1] * l1, "giou": weights[2] * giou}


class DETRHeads(_Heads):
    """transformers' DETR: input projection + encoder + decoder + object queries; the class
    head predicts the 256 k-means pseudo-classes (+ no object), the box MLP regresses the
    proposals; Hungarian matching and the set losses on every decoder layer; the contrastive
    loss on a Linear-ReLU-Linear(256) projection of the last decoder layer's queries, each
    matched query carrying its box's id, the unmatched ones background (official
    ``SelfSupDETRHead``; it projects every layer but contrasts one)."""

    copied = ("query_position_embeddings.",)      # official: query embeddings copied, not averaged
    key_prefix = ""                                # of the export: "detr." for the registry's wrapper

    def __init__(self, detr: nn.Module, cfg: AlignDet.Config):
        super().__init__()
        m = detr.model
        detr.config.auxiliary_loss = True        # the decoder then returns every layer's output
        self.input_projection = m.input_projection
        self.position_embedding = m.position_embedding
        self.query_position_embeddings = m.query_position_embeddings
        self.encoder, self.decoder = m.encoder, m.decoder
        d = detr.config.d_model
        self.class_head = nn.Linear(d, cfg.detr_classes + 1)
        self.bbox_predictor = detr.bbox_predictor
        self.projector = MLPHead(d, d, cfg.embed_dim)
        self.cost, self.weights = tuple(cfg.detr_cost), tuple(cfg.detr_loss)
        self.no_object_weight = cfg.detr_no_object_weight

    @classmethod
    def from_detector(cls, detector: nn.Module, cfg) -> tuple[nn.Module, nn.Module]:
        """``detector``: transformers' ``DetrForObjectDetection``, or the registry's DETR that
        wraps it as ``.detr`` (the export then carries that ``detr.`` prefix)."""
        inner = getattr(detector, "detr", detector)
        model = getattr(inner, "model", None)
        if not all(hasattr(model, a) for a in ("backbone", "input_projection", "query_position_embeddings",
                                               "encoder", "decoder")) or not hasattr(inner, "bbox_predictor"):
            raise TypeError(f"aligndet: detector {cfg.detector!r}: expected transformers' DetrForObjectDetection "
                            f"(or a module holding it as .detr)")
        heads = cls(inner, cfg)
        heads.key_prefix = "detr." if inner is not detector else ""
        return model.backbone, heads

    @staticmethod
    def backbone_features(backbone: nn.Module, images: ImageList):
        mask = images.tensors.new_zeros(images.tensors.shape[0], *images.tensors.shape[-2:], dtype=torch.long)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = 1                    # DETR's pixel mask: 1 = real pixel, 0 = padding
        return backbone(images.tensors, mask)[-1]

    def decode(self, feats) -> torch.Tensor:
        """(L, N, Q, d): every decoder layer's output (DetrModel.forward, without the backbone)."""
        fmap, mask = feats
        x = self.input_projection(fmap).flatten(2).transpose(1, 2)
        pos = self.position_embedding(shape=fmap.shape, device=fmap.device, dtype=fmap.dtype,
                                      mask=mask).flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = self.encoder(inputs_embeds=x, attention_mask=mask, spatial_position_embeddings=pos).last_hidden_state
        qpos = self.query_position_embeddings.weight[None].repeat(len(fmap), 1, 1)
        out = self.decoder(inputs_embeds=torch.zeros_like(qpos), spatial_position_embeddings=pos,
                           object_queries_position_embeddings=qpos, encoder_hidden_states=memory,
                           encoder_attention_mask=mask)
        return out.intermediate_hidden_states

    def forward(self, images: ImageList, feats, boxes: list, ids: list, classes: list):
        hs = self.decode(feats)
        L, N, Q, _ = hs.shape
        logits, pred = self.class_head(hs), self.bbox_predictor(hs).sigmoid()
        gts = [_cxcywh(b) / b.new_tensor([w, h, w, h]) for b, (h, w) in zip(boxes, images.image_sizes)]
        num_boxes = max(1.0, float(sum(len(b) for b in boxes)))
        losses = {"loss_detr_cls": 0.0, "loss_detr_l1": 0.0, "loss_detr_giou": 0.0}
        for layer in range(L):
            rows, cls_t, box_t, id_t = [], [], [], []
            for i in range(N):
                q, g = hungarian_match(logits[layer, i], pred[layer, i], classes[i], gts[i], self.cost)
                rows.append(q + i * Q)
                cls_t.append(classes[i][g])
                box_t.append(gts[i][g])
                id_t.append(ids[i][g])
            rows = torch.cat(rows)
            part = detr_set_loss(logits[layer].flatten(0, 1), pred[layer].flatten(0, 1), rows, torch.cat(cls_t),
                                 torch.cat(box_t), num_boxes, self.no_object_weight, self.weights)
            for k, v in part.items():
                losses[f"loss_detr_{k}"] = losses[f"loss_detr_{k}"] + v
        sample_ids = torch.full((N * Q,), BACKGROUND, dtype=torch.long, device=hs.device)
        sample_ids[rows] = torch.cat(id_t)       # the last layer's matching
        return self.projector(hs[-1].flatten(0, 1)), sample_ids, losses

    def export_state(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """DETR keys (transformers' ``DetrForObjectDetection``): the frozen backbone under
        ``model.backbone.*``, the input projection, encoder, decoder and object queries under
        ``model.*``; the class head, box MLP and projector are dropped."""
        parts = {"backbone": backbone, "input_projection": self.input_projection, "encoder": self.encoder,
                 "decoder": self.decoder, "query_position_embeddings": self.query_position_embeddings}
        return {f"{self.key_prefix}model.{p}.{k}": v.detach().cpu().clone() for p, mod in parts.items()
                for k, v in mod.state_dict().items()}


HEADS = {"mask_rcnn": RCNNHeads, "retinanet": RetinaHeads, "fcos": FCOSHeads,
         "detr": DETRHeads}


def _validate(c: AlignDet.Config) -> None:
    if c.detector not in DETECTORS:
        raise ConfigError(f"method.detector: unknown {c.detector!r} ({' | '.join(DETECTORS)})")
    if not c.short_sides or min(c.short_sides) < 32:
        raise ConfigError(f"method.short_sides: expected sizes >= 32 px, got {list(c.short_sides)}")
    if c.max_size < max(c.short_sides):
        raise ConfigError(f"method.max_size: expected >= the largest short side, got {c.max_size}")
    bad = set(c.rand_ops) - set(SOFT_TEACHER_OPS)
    if bad or not c.rand_ops:
        raise ConfigError(f"method.rand_ops: unknown {sorted(bad)} ({' | '.join(SOFT_TEACHER_OPS)})")
    if not 0 < c.momentum <= 1:
        raise ConfigError(f"method.momentum: expected in (0, 1], got {c.momentum}")
    if c.temperature <= 0:
        raise ConfigError(f"method.temperature: expected > 0, got {c.temperature}")
    for k in ("detr_cost", "detr_loss"):
        if len(getattr(c, k)) != 3 or min(getattr(c, k)) < 0:
            raise ConfigError(f"method.{k}: expected 3 weights >= 0 (class, L1, GIoU), got {list(getattr(c, k))}")
    if c.retina_samples < 0:
        raise ConfigError(f"method.retina_samples: expected >= 0 (0: every non-ignored anchor), got {c.retina_samples}")
    if not 0 < c.retina_pos_fraction <= 1:
        raise ConfigError(f"method.retina_pos_fraction: expected in (0, 1], got {c.retina_pos_fraction}")
    if c.fcos_points_per not in ("pool", "image"):
        raise ConfigError(f"method.fcos_points_per: expected 'pool' or 'image', got {c.fcos_points_per!r}")
    for k in ("embed_dim", "rpn_samples", "roi_samples", "fcos_points", "size_divisor", "detr_classes",
              "pool_images"):
        if getattr(c, k) < 1:
            raise ConfigError(f"method.{k}: expected >= 1, got {getattr(c, k)}")
