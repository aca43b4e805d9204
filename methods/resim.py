"""ReSim (Xiao, Reed, Wang, Keutzer, Darrell; NeurIPS 2021, "Region Similarity
Representation Learning", arXiv:2103.12902; official code Tete-Xiao/ReSim), the ReSim-FPN^T
variant of SoCo's Table 1: MoCo v2 plus a region contrast on two FPN levels, whose FPN is
transferred to the detector.

Pseudo-code (paper Sec. 3; official moco/builder.py, moco/datasets.py), recognisable in
``forward``:
    x_q, x_k = crop_q(flip(x)), crop_k(flip(x))     one shared flip, one crop per view
    q, P4_q, P3_q = f_q(x_q); k, P4_k, P3_k = f_k(x_k).detach()     f: ResNet + FPN (P3, P4)
    L_global = InfoNCE(q, k, queue, tau)                              MoCo v2
    for level in (P4, P3):
        w_q = fixed window grid on x_q; w_k = w_q mapped into x_k; valid = w_k inside x_k
        r_q = PrRoIPool(P_q, w_q); r_k = PrRoIPool(P_k, w_k)
        negs = normalize(avgpool3x3(P_k)) of the batch's images
        L_level = mean over valid windows of -log softmax([r_q.r_k, r_q.negs] / tau)[0]
    L = L_global + L_P4 + L_P3;  f_k = m f_k + (1 - m) f_q;  enqueue(k)

The window alignment runs on the device inside the step (no host sync): the views carry
their crop geometry as tensors and the windows follow their pixels through
``methods.geometry``'s conventions.

Choices and official-vs-paper decisions: docs/methods/resim.md
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageFilter
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from methods.augment import Photometric, apply_pil, as_image, to_tensor
from methods.backbones import backbone_state, build_resnet, resnet_stages, stage_channels
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.dist import gather, groups_per_process, mean_over_processes
from methods.ema import momentum_copy, update_momentum
from methods.geometry import ViewGeometry, align_windows, geometry_tensor, random_resized_crop, window_grid
from methods.heads import moco_v2_projector
from methods.losses import info_nce
from methods.queues import MemoryQueue
from methods.registry import register_method
from methods.roi import prroi_pool
from methods.shuffle_bn import in_bn_groups, shuffle_bn

LEVELS = ("p4", "p3")
STRIDES = {"p3": 8, "p4": 16}
EXPORT_FPN = ("bn", "none", "off")
# main_moco.py:229-242 (values of MoCo v2's aug+): Gaussian blur sigma U[0.1, 2] p 0.5, then
# ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, then RandomGrayscale p 0.2 (blur FIRST: ReSim's order)
RESIM_AUG = Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))


# --------------------------------------------------------------------------- pure helpers
def key_cells(feat: torch.Tensor, pool: int = 3) -> torch.Tensor:
    """The negatives of one key map: ``pool`` x ``pool`` average pooling, stride 1, no padding,
    each cell L2-normalised (builder.py:154-155, 160-161). (N, C, H, W) -> (N, cells, C)."""
    cells = F.normalize(F.avg_pool2d(feat, pool, stride=1, padding=0), dim=1)
    return cells.flatten(2).transpose(1, 2)


def region_info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ReSim's region loss (builder.py:176-203, main_moco.py:332-333): for window i, the
    positive is its key window and the negatives are the key cells of its group, logits / tau,
    cross-entropy with target 0, averaged over the valid windows (official: ignore_index -1).
    ``q``, ``k`` (G, M, C) pooled windows of G groups (L2-normalised here; no gradient through
    ``k``), ``negatives`` (G, P, C) each group's cells (normalised here), ``valid`` (G, M)
    bool; (M, C), (P, C), (M,) for one group. The mean divides by the valid count of the global
    batch (``mean_over_processes``), clamped at 1: 0, not NaN, when none is valid.
    Returns (loss, logits (G, M, 1 + P) with the positive in column 0)."""
    if q.dim() == 2:
        q, k, negatives, valid = q[None], k[None], negatives[None], valid[None]
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1).detach()
    negatives = F.normalize(negatives, dim=-1).detach()
    pos = (q * k).sum(-1, keepdim=True)
    neg = torch.bmm(q, negatives.transpose(1, 2))
    logits = torch.cat([pos, neg], -1) / temperature
    ce = logits.logsumexp(-1) - logits[..., 0]
    w = valid.to(ce.dtype)
    return (ce * w).sum() / mean_over_processes(w.sum()).clamp(min=1), logits


# --------------------------------------------------------------------------- networks
def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's c2_xavier_fill (official models.py:36-47): kaiming-uniform a = 1, bias 0."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ReSimFPN(nn.Module):
    """The official pre-training FPN (models.py:203-237, 286-298): 1x1 laterals on C3, C4, C5
    and 3x3 outputs on the P4 and P3 merges only, with bias, no norm; nearest upsampling.
    P4 = out4(lat4(C4) + up(lat5(C5))), P3 = out3(lat3(C3) + up(the P4 merge))."""

    def __init__(self, in_channels: list[int], channels: int = 256):
        super().__init__()
        c3, c4, c5 = in_channels[-3:]
        self.lateral3, self.lateral4, self.lateral5 = (nn.Conv2d(c, channels, 1) for c in (c3, c4, c5))
        self.output3, self.output4 = (nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        for m in (self.lateral3, self.lateral4, self.lateral5, self.output3, self.output4):
            _c2_xavier_fill(m)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m4 = self.lateral4(c4) + F.interpolate(self.lateral5(c5), size=c4.shape[-2:], mode="nearest")
        m3 = self.lateral3(c3) + F.interpolate(m4, size=c3.shape[-2:], mode="nearest")
        return self.output4(m4), self.output3(m3)


class ReSimEncoder(nn.Module):
    """ResNet + the ReSim FPN + MoCo v2's MLP on avg-pooled C5 (the global branch never sees
    the FPN: models.py:283-285). ``forward(x)`` -> (global (N, dim), P4, P3)."""

    def __init__(self, cfg: "ReSim.Config"):
        super().__init__()
        self.backbone = build_resnet(cfg.backbone, zero_init_residual=cfg.zero_init_residual)
        feat = self.backbone.feature_dim
        self.fpn = ReSimFPN(stage_channels(cfg.backbone), cfg.fpn_channels)
        self.proj = moco_v2_projector(feat, cfg.hidden_dim or feat, cfg.dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, c3, c4, c5 = resnet_stages(self.backbone, x)
        p4, p3 = self.fpn(c3, c4, c5)
        return self.proj(torch.flatten(self.backbone.avgpool(c5), 1)), p4, p3


def _side(size: int, halvings: int) -> int:
    """A torchvision ResNet's map side after ``halvings`` stride-2 layers (each rounds up)."""
    for _ in range(halvings):
        size = -(-size // 2)
    return size


def canonical_fpn(fpn: ReSimFPN, in_channels: list[int], channels: int, norm: str = "bn",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The pre-trained FPN under the canonical ``fpn.*`` keys (torchvision
    ``FeaturePyramidNetwork`` over C2-C5, the fine-tuning Mask R-CNN's FPN): laterals C3, C4,
    C5 -> ``inner_blocks.1-3``, outputs P3, P4 -> ``layer_blocks.1-2`` (official
    detection/convert-pretrain-to-detectron2.py:15-28 -> ``fpn_lateral{3,4,5}``,
    ``fpn_output{3,4}``). The rest (C2 lateral, P2 and P5 outputs, and with ``norm`` "bn" the
    norm layers) is that FPN's own fresh initialisation (drawn with ``seed``), as the
    detector's are left by the official conversion. ``norm`` "bn": the detector's FPN convs
    have a norm and no bias (detectron2 FPN.NORM SyncBN), so only the conv weights transfer;
    "none": weights and biases."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = FeaturePyramidNetwork(list(in_channels), channels,
                                    norm_layer=nn.BatchNorm2d if norm == "bn" else None)
    pairs = ((out.inner_blocks[1][0], fpn.lateral3), (out.inner_blocks[2][0], fpn.lateral4),
             (out.inner_blocks[3][0], fpn.lateral5), (out.layer_blocks[1][0], fpn.output3),
             (out.layer_blocks[2][0], fpn.output4))
    with torch.no_grad():
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
            if norm == "none":
                dst.bias.copy_(src.bias)
    return {f"fpn.{k}": v.detach().cpu().clone() for k, v in out.state_dict().items()}


# --------------------------------------------------------------------------- the method
@register_method("resim")
class ReSim(PretrainMethod):
    # README pre-training command + main_moco.py:52-58, 201-203, 271, 420-429: SGD lr 0.03 at
    # batch 256 (no scaling in code), momentum 0.9, wd 1e-4 on every parameter, half-cosine set
    # once per epoch at its start, no warm-up, 200 epochs
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256, weight_decay=1e-4,
                            momentum=0.9, schedule="cosine", warmup_epochs=0, epochs=200, cosine_per_epoch=True)
    sync_bn = False   # plain per-GPU BN + Shuffle-BN for the keys (builder.py:143-151), as MoCo v2
    group_fields = ("bn_groups", "shuffle_bn_splits", "p4_neg_groups", "p3_neg_groups")
    # tiny: 64-px crops, ResNet-18, FPN 64 (= the tiny/micro Mask R-CNN's, so fpn.* transfers);
    # the window grids keep their 6x6 / 8x8 counts with sizes and strides scaled by 64/224
    # (P4 13.71 px at 9.14, P3 9.14 px at 6.86); MoCo v2's tiny queue and batch.
    scales = {"tiny": {"method": {"backbone": "resnet18", "fpn_channels": 64, "queue_size": 1024, "crop_size": 64,
                                  "p4_window": 48 * 64 / 224, "p4_stride": 32 * 64 / 224,
                                  "p3_window": 32 * 64 / 224, "p3_stride": 24 * 64 / 224},
                       "recipe": {"batch_size": 64}},
              # small (one GPU): MoCo v2's small values (R50, 160-px crops, queue 16384, batch
              # 128), the window grids scaled by 160/224 as at tiny
              "small": {"method": {"backbone": "resnet50", "queue_size": 16384, "crop_size": 160,
                                   "p4_window": 48 * 160 / 224, "p4_stride": 32 * 160 / 224,
                                   "p3_window": 32 * 160 / 224, "p3_stride": 24 * 160 / 224},
                        "recipe": {"batch_size": 128}},
              # official: 8 GPUs x 32: per-GPU BN groups and Shuffle-BN, P3 negatives per GPU
              "paper": {"method": {"bn_groups": 8, "shuffle_bn_splits": 8, "p3_neg_groups": 8}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        zero_init_residual: bool = False   # models.py:139-198 (torchvision init, no zero gamma)
        # -- global branch: MoCo v2 (builder.py:209-223; README --moco-t 0.2) ---------------
        dim: int = 128
        hidden_dim: int = 0                # 0: the backbone's feature dim (2048 -> 2048 -> 128)
        queue_size: int = 65536
        temperature: float = 0.2           # tau of all three losses (builder.py:182, 203, 217)
        momentum: float = 0.999            # all encoder parameters: ResNet, FPN, MLP
        # -- views (datasets.py:67-72; transforms.py) ------------------------------------------
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.2, 1.0)
        flip_prob: float = 0.5
        shared_flip: bool = True           # one flip of the full image for both views
        # -- region branch -------------------------------------------------------------------
        fpn_channels: int = 256
        p4_window: float = 48.0            # datasets.py:76-96, in view-q pixels
        p4_stride: float = 32.0
        p4_grid: int = 6                   # 6 x 6 = 36 windows
        p3_window: float = 32.0            # datasets.py:102-122
        p3_stride: float = 24.0
        p3_grid: int = 8                   # 8 x 8 = 64 windows
        neg_pool: int = 3                  # key cells: 3x3 average pooling, stride 1 (builder.py:154)
        # groups of the global batch whose key cells are the negatives (a multiple of the
        # process count): P4 all-gathered (1), P3 per GPU (builder.py:156-162; 8 at paper scale)
        p4_neg_groups: int = 1
        p3_neg_groups: int = 1
        loss_weights: tuple[float, ...] = (1.0, 1.0, 1.0)   # global : P4 : P3 (main_moco.py:331-334)
        # -- BatchNorm groups, as MoCo v2 (methods.shuffle_bn) -----------------------------
        bn_groups: int = 1
        shuffle_bn_splits: int = 2
        # -- export: how the pre-trained FPN goes to the detector ("FPN^T") -----------------
        # "bn": conv weights into a BN FPN (the tables' Mask R-CNN, head_norm bn; official
        # detectron2 configs FPN.NORM SyncBN); "none": weights and biases; "off": backbone only
        export_fpn: str = "bn"

        def ranges(self):
            fits = all((n - 1) * s + w < self.crop_size
                       for w, s, n in ((self.p4_window, self.p4_stride, self.p4_grid),
                                       (self.p3_window, self.p3_stride, self.p3_grid)))
            return [("momentum", self.momentum < 1, "in [0, 1) (m = 1: the key encoder never moves)"),
                    ("p4_window", fits and min(self.p4_window, self.p3_window, self.p4_stride, self.p3_stride) > 0,
                     "window grids (p4_/p3_ window, stride, grid) with positive sizes, every window inside "
                     "the crop (x1 < crop_size, datasets.py:85)"),
                    ("p4_grid", min(self.p4_grid, self.p3_grid) >= 1, ">= 1 (p4_grid, p3_grid)"),
                    ("neg_pool", self.neg_pool >= 1, ">= 1"),
                    ("p4_neg_groups", min(self.p4_neg_groups, self.p3_neg_groups) >= 1, ">= 1 (p4_, p3_neg_groups)"),
                    ("loss_weights", len(self.loss_weights) == 3 and min(self.loss_weights) >= 0,
                     "3 weights >= 0 (global, P4, P3)"),
                    ("export_fpn", self.export_fpn in EXPORT_FPN, " | ".join(EXPORT_FPN)),
                    ("crop_size", _side(self.crop_size, 4) >= self.neg_pool,
                     f"a P4 map of at least neg_pool = {self.neg_pool} cells (crop_size >= 16 x neg_pool)")]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder_q = ReSimEncoder(cfg)
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = MemoryQueue(cfg.dim, cfg.queue_size)
        grids = {"p4": (cfg.p4_window, cfg.p4_stride, cfg.p4_grid), "p3": (cfg.p3_window, cfg.p3_stride, cfg.p3_grid)}
        for level, g in grids.items():   # constants of the config: not in the state dict
            self.register_buffer(f"windows_{level}", window_grid(*g), persistent=False)

    # -- views (DataLoader worker) ------------------------------------------------
    def view_geometries(self, width: int, height: int, rng: np.random.Generator) -> tuple[ViewGeometry, ViewGeometry]:
        """One flip decision for both views (datasets.py:67-68), then a RandomResizedCrop per
        view (70-72). Flipping the image before cropping equals cropping the mirrored box and
        flipping the view; the crop distribution is mirror-symmetric, so the crops are drawn in
        source coordinates and both views carry the flip."""
        c = self.cfg
        size = (c.crop_size, c.crop_size)
        flip = bool(rng.random() < c.flip_prob)
        crop_q = random_resized_crop(width, height, rng, tuple(c.crop_scale))
        crop_k = random_resized_crop(width, height, rng, tuple(c.crop_scale))
        flip_k = flip if c.shared_flip else bool(rng.random() < c.flip_prob)
        return ViewGeometry(crop_q, size, flip), ViewGeometry(crop_k, size, flip_k)

    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        g_q, g_k = self.view_geometries(img.width, img.height, rng)
        return {"im_q": render_resim_view(img, g_q, rng), "im_k": render_resim_view(img, g_k, rng),
                "geom_q": geometry_tensor(g_q), "geom_k": geometry_tensor(g_k)}

    # -- model --------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.encoder_q.parameters())}]

    def momentum_update(self, progress: float) -> None:
        update_momentum(self.encoder_q, self.encoder_k, self.cfg.momentum)   # constant m (builder.py:52-53)

    def _packed(self, encoder: nn.Module):
        """``encoder``'s three outputs as one (N, *) tensor, for the BN-group helpers."""
        return lambda x: torch.cat([t.flatten(1) for t in encoder(x)], 1)

    def _unpack(self, flat: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        C, s4, s3 = self.cfg.fpn_channels, _side(size, 4), _side(size, 3)
        g, p4, p3 = flat.split([self.cfg.dim, C * s4 * s4, C * s3 * s3], 1)
        return g, p4.reshape(-1, C, s4, s4), p3.reshape(-1, C, s3, s3)

    def _grouped(self, cells: torch.Tensor, groups: int, field: str) -> tuple[int, torch.Tensor]:
        """The key cells (N, P, C) a level's windows contrast with, as (G, cells, C) for this
        process's G groups of consecutive images: one group of the global batch = every cell
        of the global batch (all-gathered); ``groups`` (a multiple of the process count) = the
        cells of the window's own group of images (official P3: each GPU's own)."""
        n, per, C = cells.shape
        if groups == 1:
            return 1, gather(cells.reshape(n * per, C))[None]
        local = groups_per_process(groups, field)
        if n % local:
            raise ValueError(f"method.{field}: {n} images per process cannot form {local} equal groups")
        return local, cells.reshape(local, n // local * per, C)

    def region_loss(self, level: str, feat_q: torch.Tensor, feat_k: torch.Tensor, g_q: torch.Tensor,
                    g_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level's loss: (loss, logits (G, M, 1 + P), valid (N, K)) over the batch's windows."""
        c = self.cfg
        windows = getattr(self, f"windows_{level}")
        n, K = feat_q.shape[0], windows.shape[0]
        box_k, valid = align_windows(windows, g_q, g_k)
        r_q = prroi_pool(feat_q, windows.expand(n, K, 4), 1.0 / STRIDES[level])        # (N, K, C)
        with torch.no_grad():
            r_k = prroi_pool(feat_k, box_k, 1.0 / STRIDES[level])
            field = f"{level}_neg_groups"
            G, negs = self._grouped(key_cells(feat_k, c.neg_pool), getattr(c, field), field)
        C = r_q.shape[-1]
        loss, logits = region_info_nce(r_q.reshape(G, -1, C), r_k.reshape(G, -1, C), negs,
                                       valid.reshape(G, -1), c.temperature)
        return loss, logits, valid

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        im_q, im_k = batch["im_q"], batch["im_k"]
        size = im_q.shape[-1]
        q, p4_q, p3_q = self._unpack(in_bn_groups(self.encoder_q, self._packed(self.encoder_q), im_q,
                                                  groups=c.bn_groups), size)
        with torch.no_grad():   # Shuffle-BN; k and both key maps un-shuffled (builder.py:143-151)
            k, p4_k, p3_k = self._unpack(shuffle_bn(self.encoder_k, self._packed(self.encoder_k), im_k,
                                                    groups=c.shuffle_bn_splits), size)
        loss_g, logits_g = info_nce(q, k, self.queue.keys.clone(), c.temperature)
        self.queue.enqueue(gather(k))
        g_q, g_k = batch["geom_q"].float(), batch["geom_k"].float()
        logs = {"loss_global": loss_g.detach(), "acc1": (logits_g.argmax(1) == 0).float().mean().detach()}
        total = c.loss_weights[0] * loss_g
        for w, level, fq, fk in zip(c.loss_weights[1:], LEVELS, (p4_q, p3_q), (p4_k, p3_k)):
            loss, logits, valid = self.region_loss(level, fq, fk, g_q, g_k)
            total = total + w * loss
            v = valid.flatten().float()
            hit = (logits.argmax(-1) == 0).flatten().float()
            logs[f"loss_{level}"] = loss.detach()
            logs[f"acc_{level}"] = ((hit * v).sum() / v.sum().clamp(min=1)).detach()
            logs[f"valid_{level}"] = v.mean().detach()
        return {"loss": total, **logs}

    def export(self) -> dict[str, torch.Tensor]:
        """The query encoder's backbone (bare torchvision names) and, unless ``export_fpn`` is
        "off", its FPN as ``fpn.*`` (:func:`canonical_fpn`); the MLP is dropped (official
        conversion: encoder_q keys only, fc removed)."""
        c = self.cfg
        out = backbone_state(self.encoder_q.backbone)
        if c.export_fpn != "off":
            out.update(canonical_fpn(self.encoder_q.fpn, stage_channels(c.backbone), c.fpn_channels, c.export_fpn))
        return out


def render_resim_view(img, g: ViewGeometry, rng: np.random.Generator, aug: Photometric | None = None) -> torch.Tensor:
    """A view's pixels in ReSim's order (main_moco.py:229-242): crop (+ the shared flip) ->
    Gaussian blur -> colour jitter -> grayscale -> tensor, normalised (MoCo v2 puts the blur
    last). The parameters are drawn as ``Photometric.draw`` draws them."""
    p = (aug or RESIM_AUG).draw(rng)
    pil = g.apply_image(img)
    if p.blur_sigma:   # PIL's radius is the Gaussian's sigma (moco/loader.py GaussianBlur)
        pil = pil.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    return to_tensor(apply_pil(pil, replace(p, blur_sigma=0.0)))
