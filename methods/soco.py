"""SoCo (Wei, Gao, Wu, Zhang, Hu, Lin, Lin; NeurIPS 2021, "Aligning Pretraining for
Detection via Object-Level Contrastive Learning").

Pseudo-code (paper Sec. 3, Eq. 3), recognisable in ``forward``:
    V1 = whole image @224, V2 = random crop (scale [0.5, 1]) @224, V3 = V2 downsampled @112
    b  = K selective-search proposals valid in every view, mapped into each view
    v_i  = q(g(f(V_i), b_i))           online: ResNet+FPN -> RoIAlign (scale-aware level)
                                       -> 4conv1fc R-CNN head -> projector -> predictor q
    v'_i = g'(f'(V_i), b_i)            target: EMA of backbone+FPN+head+projector
    L = sum_box  (2 - 2cos(v_2, v'_1)) + (2 - 2cos(v_3, v'_1))   (+ the symmetric V1 terms)
    f' = m f' + (1 - m) f,  m: 0.99 -> 1 on a cosine schedule

Decisions where paper and official code (hologerry/SoCo) differ or are silent:
- V3: **derived from V2 by downsampling** (same crop and flip, paper Sec. 3.2) by default;
  ``v3_from_v2=False`` draws an independent crop instead, as the official transform
  ``ImageAsymBboxAwareMultiJitter1Cutout`` does (``RandomResizedCropParams(image_size//2)``).
- SoCo* (``soco_star``): V4 at 192 is V2 resized (official ``transforms.Resize(image4_size)``)
  and is paired with V1 exactly like V3 (official ``SoCo_FPN_Star.py`` loss_14).
- A proposal must be (>= half) visible in every view of its set; candidates failing that are
  dropped *before* the K are sampled; fewer than K are padded by repetition (marked invalid;
  ``mask_padding=True`` drops them from the loss, the official code keeps them).
- Box jitter (p 0.5, r in [-0.1, 0.1], Sec. 3.3) moves the box of the crop views V2/V3/V4
  (one jitter per proposal, shared by those views); V1 keeps the proposal itself.
- Cutout (official tools/SoCo_FPN_100ep.sh, p 0.5, area 0.1-0.3; not in the paper) is applied
  to the 224-px views V1 and V2 (the official ``RandomCutoutInBbox(image_size)``) by default.
- Scale-aware assignment (Table 4 step 5): each box in each view goes to the level its own
  size there picks (official ``assign_bboxs_to_feature_map``): sqrt(wh) <= 48 -> P2, <= 96 ->
  P3, <= 192 -> P4, else P5, thresholds scaled by view_size/224. With it off (Table 4 steps
  3-4) every box is pooled on all of P2..P5 and each level is compared with the same level
  of the other view (our choice; the paper does not detail it).
- FPN and box head have BatchNorm (official ``SoCo_FPN.py``: FPN ``norm_cfg=BN``, BN in the
  4conv1fc head; detectron2 fine-tuning config ``R_50_FPN_1x.yaml``: FPN/ROI_BOX_HEAD NORM
  SyncBN). The detector must be built with ``head_norm: bn`` for the keys to transfer;
  ``head_norm="none"`` matches the plain torchvision builder instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from methods.augment import BYOL_AUG_1, BYOL_AUG_2, as_image, cutout, decode_for, render_view
from methods.base import ConfigError, MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import cosine_schedule, momentum_copy, update_momentum
from methods.geometry import ViewGeometry, jitter_boxes, random_view, whole_view
from methods.heads import byol_predictor, byol_projector
from methods.losses import byol_regression
from methods.proposals import random_proposals, sample_proposals
from methods.registry import register_method
from methods.roi import ResNetFPN, assign_levels, box_head, export_parts, multilevel_roi_align

PROPOSAL_SOURCES = ("selective_search", "random", "whole_image")


def soco_loss(online: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SoCo's Eq. 3 in BYOL's normalised form, symmetric: for each other view V in
    (V2, V3, V4), (2 - 2cos(q(V), z'(V1))) + (2 - 2cos(q(V1), z'(V))), mean over boxes and
    summed over pairs. ``online``/``target``: view name -> (N, K, L, D) (L: pooled levels,
    compared level by level); ``mask``: (N, K) bool of the boxes that count."""
    ref = online["v1"]
    keep = None
    if mask is not None:
        keep = mask.to(torch.bool)[..., None].expand(ref.shape[:-1])
    def reg(p, z):
        if keep is None:
            return byol_regression(p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1]))
        if not keep.any():
            return p.sum() * 0.0
        return byol_regression(p[keep], z[keep])
    logs, total = {}, ref.new_zeros(())
    for v in online:
        if v == "v1":
            continue
        pair = reg(online[v], target["v1"]) + reg(ref, target[v])
        logs[f"loss_1{v[1:]}"] = pair.detach()
        total = total + pair
    return total, logs


class SoCoEncoder(ResNetFPN):
    """Backbone + FPN (P2-P5) + RoIAlign + 4conv1fc R-CNN head + projector: the part that has
    an EMA twin. ``forward(images, boxes)`` -> (N, K, L, D)."""

    def __init__(self, cfg: "SoCo.Config"):
        super().__init__(cfg.backbone, cfg.fpn_channels if cfg.fpn else 0, cfg.head_norm)
        self.cfg = cfg
        self.box_head = (box_head(self.out_channels, cfg.roi_size, cfg.head_conv_dim, cfg.head_num_convs,
                                  cfg.head_fc_dim, cfg.head_norm) if cfg.box_head else None)
        self.projector = byol_projector(cfg.head_fc_dim if cfg.box_head else self.out_channels,
                                        cfg.proj_hidden_dim, cfg.proj_dim)

    def levels(self, boxes: torch.Tensor, view_size: int) -> torch.Tensor:
        """(N, K, L) level index per box (L = 1 with scale-aware assignment or without FPN,
        else 4: every box on every level)."""
        N, K = boxes.shape[:2]
        if self.fpn is None:
            return torch.zeros(N, K, 1, dtype=torch.long, device=boxes.device)
        if self.cfg.scale_aware:
            scale = view_size / self.cfg.level_reference
            return assign_levels(boxes, self.cfg.level_thresholds, scale)[..., None]
        return torch.arange(4, device=boxes.device).expand(N, K, 4)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        N, K = boxes.shape[:2]
        levels = self.levels(boxes, x.shape[-1])
        roi = multilevel_roi_align(self.feature_maps(x), self.strides, boxes, levels, self.cfg.roi_size)
        v = self.box_head(roi) if self.box_head is not None else roi.mean((2, 3))
        return self.projector(v).reshape(N, K, levels.shape[2], -1)


@register_method("soco")
class SoCo(PretrainMethod):
    # SoCo Sec. 4.1 / tools/SoCo_FPN_100ep.sh: LARS, base lr 1.0 (x batch/256), wd 1e-5,
    # batch 2048 (Table 5b), cosine decay, 10 warm-up epochs, 100 epochs (Tables 4-5).
    recipe = PretrainRecipe(optimizer="lars", base_lr=1.0, lr_batch=256, batch_size=2048,
                            weight_decay=1e-5, momentum=0.9, schedule="cosine", warmup_epochs=10, epochs=100)
    # Fine-tuning: detectron2_configs/SoCo_FPN_100ep.yaml, SOLVER.WEIGHT_DECAY 0.000025
    finetune_overrides = {"weight_decay": 2.5e-5}
    # tiny: 128-px synthetic images on 2 CPU cores; views 64/64/32 (V4 56) keep the paper's
    # V1:V3 ratio of 2. FPN 64 / box head conv 64, fc 256 equal the tiny detector's so every
    # key transfers.
    scales = {"tiny": {"method": {"backbone": "resnet18", "fpn_channels": 64, "head_conv_dim": 64,
                                  "head_fc_dim": 256, "proj_hidden_dim": 512, "proj_dim": 128,
                                  "pred_hidden_dim": 512, "view_size": 64, "v3_size": 32,
                                  "v4_size": 56},
                       "recipe": {"batch_size": 16}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        # -- Table 4 components (step: setting) --------------------------------------------
        proposal_source: str = "selective_search"  # step 1 "whole_image"; Table 5c "random"
        fpn: bool = True                 # step 3; off: C5 + RoIAlign
        box_head: bool = True            # step 4 (4conv1fc R-CNN head); off: pooled RoI -> projector
        scale_aware: bool = True         # step 5
        box_jitter: bool = True          # step 6
        multi_view: bool = True          # step 7 (V3)
        # -- Table 5 ------------------------------------------------------------------------
        v3_size: int = 112               # 5a
        v3_scale: float = 0.0            # 5a at any scale: V3 = round(v3_scale * view_size); 0 = v3_size
        num_proposals: int = 4           # 5c, K per image per step
        momentum: float = 0.99           # 5d, start of the cosine EMA schedule (to 1)
        # -- views --------------------------------------------------------------------------
        view_size: int = 224             # V1, V2
        crop_scale: tuple[float, ...] = (0.5, 1.0)   # V2 (tools/*.sh --crop 0.5)
        v3_from_v2: bool = True          # paper: V3 = V2 downsampled; False: independent crop (official)
        soco_star: bool = False          # SoCo*: extra view V4
        v4_size: int = 192
        cutout: bool = True              # official script only, p 0.5, area 0.1-0.3
        cutout_prob: float = 0.5
        cutout_area: tuple[float, ...] = (0.1, 0.3)
        cutout_views: tuple[str, ...] = ("v1", "v2")
        jitter_prob: float = 0.5         # Sec. 3.3
        jitter_ratio: float = 0.1
        min_visible: float = 0.5         # a proposal's visible fraction needed in every view
        mask_padding: bool = False       # official keeps padded (repeated) boxes in the loss
        random_candidates: int = 32      # "random" source: boxes drawn per image (official max_props)
        ss_mode: str = "fast"            # selective search mode (SoCo: fast)
        ss_max_side: int = 0             # 0: the harness default, benchmark.proposals.DEFAULT_MAX_SIDE (500 px)
        # -- model --------------------------------------------------------------------------
        fpn_channels: int = 256
        head_norm: str = "bn"            # "bn" (official) | "none"
        head_num_convs: int = 4
        head_conv_dim: int = 256
        head_fc_dim: int = 1024
        roi_size: int = 7
        level_thresholds: tuple[float, ...] = (48.0, 96.0, 192.0)   # sqrt(wh) in a 224 view
        level_reference: float = 224.0
        proj_hidden_dim: int = 4096      # BYOL projector/predictor (SoCo Sec. 4.1)
        proj_dim: int = 256
        pred_hidden_dim: int = 4096

    def __init__(self, cfg: Config):
        _validate(cfg)
        super().__init__(cfg)
        self.online = SoCoEncoder(cfg)
        self.predictor = byol_predictor(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target = momentum_copy(self.online)
        self.current_momentum = cfg.momentum

    @property
    def view_names(self) -> list[str]:
        v = ["v1", "v2"]
        if self.cfg.multi_view:
            v.append("v3")
        if self.cfg.soco_star:
            v.append("v4")
        return v

    # -- proposals (computed once per dataset by the harness, cached) -----------------------
    def proposal_params(self) -> dict | None:
        if self.cfg.proposal_source != "selective_search":
            return None
        return {"mode": self.cfg.ss_mode, "max_side": self.cfg.ss_max_side or None}

    # -- views (DataLoader worker) --------------------------------------------------------
    def view_geometries(self, width: int, height: int, rng: np.random.Generator) -> dict[str, ViewGeometry]:
        c = self.cfg
        g = {"v1": whole_view(width, height, c.view_size, flip=bool(rng.random() < 0.5)),
             "v2": random_view(width, height, c.view_size, rng, scale=tuple(c.crop_scale))}
        if c.multi_view:
            v3 = round(c.v3_scale * c.view_size) if c.v3_scale else c.v3_size
            g["v3"] = (g["v2"].resized((v3, v3)) if c.v3_from_v2
                       else random_view(width, height, v3, rng, scale=tuple(c.crop_scale)))
        if c.soco_star:
            g["v4"] = g["v2"].resized((c.v4_size, c.v4_size))
        return g

    def _candidates(self, record: dict, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
        src = self.cfg.proposal_source
        if src == "whole_image":
            return np.array([[0, 0, width, height]], dtype=np.float64)
        if src == "random":
            return random_proposals(width, height, self.cfg.random_candidates, rng).astype(np.float64)
        if record.get("proposals") is None:
            raise ValueError(f"soco: record {record.get('index', '?')} has no 'proposals' "
                             f"(method.proposal_source=selective_search reads the proposal cache)")
        return np.asarray(record["proposals"], dtype=np.float64).reshape(-1, 4)

    def sample_boxes(self, record: dict, geoms: dict[str, ViewGeometry], width: int, height: int,
                     rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """K proposals valid in every view, as (view -> (K', 4) float32 view boxes, valid (K',))."""
        c = self.cfg
        cand = self._candidates(record, width, height, rng)
        whole = c.proposal_source == "whole_image"
        if not whole and len(cand):
            keep = np.ones(len(cand), bool)
            for g in geoms.values():
                keep &= g.boxes_in_view(cand, min_visible=c.min_visible)[1]
            cand = cand[keep]
        k = 1 if whole else c.num_proposals
        boxes, valid = sample_proposals(cand, k, rng, image_size=(width, height))
        boxes = boxes.astype(np.float64)
        jittered = boxes
        if c.box_jitter and not whole:
            jittered = jitter_boxes(boxes, rng, ratio=c.jitter_ratio, prob=c.jitter_prob)
        out = {}
        for name, g in geoms.items():
            src_boxes = boxes if name == "v1" else jittered
            m = _clip(g.map_boxes(src_boxes), g.out_size)
            bad = ((m[:, 2] - m[:, 0]) < 1) | ((m[:, 3] - m[:, 1]) < 1)
            if bad.any():  # a jittered box left the view: fall back to the proposal itself
                m[bad] = _clip(g.map_boxes(boxes[bad]), g.out_size)
            out[name] = m.astype(np.float32)
        return out, valid

    loaders = ("cpu", "cpu_draft", "device")   # recipe.loader values its views support

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        c = self.cfg
        img = as_image(record["image"])
        W, H = img.size
        geoms = self.view_geometries(W, H, rng)
        boxes, valid = self.sample_boxes(record, geoms, W, H, rng)
        decode_for(img, geoms.values())
        out = {}
        for name, g in geoms.items():
            aug = BYOL_AUG_1 if name == "v1" else BYOL_AUG_2   # BYOL's asymmetric pair, per view
            t = render_view(img, g, aug, rng)
            if c.cutout and name in c.cutout_views:
                t = cutout(t, rng, p=c.cutout_prob, area=tuple(c.cutout_area))
            out[name] = t
            out[f"boxes_{name}"] = torch.from_numpy(boxes[name])
        out["valid"] = torch.from_numpy(np.asarray(valid, dtype=bool))
        return out

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.online.parameters()) + list(self.predictor.parameters())}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """tau = 1 - (1 - tau_0)(cos(pi progress) + 1)/2 (BYOL Sec. 3.2; official SoCo)."""
        self.current_momentum = cosine_schedule(progress, self.cfg.momentum)
        update_momentum(self.online, self.target, self.current_momentum)

    def forward(self, batch: dict) -> dict:
        names = self.view_names
        online, target = {}, {}
        for v in names:
            z = self.online(batch[v], batch[f"boxes_{v}"])
            online[v] = self.predictor(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)
        with torch.no_grad():
            for v in names:
                target[v] = self.target(batch[v], batch[f"boxes_{v}"])
        mask = batch["valid"] if self.cfg.mask_padding else None
        loss, logs = soco_loss(online, target, mask)
        logs["valid_frac"] = batch["valid"].float().mean().detach()
        return {"loss": loss, **logs}

    def export(self) -> dict[str, torch.Tensor]:
        """Online backbone (bare torchvision names), ``fpn.*`` and ``box_head.*``."""
        return export_parts(self.online.backbone, fpn=self.online.fpn, box_head=self.online.box_head)


def _clip(b: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    b = b.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, size[0])
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, size[1])
    return b


def _validate(c: "SoCo.Config") -> None:
    if c.proposal_source not in PROPOSAL_SOURCES:
        raise ConfigError(f"method.proposal_source: unknown {c.proposal_source!r} ({' | '.join(PROPOSAL_SOURCES)})")
    if c.head_norm not in ("bn", "none"):
        raise ConfigError(f"method.head_norm: unknown {c.head_norm!r} (bn | none)")
    if c.num_proposals < 1:
        raise ConfigError(f"method.num_proposals: expected >= 1, got {c.num_proposals}")
    if len(c.level_thresholds) != 3:
        raise ConfigError(f"method.level_thresholds: expected 3 bounds (P2|P3|P4|P5), got {list(c.level_thresholds)}")
    if not (0 < c.momentum <= 1):
        raise ConfigError(f"method.momentum: expected in (0, 1], got {c.momentum}")
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise ConfigError(f"method.crop_scale: expected [lo, hi] in (0, 1], got {list(c.crop_scale)}")
    bad = set(c.cutout_views) - {"v1", "v2", "v3", "v4"}
    if bad:
        raise ConfigError(f"method.cutout_views: unknown views {sorted(bad)} (v1 | v2 | v3 | v4)")
    for k in ("view_size", "v3_size", "v4_size"):
        if getattr(c, k) < 32:
            raise ConfigError(f"method.{k}: expected >= 32 px (P5 has stride 32), got {getattr(c, k)}")
