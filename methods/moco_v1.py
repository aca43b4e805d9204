"""MoCo (v1) (He, Fan, Wu, Xie, Girshick; CVPR 2020, "Momentum Contrast for Unsupervised
Visual Representation Learning", arXiv:1911.05722; official code facebookresearch/moco
@7397dfe, ``main_moco.py`` without ``--mlp --aug-plus --cos``).

The paper's Algorithm 1, recognisable in ``forward`` and ``momentum_update``:
    f_k.params = f_q.params                       # initialize
    for x in loader:
        x_q, x_k = aug(x), aug(x)                 # two random augmentations (views)
        q = f_q.forward(x_q)                      # queries: N x C, f = ResNet + linear fc (C = 128)
        k = f_k.forward(x_k).detach()             # keys: N x C, Shuffle-BN (Sec. 3.3)
        l_pos = q . k ; l_neg = q . queue         # N x 1, N x K
        loss = CrossEntropy([l_pos, l_neg] / t, 0)  # InfoNCE (Eq. 1), t = 0.07
        SGD update: f_q.params
        f_k.params = m * f_k.params + (1 - m) * f_q.params   # m = 0.999 (Eq. 2)
        enqueue(queue, k); dequeue(queue)

MoCo v2 (``methods/moco.py``) is this model with an MLP head, tau 0.2, blur and a cosine
schedule: the class shares its key encoder, Shuffle-BN, momentum update, optimizer groups and
export. Choices and official-vs-paper decisions: docs/methods/moco_v1.md
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from methods.augment import MOCO_V1_AUG, as_image, render_view
from methods.backbones import build_resnet
from methods.base import MethodConfig, PretrainRecipe
from methods.dist import gather
from methods.ema import momentum_copy
from methods.geometry import random_view
from methods.losses import info_nce
from methods.moco import MoCoV2
from methods.queues import MemoryQueue
from methods.registry import register_method
from methods.shuffle_bn import in_bn_groups


@register_method("moco")
class MoCoV1(MoCoV2):
    # official main_moco.py defaults: SGD lr 0.03 at batch 256 (8 GPUs x 32), momentum 0.9,
    # wd 1e-4, 200 epochs, lr x 0.1 at epochs 120 and 160 (--schedule [120, 160]; the paper,
    # Sec. 4 "Training", the same). The drops are fractions of the run: 0.6 and 0.8 of 200 epochs.
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.03, lr_batch=256, batch_size=256,
                            weight_decay=1e-4, momentum=0.9, schedule="multistep", milestones=(0.6, 0.8),
                            warmup_epochs=0, epochs=200)
    # MoCo v2's overrides, the same model but the head: tiny ResNet-18, a 1024-key queue that
    # 64 keys a step fill in 16 of the 50 steps, 64-px crops; small R50, 16384 keys, 160 px;
    # paper the official 8 GPUs' BatchNorm groups
    scales = {"tiny": {"method": {"backbone": "resnet18", "queue_size": 1024, "crop_size": 64},
                       "recipe": {"batch_size": 64}},
              "small": {"method": {"backbone": "resnet50", "queue_size": 16384, "crop_size": 160},
                        "recipe": {"batch_size": 128}},
              "paper": {"method": {"bn_groups": 8, "shuffle_bn_splits": 8}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        dim: int = 128                   # --moco-dim: the linear fc's output (Sec. 3.3)
        queue_size: int = 65536          # K, --moco-k (Sec. 4.1)
        temperature: float = 0.07        # t, --moco-t (Sec. 3.3, following InstDisc)
        momentum: float = 0.999          # m, --moco-m (Sec. 3.2, 4.1)
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.2, 1.0)   # RandomResizedCrop(224, scale=(0.2, 1.)), main_moco.py ~L340
        # official: RandomGrayscale(0.2) before ColorJitter(0.4, 0.4, 0.4, 0.4); False: the
        # paper's order (Sec. 3.3, "random color jittering, random horizontal flip, and random
        # grayscale conversion")
        gray_before_jitter: bool = True
        # BatchNorm groups of the global batch (methods.shuffle_bn), as MoCo v2's
        bn_groups: int = 1               # query encoder (per-process BN)
        shuffle_bn_splits: int = 2       # key encoder (Shuffle-BN)

        ranges = MoCoV2.Config.ranges

    def __init__(self, cfg: Config):
        super(MoCoV2, self).__init__(cfg)   # PretrainMethod's: MoCo v2's would build its MLP head
        # f_q: the ResNet with its fc replaced by a linear 128-d layer (official builder.py:
        # base_encoder(num_classes=dim)); kept as proj_q so MoCo v2's blocks serve both
        self.encoder_q = build_resnet(cfg.backbone)
        self.proj_q = nn.Linear(self.encoder_q.feature_dim, cfg.dim)
        self.encoder_k = momentum_copy(self.encoder_q)   # f_k.params = f_q.params
        self.proj_k = momentum_copy(self.proj_q)
        self.queue = MemoryQueue(cfg.dim, cfg.queue_size)
        self.aug = replace(MOCO_V1_AUG, gray_first=cfg.gray_before_jitter)

    # -- views (DataLoader worker): x_q, x_k = aug(x), aug(x) -----------------------------
    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        out = {}
        for name in ("im_q", "im_k"):
            g = random_view(img.width, img.height, self.cfg.crop_size, rng, scale=tuple(self.cfg.crop_scale))
            out[name] = render_view(img, g, self.aug, rng)
        return out

    # -- Algorithm 1 ---------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        q = in_bn_groups(self.encoder_q, lambda x: self.proj_q(self.encoder_q(x)), batch["im_q"],
                         groups=self.cfg.bn_groups)                  # q = f_q.forward(x_q)
        with torch.no_grad():
            k = self._keys(batch["im_k"])                            # k = f_k.forward(x_k).detach()
        # l_pos, l_neg against the queue before this batch's keys enter it; CE over logits / t
        loss, logits = info_nce(q, k, self.queue.keys.clone(), self.cfg.temperature)
        self.queue.enqueue(gather(k))                                # enqueue(k); dequeue oldest
        return {"loss": loss, "acc1": (logits.argmax(1) == 0).float().mean().detach()}

    # momentum_update (MoCoV2's): f_k = m f_k + (1 - m) f_q after each SGD step, constant m;
    # the official code runs it before computing the keys of the next batch, the same sequence
