"""SoCo (Wei, Gao, Wu, Hu, Lin; NeurIPS 2021, "Aligning Pretraining for Detection via
Object-Level Contrastive Learning", arXiv:2106.02637; official code hologerry/SoCo).

Pseudo-code (paper Sec. 3, Eq. 3), recognisable in ``forward``:
    V1 = whole image @224, V2 = random crop (scale [0.5, 1]) @224, V3 = V2 downsampled @112
        (paper; the official code, our default: V3 an independent random crop @112)
    for each pair (V1, V) with V in (V2, V3): K selective-search proposals b visible in both
    v_i  = q(g(f(V_i), b_i))           online: ResNet+FPN -> RoIAlign (scale-aware level)
                                       -> 4conv1fc R-CNN head -> projector -> predictor q
    v'_i = g'(f'(V_i), b_i)            target: EMA of backbone+FPN+head+projector
    L = sum_pairs sum_box (2 - 2cos(v_V, v'_1)) + (2 - 2cos(v_1, v'_V))
    f' = m f' + (1 - m) f,  m: 0.99 -> 1 on a cosine schedule

Choices and official-vs-paper decisions: docs/methods/soco.md
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from methods.augment import (BYOL_AUG_1, BYOL_AUG_2, CUTOUT_CLIPS, as_image, cutout_in_boxes, decode_for,
                             render_view)
from methods.config import ConfigError
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import cosine_schedule, momentum_copy, update_momentum
from methods.geometry import ViewGeometry, jitter_boxes, random_view, whole_view
from methods.heads import byol_predictor, byol_projector
from methods.losses import byol_regression, masked_cosine_regression
from methods.proposals import random_proposals, sample_proposals
from methods.registry import register_method
from methods.roi import ResNetFPN, assign_levels, box_head, export_parts, multilevel_roi_align

PROPOSAL_SOURCES = ("selective_search", "random", "whole_image")
JITTER_ON = ("v1", "crop")


def soco_loss(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
              masks: dict[str, torch.Tensor] | None = None,
              ids: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SoCo's Eq. 3 in BYOL's normalised form, symmetric, summed over view pairs:
    for each pair (V1, V), (2 - 2cos(q(V), z'(V1))) + (2 - 2cos(q(V1), z'(V))). ``pairs``:
    other-view name -> (q_1, z_1, q_V, z_V), V1's online prediction and target projection of
    the pair's V1 boxes and the same of V, each (N, K, L, D) (L: pooled levels, compared
    level by level).

    - ``ids``: name -> (ids_1, ids_V), (N, K) which proposal each row is: every V1 row is
      compared with every V row of the same id (padding repeats ids, independently per side),
      each term a mean over those matches per image, then over the images (official
      ``SoCo_FPN.regression_loss_bboxs_aware`` with its id correspondence matrix, which is
      -2 cos: the same loss less a constant 2 per term).
    - else rows are paired (row i of V1 with row i of V), each term a mean over boxes;
      ``masks``: name -> (N, K) bool of the rows that count."""
    logs, total = {}, None
    for v, (q1, z1, qv, zv) in pairs.items():
        keep = None
        if masks is not None:
            keep = masks[v].to(torch.bool)[..., None].expand(q1.shape[:-1])

        def reg(p, z):
            return byol_regression(p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1]),
                                   None if keep is None else keep.reshape(-1))
        if ids is not None:
            id1, idv = ids[v]
            pair = _id_matched(qv, z1, idv, id1) + _id_matched(q1, zv, id1, idv)
        else:
            pair = reg(qv, z1) + reg(q1, zv)
        logs[f"loss_1{v[1:]}"] = pair.detach()
        total = pair if total is None else total + pair
    return total, logs


def _id_matched(p: torch.Tensor, z: torch.Tensor, ids_p: torch.Tensor, ids_z: torch.Tensor) -> torch.Tensor:
    """2 - 2cos(p_i, z_j) over every row pair (i, j) with ids_p[i] == ids_z[j], level by
    level; mean over the pairs of each image, then over the images. ``p``, ``z``: (N, K, L, D)."""
    N, K, L, D = p.shape
    same_id = ids_p[:, :, None] == ids_z[:, None, :]                      # (N, K, K)
    same_level = torch.eye(L, dtype=torch.bool, device=p.device)
    match = (same_id[:, :, None, :, None] & same_level[None, None, :, None, :]).reshape(N, K * L, K * L)
    flat = lambda t: t.reshape(N, K * L, D).transpose(1, 2)               # (N, D, K L)
    return 2 + 2 * masked_cosine_regression(flat(p), flat(z), match)


class SoCoEncoder(ResNetFPN):
    """Backbone + FPN (P2-P5) + RoIAlign + 4conv1fc R-CNN head + projector: the part that has
    an EMA twin. ``forward(images, boxes)`` -> (N, K, L, D)."""

    def __init__(self, cfg: "SoCo.Config"):
        super().__init__(cfg.backbone, cfg.fpn_channels if cfg.fpn else 0, cfg.head_norm,
                         zero_init_residual=cfg.zero_init_residual)
        self.cfg = cfg
        self.box_head = (box_head(self.out_channels, cfg.roi_size, cfg.head_conv_dim, cfg.head_num_convs,
                                  cfg.head_fc_dim, cfg.head_norm) if cfg.box_head else None)
        self.projector = byol_projector(cfg.head_fc_dim if cfg.box_head else self.out_channels,
                                        cfg.proj_hidden_dim, cfg.proj_dim)

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, K, L) level index per box (L = 1 with scale-aware assignment or without FPN,
        else 4: every box on every level). ``boxes`` are in the pixels of their own view."""
        N, K = boxes.shape[:2]
        if self.fpn is None:
            return torch.zeros(N, K, 1, dtype=torch.long, device=boxes.device)
        if self.cfg.scale_aware:
            return assign_levels(boxes, self.cfg.level_thresholds)[..., None]
        return torch.arange(4, device=boxes.device).expand(N, K, 4)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        N, K = boxes.shape[:2]
        levels = self.levels(boxes)
        roi = multilevel_roi_align(self.feature_maps(x), self.strides, boxes, levels, self.cfg.roi_size,
                                   sampling_ratio=self.cfg.roi_sampling_ratio)
        v = self.box_head(roi) if self.box_head is not None else roi.mean((2, 3))
        return self.projector(v).reshape(N, K, levels.shape[2], -1)


@register_method("soco")
class SoCo(PretrainMethod):
    # SoCo Sec. 4.1 / tools/SoCo_FPN_100ep.sh: LARS, base lr 1.0 (x batch/256), wd 1e-5,
    # batch 2048 (Table 5b), cosine decay, 10 warm-up epochs, 100 epochs (Tables 4-5).
    # contrast/lr_scheduler.py: the warm-up starts at lr / warmup_multiplier (option.py: 100),
    # the cosine ends at eta_min 1e-6; contrast/lars.py: trust ratio eps 1e-8.
    recipe = PretrainRecipe(optimizer="lars", base_lr=1.0, lr_batch=256, batch_size=2048,
                            weight_decay=1e-5, momentum=0.9, schedule="cosine", warmup_epochs=10, epochs=100,
                            warmup_start_factor=0.01, min_lr=1e-6, lars_eps=1e-8)
    # Fine-tuning: detectron2_configs/SoCo_FPN_100ep.yaml, SOLVER.WEIGHT_DECAY 0.000025
    finetune_overrides = {"weight_decay": 2.5e-5}
    # tiny: 128-px synthetic images on 2 CPU cores; views 64/64/32 keep the paper's V1:V3
    # ratio of 2 (SoCo*: V3 55, V4 32 for 192, 112 at 224). The level thresholds 48/96/192
    # of a 224-px V1 are scaled once to the 64-px V1 (x 64/224) and, like the paper's, are
    # applied unchanged in every view's own pixels. FPN 64 / box head conv 64, fc 256 equal
    # the tiny detector's so every key transfers.
    scales = {"tiny": {"method": {"backbone": "resnet18", "fpn_channels": 64, "head_conv_dim": 64,
                                  "head_fc_dim": 256, "proj_hidden_dim": 512, "proj_dim": 128,
                                  "pred_hidden_dim": 512, "view_size": 64, "v3_size": 32,
                                  "star_v3_size": 55, "v4_size": 32,
                                  "level_thresholds": [13.71, 27.43, 54.86]},
                       "recipe": {"batch_size": 16}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        zero_init_residual: bool = True  # official resnet.py: last BN gamma of each block = 0
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
        num_proposals: int = 4           # 5c, K per image per pair per step
        momentum: float = 0.99           # 5d, start of the cosine EMA schedule (to 1)
        # -- views --------------------------------------------------------------------------
        view_size: int = 224             # V1, V2
        crop_scale: tuple[float, ...] = (0.5, 1.0)   # V2, V3 (tools/*.sh --crop 0.5)
        v3_from_v2: bool = False         # official: V3 an independent crop; True: V2 downsampled (paper)
        soco_star: bool = False          # SoCo*: V3 an independent crop at star_v3_size, V4 = V2 resized
        star_v3_size: int = 192          # tools/SoCo_FPN_Star_400ep.sh --image3_size 192
        v4_size: int = 112               # tools/SoCo_FPN_Star_400ep.sh --image4_size 112
        view_tries: int = 5              # official --max_tries: redraws of the views before padding
        cutout: bool = True              # tools/SoCo_FPN_100ep.sh only (400ep, SoCo*: none)
        cutout_prob: float = 0.5         # per box
        cutout_area: tuple[float, ...] = (0.1, 0.3)  # of the box's area
        cutout_views: tuple[str, ...] = ("v2", "v3")
        cutout_clip: str = "image"       # official: the square clipped to the image | "box": to the box
        jitter_prob: float = 0.5         # official --jitter_prob 0.5 --jitter_ratio 0.1
        jitter_ratio: float = 0.1
        jitter_on: str = "v1"            # official: the V1 box of each pair | "crop": the other view's
        min_visible: float = 0.5         # a proposal's visible fraction needed in both views of a pair
        mask_padding: bool = False       # official keeps padded (repeated) boxes in the loss
        random_candidates: int = 32      # "random" source: boxes drawn per image (official max_props)
        ss_mode: str = "soco"            # selective search: one strategy, Felzenszwalb 300/0.9/100
        ss_max_side: int = 0             # 0: the harness default, benchmark.data.proposal_cache.DEFAULT_MAX_SIDE (500 px)
        # -- model --------------------------------------------------------------------------
        fpn_channels: int = 256
        head_norm: str = "bn"            # "bn" (official) | "none"
        head_num_convs: int = 4
        head_conv_dim: int = 256
        head_fc_dim: int = 1024
        roi_size: int = 7
        roi_sampling_ratio: int = -1     # official: torchvision's default, adaptive
        level_thresholds: tuple[float, ...] = (48.0, 96.0, 192.0)   # sqrt(wh) in each view's own px
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

    @property
    def pair_views(self) -> list[str]:
        """Views paired with V1 that select their own proposals (V4 reuses V2's)."""
        return [v for v in self.view_names if v in ("v2", "v3")]

    @staticmethod
    def selection_of(view: str) -> str:
        """The pair whose proposals a view uses (SoCo*: V4 is V2 resized, paired via V1-V2)."""
        return "v2" if view == "v4" else view

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
        if c.soco_star:   # official: V3 an independent crop at 192, V4 = V2 resized to 112
            g["v3"] = random_view(width, height, c.star_v3_size, rng, scale=tuple(c.crop_scale))
            # dataset.py: img4 = Resize(img2) before V2's flip, then flipped on its own draw
            g["v4"] = replace(g["v2"], out_size=(c.v4_size, c.v4_size), flip=bool(rng.random() < 0.5))
        elif c.multi_view:
            v3 = round(c.v3_scale * c.view_size) if c.v3_scale else c.v3_size
            g["v3"] = (g["v2"].resized((v3, v3)) if c.v3_from_v2
                       else random_view(width, height, v3, rng, scale=tuple(c.crop_scale)))
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

    def draw_views(self, cand: np.ndarray, width: int, height: int, rng: np.random.Generator
                   ) -> tuple[dict[str, ViewGeometry], dict[str, np.ndarray]]:
        """View geometries and, per pair (V1, V), the candidates visible in both views. Views
        are drawn again (up to ``view_tries`` times) while a pair has fewer than ``need``
        candidates, ``need`` = K // 2 halved after each try (official ``dataset.py``)."""
        c = self.cfg
        need = max(c.num_proposals // 2, 1)
        for _ in range(max(c.view_tries, 1)):
            geoms = self.view_geometries(width, height, rng)
            if c.proposal_source == "whole_image":
                return geoms, {v: cand for v in self.pair_views}
            in_v1 = geoms["v1"].boxes_in_view(cand, min_visible=c.min_visible)[1]
            picks = {}
            for v in self.pair_views:
                keep = in_v1 & geoms[v].boxes_in_view(cand, min_visible=c.min_visible)[1]
                picks[v] = cand[keep]   # (V4 = V2 resized sees what V2 sees)
            if all(len(p) >= need for p in picks.values()):
                break
            need = max(need // 2, 1)
        return geoms, picks

    def sample_boxes(self, picks: dict[str, np.ndarray], geoms: dict[str, ViewGeometry], width: int,
                     height: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per pair (V1, V): up to K distinct candidates, jittered on one side, then each side
        padded to K rows with its own draw of copies (official ``dataset.py``: ``jitter_props``
        on the selection, then ``pad_bboxs_with_common`` per side), mapped into both views.
        Returns ``boxes_v1_{V}`` and ``boxes_{V}`` ((K, 4) float32 view pixels, also for V4,
        which reuses the V1-V2 draw), ``ids_v1_{V}`` and ``ids_{V}`` ((K,) int64: which distinct
        candidate each row is; the loss matches every V1 row with every V row of its id) and
        ``valid_{V}`` ((K,) bool, False for padding; the first rows of both sides are the
        distinct candidates in the same order)."""
        c = self.cfg
        whole = c.proposal_source == "whole_image"
        k = 1 if whole else c.num_proposals
        out = {}
        for v in self.pair_views:
            n = len(picks[v])
            if n:   # min(n, K) distinct candidates in random order
                boxes = sample_proposals(picks[v], min(n, k), rng)[0].astype(np.float64)
            else:   # none visible: the whole image (clipped to each view), padding only
                boxes = np.array([[0, 0, width, height]], dtype=np.float64)
            m = len(boxes)
            jittered = boxes
            if c.box_jitter and not whole:
                jittered = jitter_boxes(boxes, rng, ratio=c.jitter_ratio, prob=c.jitter_prob)
            rows_1 = np.concatenate([np.arange(m), rng.choice(m, size=k - m)])
            rows_v = np.concatenate([np.arange(m), rng.choice(m, size=k - m)])
            on_v1 = c.jitter_on == "v1"
            b1, bv = (jittered, boxes) if on_v1 else (boxes, jittered)
            out[f"boxes_v1_{v}"] = _view_boxes(geoms["v1"], b1[rows_1], boxes[rows_1])
            out[f"ids_v1_{v}"] = rows_1.astype(np.int64)
            partners = [v] + (["v4"] if v == "v2" and "v4" in geoms else [])
            for w in partners:   # (V4 = V2 resized: V2's rows, official bboxs4 = bboxs2)
                out[f"boxes_{w}"] = _view_boxes(geoms[w], bv[rows_v], boxes[rows_v])
                out[f"ids_{w}"] = rows_v.astype(np.int64)
            out[f"valid_{v}"] = (np.arange(k) < m) & (n > 0)
        return out

    loaders = ("cpu", "cpu_draft", "device", "dali")   # recipe.loader values its views support

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        c = self.cfg
        img = as_image(record["image"])
        W, H = img.size
        cand = self._candidates(record, W, H, rng)
        geoms, picks = self.draw_views(cand, W, H, rng)
        boxes = self.sample_boxes(picks, geoms, W, H, rng)
        decode_for(img, geoms.values())
        out = {}
        for name, g in geoms.items():
            aug = BYOL_AUG_1 if name == "v1" else BYOL_AUG_2   # BYOL's asymmetric pair, per view
            t = render_view(img, g, aug, rng)
            if c.cutout and name in c.cutout_views:
                own = (np.concatenate([boxes[f"boxes_v1_{v}"] for v in self.pair_views]) if name == "v1"
                       else boxes[f"boxes_{name}"])
                t = cutout_in_boxes(t, own, rng, p=c.cutout_prob, area=tuple(c.cutout_area), clip=c.cutout_clip)
            out[name] = t
        out.update({k: torch.from_numpy(v) for k, v in boxes.items()})
        return out

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.online.parameters()) + list(self.predictor.parameters())}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """tau = 1 - (1 - tau_0)(cos(pi progress) + 1)/2 (BYOL Sec. 3.2; official SoCo)."""
        self.current_momentum = cosine_schedule(progress, self.cfg.momentum)
        update_momentum(self.online, self.target, self.current_momentum)

    def _encode(self, net, x: torch.Tensor, boxes: torch.Tensor, predict: bool) -> torch.Tensor:
        z = net(x, boxes)
        return self.predictor(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1) if predict else z

    def forward(self, batch: dict) -> dict:
        sel = self.pair_views
        K = batch[f"boxes_v1_{sel[0]}"].shape[1]
        # V1 once, with the boxes of every pair side by side
        b1 = torch.cat([batch[f"boxes_v1_{v}"] for v in sel], 1)
        q1 = self._encode(self.online, batch["v1"], b1, True).split(K, 1)
        with torch.no_grad():
            z1 = self.target(batch["v1"], b1).split(K, 1)
        first = {v: (q1[i], z1[i]) for i, v in enumerate(sel)}
        pairs = {}
        for v in self.view_names[1:]:
            qv = self._encode(self.online, batch[v], batch[f"boxes_{v}"], True)
            with torch.no_grad():
                zv = self.target(batch[v], batch[f"boxes_{v}"])
            pairs[v] = (*first[self.selection_of(v)], qv, zv)
        if self.cfg.mask_padding:   # the valid rows: the distinct boxes, in the same order on both sides
            loss, logs = soco_loss(pairs, masks={v: batch[f"valid_{self.selection_of(v)}"] for v in pairs})
        else:
            loss, logs = soco_loss(pairs, ids={v: (batch[f"ids_v1_{self.selection_of(v)}"], batch[f"ids_{v}"])
                                               for v in pairs})
        logs["valid_frac"] = torch.stack([batch[f"valid_{v}"].float().mean() for v in sel]).mean().detach()
        return {"loss": loss, **logs}

    def export(self) -> dict[str, torch.Tensor]:
        """Online backbone (bare torchvision names), ``fpn.*`` and ``box_head.*``."""
        return export_parts(self.online.backbone, fpn=self.online.fpn, box_head=self.online.box_head)


def _view_boxes(g: ViewGeometry, boxes: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``boxes`` (source pixels) mapped into view ``g`` and clipped to it; a (jittered) box
    that leaves the view falls back to the same row of ``fallback``."""
    m = _clip(g.map_boxes(boxes), g.out_size)
    bad = ((m[:, 2] - m[:, 0]) < 1) | ((m[:, 3] - m[:, 1]) < 1)
    if bad.any():
        m[bad] = _clip(g.map_boxes(fallback[bad]), g.out_size)
    return m.astype(np.float32)


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
    if c.cutout_clip not in CUTOUT_CLIPS:
        raise ConfigError(f"method.cutout_clip: unknown {c.cutout_clip!r} ({' | '.join(CUTOUT_CLIPS)})")
    if c.jitter_on not in JITTER_ON:
        raise ConfigError(f"method.jitter_on: unknown {c.jitter_on!r} ({' | '.join(JITTER_ON)})")
    if c.num_proposals < 1:
        raise ConfigError(f"method.num_proposals: expected >= 1, got {c.num_proposals}")
    if c.view_tries < 1:
        raise ConfigError(f"method.view_tries: expected >= 1, got {c.view_tries}")
    if len(c.level_thresholds) != 3 or list(c.level_thresholds) != sorted(c.level_thresholds):
        raise ConfigError(f"method.level_thresholds: expected 3 increasing bounds (P2|P3|P4|P5), "
                          f"got {list(c.level_thresholds)}")
    if not (0 < c.momentum <= 1):
        raise ConfigError(f"method.momentum: expected in (0, 1], got {c.momentum}")
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise ConfigError(f"method.crop_scale: expected [lo, hi] in (0, 1], got {list(c.crop_scale)}")
    if c.soco_star and not c.multi_view:
        raise ConfigError("method.soco_star: SoCo* needs the V3 view (method.multi_view: true)")
    bad = set(c.cutout_views) - {"v1", "v2", "v3", "v4"}
    if bad:
        raise ConfigError(f"method.cutout_views: unknown views {sorted(bad)} (v1 | v2 | v3 | v4)")
    for k in ("view_size", "v3_size", "star_v3_size", "v4_size"):
        if getattr(c, k) < 32:
            raise ConfigError(f"method.{k}: expected >= 32 px (P5 has stride 32), got {getattr(c, k)}")
