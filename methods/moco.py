"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
Learning", arXiv:2003.04297), the baseline of every detection-pretraining paper here.

Pseudo-code (He et al. 2020, Algorithm 1), recognisable in ``forward``:
    q = f_q(x_q); k = f_k(x_k).detach()
    loss = InfoNCE(q, k, queue, tau)
    f_k = m f_k + (1 - m) f_q ; enqueue(k)

Choices and official-vs-paper decisions: docs/methods/moco_v2.md
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methods.augment import MOCO_V2_AUG, as_image, render_view
from methods.backbones import backbone_state, build_resnet
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.ema import momentum_copy, update_momentum
from methods.geometry import random_view
from methods.heads import moco_v2_projector
from methods.losses import info_nce
from methods.queues import MemoryQueue
from methods.registry import register_method
from methods.dist import gather
from methods.shuffle_bn import in_bn_groups, shuffle_bn


@register_method("moco_v2")
class MoCoV2(PretrainMethod):
    # SGD lr 0.03 at batch 256, wd 1e-4, momentum 0.9, cosine (MoCo v2 Sec. 3, official repo)
    sync_bn = False   # per-process BN (bn_groups) and Shuffle-BN for the keys (Sec. 3.3)
    group_fields = ("bn_groups", "shuffle_bn_splits")
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256,
                            weight_decay=1e-4, momentum=0.9, schedule="cosine", warmup_epochs=0)
    # tiny: 50 steps x 64 keys; a 1024-key queue fills in 16 steps (a queue larger than the
    # keys ever seen keeps its random initial entries as trivially easy negatives)
    scales = {"tiny": {"method": {"backbone": "resnet18", "queue_size": 1024, "crop_size": 64},
                       "recipe": {"batch_size": 64}},
              "small": {"method": {"backbone": "resnet50", "queue_size": 16384, "crop_size": 160},
                        "recipe": {"batch_size": 128}},
              "paper": {"method": {"bn_groups": 8, "shuffle_bn_splits": 8}}}   # official: 8 GPUs x 32
    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        dim: int = 128                   # projection output (MoCo v2 Sec. 3)
        hidden_dim: int = 0              # 0: the backbone's feature dim (2048 for R50)
        queue_size: int = 65536          # K (MoCo Sec. 4)
        temperature: float = 0.2         # tau (MoCo v2 Table 1)
        momentum: float = 0.999          # m (MoCo Sec. 3.2)
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.2, 1.0)   # aug+ (MoCo v2 official main_moco.py)
        # BatchNorm groups of the global batch (methods.shuffle_bn), a multiple of the process
        # count: one GPU's worth below paper scale, the official 8 GPUs at paper scale
        bn_groups: int = 1               # query encoder (per-process BN)
        shuffle_bn_splits: int = 2       # key encoder (Shuffle-BN)

        def ranges(self):
            # dim, queue_size, temperature, crop_size, bn_groups...: methods.config.RULES, by name
            return [("momentum", self.momentum < 1, "in [0, 1) (m = 1: the key encoder never moves)")]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder_q = build_resnet(cfg.backbone)
        feat = self.encoder_q.feature_dim
        self.proj_q = moco_v2_projector(feat, cfg.hidden_dim or feat, cfg.dim)
        self.encoder_k = momentum_copy(self.encoder_q)
        self.proj_k = momentum_copy(self.proj_q)
        self.queue = MemoryQueue(cfg.dim, cfg.queue_size)

    # -- views (DataLoader worker) ------------------------------------------------
    loaders = ("cpu", "cpu_draft", "device", "dali")   # recipe.loader values its views support

    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        out = {}
        for name in ("im_q", "im_k"):
            g = random_view(img.width, img.height, self.cfg.crop_size, rng, scale=tuple(self.cfg.crop_scale))
            out[name] = render_view(img, g, MOCO_V2_AUG, rng)
        return out

    # -- model --------------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.encoder_q.parameters()) + list(self.proj_q.parameters())}]

    def momentum_update(self, progress: float) -> None:
        update_momentum(self.encoder_q, self.encoder_k, self.cfg.momentum)   # constant m (MoCo)
        update_momentum(self.proj_q, self.proj_k, self.cfg.momentum)

    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Key features with Shuffle-BN (MoCo Sec. 3.3) over ``shuffle_bn_splits`` BN groups."""
        return shuffle_bn(self.encoder_k, lambda x: self.proj_k(self.encoder_k(x)), im_k,
                          groups=self.cfg.shuffle_bn_splits)

    def forward(self, batch: dict) -> dict:
        q = in_bn_groups(self.encoder_q, lambda x: self.proj_q(self.encoder_q(x)), batch["im_q"],
                         groups=self.cfg.bn_groups)
        with torch.no_grad():
            k = self._keys(batch["im_k"])
        loss, logits = info_nce(q, k, self.queue.keys.clone(), self.cfg.temperature)
        self.queue.enqueue(gather(k))
        acc = (logits.argmax(1) == 0).float().mean()
        return {"loss": loss, "acc1": acc.detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.encoder_q)
