"""PixPro (Xie, Lin, Zhang, Cao, Lin, Hu; CVPR 2021, "Propagate Yourself: Exploring
Pixel-Level Consistency for Unsupervised Visual Representation Learning", arXiv:2011.10043;
official code zdaxie/PixPro), and its PixContrast baseline.

Pseudo-code (paper Sec. 3), recognisable in ``forward``:
    V1, V2 = two random resized crops (+ flip) of one image, BYOL's asymmetric colour views
    A_ij = 1 if || c1_i - c2_j || / max bin diagonal < T      c: bin centres, x / (width - 1), y / (height - 1)
    x_k  = g_proj(f(V_k))           online: ResNet C5 -> 1x1-conv MLP projector, a map of pixels
    x'_k = g'_proj(f'(V_k))         target: EMA of encoder + projector, m 0.99 -> 1 (cosine)
    PixPro:      y_i = sum_j max(cos(x_i, x_j), 0)^gamma * g(x_j)    pixel propagation module
                 L = - mean_{A_ij} cos(y1_i, x'2_j) - mean_{A_ji} cos(y2_j, x'1_i)
    PixContrast: L = InfoNCE over pixels: positives A_ij, negatives the other pixels, tau 0.3
    + instance:  L += alpha * BYOL(pool q(h(f(V1))), pool h'(f'(V2))) + symmetric   (h, q per pixel)

Choices and official-vs-paper decisions: docs/methods/pixpro.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from methods.augment import BYOL_AUG_1, BYOL_AUG_2, to_tensor
from methods.backbones import backbone_state, build_resnet, c5_size, resnet_stages
from methods.config import ConfigError
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import cosine_schedule, momentum_copy, update_momentum
from methods.geometry import ViewGeometry, grid_matches, random_view
from methods.heads import ConvMLPHead, byol_predictor, byol_projector, pixpro_projector
from methods.losses import byol_regression, masked_cosine_regression, pixel_info_nce
from methods.registry import register_method

OBJECTIVES = ("pixpro", "pixcontrast")
POS_COORDS = ("normalised", "pixels")
INSTANCE_POOL = ("after", "before")


def normalised_grid_matches(a: ViewGeometry, b: ViewGeometry, grid: tuple[int, int], image_size: tuple[int, int],
                            threshold: float = 0.7) -> np.ndarray:
    """PixPro's positive pixel pairs as the official code measures them (zdaxie/PixPro
    ``contrast/data/transform_coord.py`` ``RandomResizedCropCoord`` / ``RandomHorizontalFlipCoord``,
    ``contrast/models/PixPro.py`` ``regression_loss``): a view is the corners of its crop's first
    and last pixel, x / (image width - 1), y / (image height - 1), x swapped when flipped; bins
    split that span, and the distance between bin centres in these units, over the larger bin
    diagonal in the same units, is below ``threshold``. Same layout as ``grid_matches``
    (bins of ``a`` x bins of ``b``, row-major); on a non-square image x and y are scaled apart."""
    W, H = image_size
    gw, gh = grid

    def centres(g: ViewGeometry) -> tuple[np.ndarray, float]:
        x0, y0, x1, y1 = g.crop
        sx, sy = 1.0 / max(W - 1, 1), 1.0 / max(H - 1, 1)
        left, top, right, bottom = x0 * sx, y0 * sy, (x1 - 1) * sx, (y1 - 1) * sy   # last pixel = x1 - 1
        if g.flip:
            left, right = right, left
        bw, bh = (right - left) / gw, (bottom - top) / gh
        xs = left + (np.arange(gw) + 0.5) * bw
        ys = top + (np.arange(gh) + 0.5) * bh
        return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), math.hypot(bw, bh)

    (pa, da), (pb, db) = centres(a), centres(b)
    dist = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return dist / max(da, db) < threshold


class PixelPropagation(nn.Module):
    """The pixel propagation module (paper Sec. 3.2): y_i = sum_j s(x_i, x_j) g(x_j) with
    s = max(cos, 0)^gamma over all pixels j of the same map; g(x_j) L2-normalised (official)."""

    def __init__(self, dim: int, gamma: float = 2.0, layers: int = 1):
        super().__init__()
        self.gamma = gamma
        if layers == 0:
            self.transform = nn.Identity()
        elif layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        elif layers == 2:
            self.transform = ConvMLPHead(dim, dim, dim)
        else:
            raise ConfigError(f"method.ppm_layers: expected 0, 1 or 2, got {layers}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H*W)."""
        v = F.normalize(self.transform(x), dim=1).flatten(2)
        xn = F.normalize(x, dim=1).flatten(2)
        s = torch.einsum("nci,ncj->nij", xn, xn).clamp(min=0) ** self.gamma
        return torch.einsum("nij,ncj->nci", s, v)


class PixProEncoder(nn.Module):
    """ResNet C5 + 1x1-conv projector (+ the instance projector): the part with an EMA twin.
    ``forward(images)`` -> (projected map (N, C, H, W), C5 map). The instance projector is a
    1x1-conv MLP applied per pixel (``instance_pool: after``, official ``projector_instance =
    Proj_Head()``) or the BYOL MLP on pooled C5 (``before``, the paper)."""

    def __init__(self, cfg: "PixPro.Config"):
        super().__init__()
        # official contrast/resnet.py zeroes the last BN gamma of every residual block
        self.backbone = build_resnet(cfg.backbone, zero_init_residual=cfg.zero_init_residual)
        feat = self.backbone.feature_dim
        self.projector = pixpro_projector(feat, cfg.proj_hidden_dim, cfg.proj_dim)
        head = pixpro_projector if cfg.instance_pool == "after" else byol_projector
        self.instance_projector = head(feat, cfg.proj_hidden_dim, cfg.proj_dim) if cfg.instance_weight > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c5 = resnet_stages(self.backbone, x)[-1]
        return self.projector(c5), c5


@register_method("pixpro")
class PixPro(PretrainMethod):
    # Official tools/pixpro_base_r50_{100,400}ep.sh, paper Sec. 4.1: LARS, base lr 1.0 x B/256,
    # wd 1e-5, 5 warm-up epochs, cosine, batch 1024 (8 GPUs x 128), 100 / 400 epochs.
    # warm-up from lr/100 (main_pretrain.py --warmup-multiplier 100), cosine floor 1e-6
    # (contrast/lr_scheduler.py eta_min), LARS's 1e-8 (contrast/lars.py): as SoCo's code
    recipe = PretrainRecipe(optimizer="lars", base_lr=1.0, lr_batch=256, batch_size=1024,
                            weight_decay=1e-5, momentum=0.9, schedule="cosine", warmup_epochs=5, epochs=100,
                            warmup_start_factor=0.01, min_lr=1e-6, lars_eps=1e-8)
    # tiny: 128-px synthetic images; 96-px crops give a 3x3 C5 grid (64 px would leave 2x2),
    # so propagation and the positive threshold still have neighbours to work with.
    scales = {"tiny": {"method": {"backbone": "resnet18", "proj_hidden_dim": 1024, "proj_dim": 128,
                                  "pred_hidden_dim": 1024, "crop_size": 96},
                       "recipe": {"batch_size": 16}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        objective: str = "pixpro"        # pixpro | pixcontrast (paper only, never released)
        pos_threshold: float = 0.7       # T (Sec. 3.1; official --pixpro-pos-ratio)
        gamma: float = 2.0               # PPM sharpness (Sec. 3.2; --pixpro-p 2)
        ppm_layers: int = 1              # transform g: 0 identity | 1 1x1 conv | 2 MLP (--pixpro-transform-layer)
        temperature: float = 0.3         # PixContrast tau (Sec. 3.1)
        instance_weight: float = 0.0     # alpha of "+ instance": paper 1, released scripts 0 (off)
        instance_pool: str = "after"     # after: heads per pixel, pool last (official) | before: pool C5 first (paper)
        proj_hidden_dim: int = 4096      # projector 2048-4096-256 (official Proj_Head)
        proj_dim: int = 256
        pred_hidden_dim: int = 4096      # instance predictor 256-4096-256 (official Pred_Head)
        momentum: float = 0.99           # start of the cosine EMA schedule (to 1)
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.08, 1.0)   # official --crop 0.08
        pos_coords: str = "normalised"   # normalised: x / (W-1), y / (H-1) (official) | pixels: source pixels
        zero_init_residual: bool = True  # official contrast/resnet.py: last BN gamma of each block = 0

    def __init__(self, cfg: Config):
        _validate(cfg)
        super().__init__(cfg)
        self.online = PixProEncoder(cfg)
        self.ppm = PixelPropagation(cfg.proj_dim, cfg.gamma, cfg.ppm_layers) if cfg.objective == "pixpro" else None
        predictor = ConvMLPHead if cfg.instance_pool == "after" else byol_predictor   # official Pred_Head: MLP2d, BN
        self.predictor = predictor(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim) if cfg.instance_weight > 0 else None
        self.target = momentum_copy(self.online)
        self.current_momentum = cfg.momentum

    # -- views (DataLoader worker) --------------------------------------------------------
    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        c = self.cfg
        img = Image.fromarray(record["image"])
        g1 = random_view(img.width, img.height, c.crop_size, rng, scale=tuple(c.crop_scale))
        g2 = random_view(img.width, img.height, c.crop_size, rng, scale=tuple(c.crop_scale))
        grid = c5_size(c.crop_size)
        if c.pos_coords == "normalised":
            pos = normalised_grid_matches(g1, g2, (grid, grid), (img.width, img.height), c.pos_threshold)
        else:
            pos = grid_matches(g1, g2, (grid, grid), c.pos_threshold)
        return {"v1": to_tensor(BYOL_AUG_1(g1.apply_image(img), rng)),   # BYOL's asymmetric pair
                "v2": to_tensor(BYOL_AUG_2(g2.apply_image(img), rng)),
                "pos_12": torch.from_numpy(pos)}

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        mods = [m for m in (self.online, self.ppm, self.predictor) if m is not None]
        return [{"params": [p for m in mods for p in m.parameters()]}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """tau = 1 - (1 - tau_0)(cos(pi progress) + 1)/2 (official ``_momentum_update_key_encoder``)."""
        self.current_momentum = cosine_schedule(progress, self.cfg.momentum)
        update_momentum(self.online, self.target, self.current_momentum)

    def instance_embedding(self, encoder: PixProEncoder, c5: torch.Tensor, predict: bool) -> torch.Tensor:
        """The "+ instance" vector of a C5 map: ``after`` (official ``PixPro.forward``): projector
        (and predictor, online) per pixel, then the average over the map (``avgpool``);
        ``before`` (paper): the average C5 through the BYOL MLPs."""
        if self.cfg.instance_pool == "after":
            z = encoder.instance_projector(c5)
            return (self.predictor(z) if predict else z).mean((2, 3))
        z = encoder.instance_projector(c5.mean((2, 3)))
        return self.predictor(z) if predict else z

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        A = batch["pos_12"]                                   # (N, L1, L2) positive pixel pairs
        x1, f1 = self.online(batch["v1"])
        x2, f2 = self.online(batch["v2"])
        with torch.no_grad():
            t1, g1 = self.target(batch["v1"])
            t2, g2 = self.target(batch["v2"])
        if A.shape[1:] != (x1.shape[2] * x1.shape[3], x2.shape[2] * x2.shape[3]):
            raise ValueError(f"pixpro: batch['pos_12'] has shape {tuple(A.shape)} but the C5 maps are "
                             f"{tuple(x1.shape[2:])} and {tuple(x2.shape[2:])} (views built for another crop_size?)")
        t1, t2, At = t1.flatten(2), t2.flatten(2), A.transpose(1, 2)
        if c.objective == "pixpro":
            y1, y2 = self.ppm(x1), self.ppm(x2)
            loss_pix = 2 * (masked_cosine_regression(y1, t2, A) + masked_cosine_regression(y2, t1, At))
        else:
            loss_pix = (pixel_info_nce(x1.flatten(2), t2, A, c.temperature)
                        + pixel_info_nce(x2.flatten(2), t1, At, c.temperature))
        logs = {"loss_pix": loss_pix.detach(), "pos_pairs": A.float().sum((1, 2)).mean()}
        loss = loss_pix
        if self.predictor is not None:
            p1, p2 = (self.instance_embedding(self.online, f, predict=True) for f in (f1, f2))
            with torch.no_grad():
                z1, z2 = (self.instance_embedding(self.target, g, predict=False) for g in (g1, g2))
            loss_ins = byol_regression(p1, z2) + byol_regression(p2, z1)
            logs["loss_instance"] = loss_ins.detach()
            loss = loss + c.instance_weight * loss_ins
        return {"loss": loss, **logs}

    def export(self) -> dict[str, torch.Tensor]:
        """The online backbone in bare torchvision names (C4 detectors take res5 as their head)."""
        return backbone_state(self.online.backbone)


def _validate(c: "PixPro.Config") -> None:
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"method.objective: unknown {c.objective!r} ({' | '.join(OBJECTIVES)})")
    if c.pos_coords not in POS_COORDS:
        raise ConfigError(f"method.pos_coords: unknown {c.pos_coords!r} ({' | '.join(POS_COORDS)})")
    if c.instance_pool not in INSTANCE_POOL:
        raise ConfigError(f"method.instance_pool: unknown {c.instance_pool!r} ({' | '.join(INSTANCE_POOL)})")
    if c.ppm_layers not in (0, 1, 2):
        raise ConfigError(f"method.ppm_layers: expected 0, 1 or 2, got {c.ppm_layers}")
    for k in ("pos_threshold", "gamma", "temperature"):
        if not getattr(c, k) > 0:
            raise ConfigError(f"method.{k}: expected > 0, got {getattr(c, k)}")
    if c.instance_weight < 0:
        raise ConfigError(f"method.instance_weight: expected >= 0, got {c.instance_weight}")
    if not (0 < c.momentum <= 1):
        raise ConfigError(f"method.momentum: expected in (0, 1], got {c.momentum}")
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise ConfigError(f"method.crop_scale: expected [lo, hi] in (0, 1], got {list(c.crop_scale)}")
    if c.crop_size < 32:
        raise ConfigError(f"method.crop_size: expected >= 32 px (C5 has stride 32), got {c.crop_size}")
