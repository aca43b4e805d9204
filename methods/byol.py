"""BYOL (Grill et al., NeurIPS 2020, "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning", arXiv:2006.07733; official code (JAX) deepmind/deepmind-research
``byol/``: byol_experiment.py, configs/byol.py, utils/augmentations.py, utils/networks.py).

The paper's Algorithm 1, recognisable in ``forward`` and ``momentum_update``:
    v, v' = t(x), t'(x)                        # t ~ T (blur 1.0, no solarize), t' ~ T' (blur 0.1, solarize 0.2)
    z, z' = g_theta(f_theta(v)), g_theta(f_theta(v'))        # online: encoder, projector 4096-256
    p, p' = q_theta(z), q_theta(z')                           # online predictor 4096-256
    t1, t2 = g_xi(f_xi(v)), g_xi(f_xi(v'))                   # target: no predictor, no gradient
    loss = (2 - 2 cos(p, t2)) + (2 - 2 cos(p', t1))          # Eq. 2 and its symmetric term
    theta <- LARS(theta, grad_theta loss)
    xi <- tau xi + (1 - tau) theta,  tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2

Choices and official-vs-paper decisions: docs/methods/byol.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from methods.augment import BYOL_AUG_1, BYOL_AUG_2, JITTER_STYLES, as_image, decode_for, render_view
from methods.backbones import backbone_state, build_resnet
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import cosine_schedule, momentum_copy, update_momentum
from methods.geometry import Box, ViewGeometry, random_resized_crop
from methods.heads import MLPHead
from methods.losses import byol_regression
from methods.registry import register_method

CROPS = ("official", "torchvision")
TARGET_INITS = ("independent", "copy")


def official_crop(width: int, height: int, rng: np.random.Generator,
                  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """BYOL's random crop (official byol/utils/dataset.py ``_decode_and_random_crop``): one
    draw of an area fraction in ``scale`` and a log-uniform aspect ratio, each side clipped to
    the image (torchvision's RandomResizedCrop redraws up to 10 times and then takes a centre
    crop instead), at a uniform offset."""
    a = width * height * rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = max(1, min(int(round(math.sqrt(a * r))), width))
    h = max(1, min(int(round(math.sqrt(a / r))), height))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return (x0, y0, x0 + w, y0 + h)


def byol_head(in_dim: int, hidden_dim: int, out_dim: int) -> MLPHead:
    """Projector / predictor: Linear -> BN -> ReLU -> Linear without bias (official haiku
    ``MLP``; its first Linear's bias, before BN, changes no output in training)."""
    return MLPHead(in_dim, hidden_dim, out_dim, batch_norm=True, out_bias=False)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad = False
    return module


def target_network(cfg, encoder: nn.Module, projector: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The target xi (encoder + projector), trained only by the EMA: a copy of the online
    network (``target_init: copy``) or, as the official code does, initialised on its own."""
    if cfg.target_init == "copy":
        return momentum_copy(encoder), momentum_copy(projector)
    return (_frozen(build_resnet(cfg.backbone, zero_init_residual=cfg.zero_init_residual)),
            _frozen(byol_head(encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)))


@register_method("byol")
class BYOL(PretrainMethod):
    # Paper Appendix A / official configs/byol.py at 1000 epochs: LARS (eta 1e-3, momentum 0.9;
    # biases and BN excluded from weight decay and adaptation: benchmark.engine.optim.LARS
    # excludes every 1-d tensor, as exclude_bias_and_norm), base lr 0.2 x B/256, wd 1.5e-6,
    # batch 4096, 10 warm-up epochs from 0, then cosine to 0. The official presets for shorter
    # runs (configs/byol.py _LR/_WD/_EMA_PRESETS, 300 epochs: lr 0.3, wd 1e-6, tau 0.99) are
    # a table row's overrides (docs/methods/byol.md).
    recipe = PretrainRecipe(optimizer="lars", base_lr=0.2, lr_batch=256, batch_size=4096,
                            weight_decay=1.5e-6, momentum=0.9, schedule="cosine", warmup_epochs=10, epochs=1000)
    # tiny: ResNet-18, 64-px views, the paper's batch / 128 (32), the heads at 512-128 as
    # SoCo's tiny ones; tau_base 0.9 so the target forgets its independent random init within
    # the run (75 steps at 300 epochs: the product of the taus is 0.86 at 0.996, 0.02 at 0.9).
    # small: R50 at 160 px, batch 256.
    scales = {"tiny": {"method": {"backbone": "resnet18", "proj_hidden_dim": 512, "proj_dim": 128,
                                  "pred_hidden_dim": 512, "view_size": 64, "momentum": 0.9},
                       "recipe": {"batch_size": 32}},
              "small": {"method": {"backbone": "resnet50", "view_size": 160}, "recipe": {"batch_size": 256}}}
    loaders = ("cpu", "cpu_draft", "device")
    sync_bn = True   # official bn_config cross_replica_axis: BN statistics over the global batch

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"       # ResNet-50 v1 (Appendix A)
        zero_init_residual: bool = True  # haiku BlockV1: the last BN scale of each bottleneck 0
        proj_hidden_dim: int = 4096      # projector g (Sec. 3.3, configs/byol.py)
        proj_dim: int = 256
        pred_hidden_dim: int = 4096      # predictor q, same architecture as g
        momentum: float = 0.996          # tau_base, to 1 on a cosine (Sec. 3.3)
        view_size: int = 224
        crop_scale: tuple[float, ...] = (0.08, 1.0)
        crop: str = "official"           # one draw clipped to the image | "torchvision" (RandomResizedCrop)
        # "tf": brightness/contrast/saturation/hue shifted as the official augmentations.py
        # (and Appendix B) shift them; "torchvision": ColorJitter's factors (SoCo's, most ports)
        jitter_style: str = "tf"
        # "independent": the target initialised with its own random draw (official
        # _make_initial_state: rng_online, rng_target); "copy": a copy of the online network
        target_init: str = "independent"

        def ranges(self):
            return [("crop", self.crop in CROPS, " | ".join(CROPS)),
                    ("jitter_style", self.jitter_style in JITTER_STYLES, " | ".join(JITTER_STYLES)),
                    ("target_init", self.target_init in TARGET_INITS, " | ".join(TARGET_INITS))]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        # online network theta: encoder f, projector g, predictor q
        self.encoder = build_resnet(cfg.backbone, zero_init_residual=cfg.zero_init_residual)
        feat = self.encoder.feature_dim
        self.projector = byol_head(feat, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = byol_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        # target network xi: encoder and projector, no predictor, trained only by the EMA
        self.target_encoder, self.target_projector = target_network(cfg, self.encoder, self.projector)
        self.current_momentum = cfg.momentum
        self.aug = (replace(BYOL_AUG_1, jitter_style=cfg.jitter_style),     # T: blur 1.0, solarize 0
                    replace(BYOL_AUG_2, jitter_style=cfg.jitter_style))     # T': blur 0.1, solarize 0.2

    # -- views (DataLoader worker): v = t(x), v' = t'(x) -----------------------------------
    def geometry(self, width: int, height: int, rng: np.random.Generator) -> ViewGeometry:
        scale = tuple(self.cfg.crop_scale)
        crop = (official_crop(width, height, rng, scale) if self.cfg.crop == "official"
                else random_resized_crop(width, height, rng, scale))
        size = self.cfg.view_size
        return ViewGeometry(crop, (size, size), bool(rng.random() < 0.5))   # random_flip: p 0.5

    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        geoms = [self.geometry(img.width, img.height, rng) for _ in range(2)]
        decode_for(img, geoms)
        return {name: render_view(img, g, aug, rng) for name, g, aug in zip(("view1", "view2"), geoms, self.aug)}

    # -- model ----------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": [*self.encoder.parameters(), *self.projector.parameters(),
                            *self.predictor.parameters()]}]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """xi <- tau xi + (1 - tau) theta with tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2
        (Sec. 3.3; official schedules.target_ema), after the optimizer step; BN statistics
        are not averaged (the official target keeps its own state)."""
        self.current_momentum = cosine_schedule(progress, self.cfg.momentum)
        update_momentum(self.encoder, self.target_encoder, self.current_momentum)
        update_momentum(self.projector, self.target_projector, self.current_momentum)

    def forward(self, batch: dict) -> dict:
        # each view through each network on its own, as the official _forward applies them
        # (BatchNorm statistics per view)
        p1, p2 = (self.predictor(self.projector(self.encoder(batch[v]))) for v in ("view1", "view2"))
        with torch.no_grad():
            t1, t2 = (self.target_projector(self.target_encoder(batch[v])) for v in ("view1", "view2"))
        # official helpers.regression_loss per term, summed, mean over the batch
        loss_12, loss_21 = byol_regression(p1, t2), byol_regression(p2, t1)
        return {"loss": loss_12 + loss_21, "loss_12": loss_12.detach(), "loss_21": loss_21.detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.encoder)   # the online encoder f_theta (Sec. 3.3)
