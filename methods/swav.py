"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS; arXiv:2006.09882), the SoCo Table 1 row of 400 epochs.

Pseudo-code (Appendix A.1), recognisable in ``forward``:
    z = normalize(h(f(x)))  for every crop (the backbone once per resolution)
    scores = z C            (C: the L2-normalised prototypes)
    q_c = sinkhorn(scores_c [+ queue_c C])    for the assigned crops c (no gradient)
    loss = mean_c mean_{v != c} -sum_k q_c log softmax(scores_v / t)
    normalize(C) after every step; C frozen for the first iterations

Defaults: the official facebookresearch/swav ``main_swav.py`` with
``scripts/swav_400ep_pretrain.sh`` (the model zoo's 400-epoch, B 4096, 2x224 + 6x96 model,
74.6% top-1). Choices and official-vs-paper decisions: docs/methods/swav.md
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.augment import Photometric, as_image, decode_for, render_view
from methods.backbones import backbone_state, build_resnet
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.config import ConfigError
from methods.dist import gather, rank_and_world
from methods.geometry import multi_crop_views
from methods.heads import MLPHead
from methods.losses import sinkhorn, swapped_prediction
from methods.registry import register_method

# official src/multicropdataset.py get_color_distortion(s=1) + RandomGaussianBlur: jitter
# (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, blur sigma U(0.1, 2.0) p 0.5, on every crop
SWAV_AUG = Photometric(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                       blur_sigma=(0.1, 2.0), solarize_p=0.0)


@register_method("swav")
class SwAV(PretrainMethod):
    # scripts/swav_400ep_pretrain.sh: LARS (apex LARC, trust 0.001, clip False) over SGD
    # momentum 0.9, lr 4.8 at B 4096 (64 GPUs x 64), wd 1e-6, 10 warm-up epochs from 0.3,
    # cosine to final_lr 0.0048 (absolute, so a scale that changes the batch sets its own)
    recipe = PretrainRecipe(optimizer="lars", base_lr=4.8, lr_batch=4096, batch_size=4096,
                            weight_decay=1e-6, momentum=0.9, schedule="cosine", warmup_epochs=10,
                            epochs=400, warmup_start_factor=0.3 / 4.8, min_lr=0.0048, lars_eps=1e-8)
    # tiny: B 4096 / 128 = 32 (the tiny batch divisor); 128-px images: 2x64 + 6x32 crops; at
    # 32 images a step the Sinkhorn needs the queue the official uses below B 4096 (README:
    # "especially useful when working with small batches"): 15 batches, as the bs-256 script's
    # 3840 = 15 x 256, filled from epoch 15 (step 4 of 100) by step 19; 300 prototypes keep
    # K / (B + queue) near the paper's 3000 / 4096. final_lr = lr / 1000 as in every script.
    scales = {"tiny": {"method": {"backbone": "resnet18", "crop_sizes": [64, 32], "num_prototypes": 300,
                                  "queue_length": 480},
                       "recipe": {"batch_size": 32, "min_lr": 4.8e-3 * 32 / 4096}},
              # one GPU: the official small-batch recipe (scripts/swav_400ep_bs256_pretrain.sh:
              # lr 0.6 at 256, final 0.0006, no warm-up, queue 3840 from epoch 15) at B 128
              "small": {"method": {"backbone": "resnet50", "crop_sizes": [160, 96], "queue_length": 3840},
                        "recipe": {"batch_size": 128, "base_lr": 0.6, "lr_batch": 256, "warmup_epochs": 0,
                                   "min_lr": 6e-4 * 128 / 256}}}
    loaders = ("cpu", "cpu_draft", "device", "dali")

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        hidden_dim: int = 0               # projection MLP hidden; 0: the backbone's (official hidden_mlp 2048)
        dim: int = 128                    # feat_dim
        num_prototypes: int = 3000        # nmb_prototypes
        temperature: float = 0.1          # t of the swapped prediction
        epsilon: float = 0.05             # Sinkhorn-Knopp regularisation
        sinkhorn_iterations: int = 3
        # multi-crop, one entry per resolution group (nmb_crops, size_crops, min/max_scale_crops)
        num_crops: tuple[int, ...] = (2, 6)
        crop_sizes: tuple[int, ...] = (224, 96)
        min_scale_crops: tuple[float, ...] = (0.14, 0.05)
        max_scale_crops: tuple[float, ...] = (1.0, 0.14)
        crops_for_assign: tuple[int, ...] = (0, 1)   # the crops whose codes are predicted
        # the queue of past embeddings the codes are computed with (0: none, the 400-ep B 4096
        # script); a multiple of the global batch (the official rounds it down to one)
        queue_length: int = 0
        # as fractions of the run (the method sees the training progress): epoch_queue_starts
        # 15 of 400; freeze_prototypes_niters 313 = 1 epoch of 400 (313 steps of B 4096)
        queue_start_progress: float = 15 / 400
        freeze_prototypes_progress: float = 1 / 400

        def ranges(self):
            n = sum(self.num_crops)
            groups = len(self.num_crops)
            scales = list(zip(self.min_scale_crops, self.max_scale_crops))
            return [("num_prototypes", self.num_prototypes > 0, "> 0"),
                    ("epsilon", self.epsilon > 0, "> 0"),
                    ("sinkhorn_iterations", self.sinkhorn_iterations >= 1, ">= 1"),
                    ("num_crops", groups >= 1 and all(c >= 1 for c in self.num_crops) and n >= 2,
                     "one count >= 1 per resolution group, two crops or more in all"),
                    ("crop_sizes", len(self.crop_sizes) == groups and all(s > 0 for s in self.crop_sizes),
                     f"{groups} sizes > 0 (one per entry of num_crops)"),
                    ("min_scale_crops", len(self.min_scale_crops) == groups,
                     f"{groups} values (one per entry of num_crops)"),
                    ("max_scale_crops", len(self.max_scale_crops) == groups
                     and all(0 < lo <= hi <= 1 for lo, hi in scales),
                     f"{groups} values, each in [min_scale_crops, 1] with min_scale_crops > 0"),
                    ("crops_for_assign", len(self.crops_for_assign) >= 1
                     and len(set(self.crops_for_assign)) == len(self.crops_for_assign)
                     and all(0 <= c < n for c in self.crops_for_assign),
                     f"distinct crop indices in [0, {n})"),
                    ("queue_length", self.queue_length >= 0, ">= 0"),
                    ("queue_start_progress", 0 <= self.queue_start_progress <= 1, "in [0, 1]"),
                    ("freeze_prototypes_progress", 0 <= self.freeze_prototypes_progress <= 1, "in [0, 1]")]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.backbone = build_resnet(cfg.backbone)
        feat = self.backbone.feature_dim
        # official src/resnet50.py projection_head: Linear -> BN1d -> ReLU -> Linear (its first
        # Linear's bias, cancelled by the BN that follows, is left out here)
        self.projector = MLPHead(feat, cfg.hidden_dim or feat, cfg.dim, batch_norm=True)
        self.prototypes = nn.Linear(cfg.dim, cfg.num_prototypes, bias=False)
        with torch.no_grad():   # normalised before the first forward (official: before every one)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # the training progress at the start of the next step (momentum_update), a buffer so a
        # resumed run knows it; it switches the freeze and the queue without a host sync
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.register_buffer("queue", torch.zeros(len(cfg.crops_for_assign), cfg.queue_length, cfg.dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))   # entries filled

    # -- views (DataLoader worker) ------------------------------------------------
    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = as_image(record["image"])
        c = self.cfg
        geoms = multi_crop_views(img.width, img.height, rng, c.crop_sizes, c.num_crops,
                                 list(zip(c.min_scale_crops, c.max_scale_crops)))
        decode_for(img, [g for group in geoms for g in group])
        return {f"crops_{i}": [render_view(img, g, SWAV_AUG, rng) for g in group] for i, group in enumerate(geoms)}

    def collate(self, samples: list[dict]) -> dict:
        """One entry per resolution group, crop-major: rows [j B, (j + 1) B) are crop j of
        the group for the B samples (the official order, ``torch.cat(inputs[start:end])``).
        Tensors are stacked; deferred views (loader ``device``) stay a list in that order."""
        out = {}
        for key in samples[0]:
            views = [s[key][j] for j in range(len(samples[0][key])) for s in samples]
            out[key] = torch.stack(views) if torch.is_tensor(views[0]) else views
        return out

    # -- model --------------------------------------------------------------------
    def param_groups(self):
        # apex LARC adapts and decays every parameter (biases and norms included)
        return [{"params": list(self.parameters()), "exclude_1d": False}]

    def check_split(self, batch_per_process: int) -> None:
        super().check_split(batch_per_process)
        batch = batch_per_process * rank_and_world()[1]
        if self.cfg.queue_length % batch:
            raise ConfigError(f"method.queue_length: expected a multiple of the global batch {batch} (the "
                              f"official main_swav.py rounds it down to one), got {self.cfg.queue_length}")

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """After each optimizer step: the prototypes back on the unit sphere (official: at the
        start of each iteration, which is the same sequence), and the progress recorded."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.progress.fill_(progress)

    def embed(self, groups: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings of every crop, crop-major: the backbone once per
        resolution group, the projection head once over all crops (official ``ResNet.forward``)."""
        feats = torch.cat([self.backbone(x) for x in groups])
        return F.normalize(self.projector(feats), dim=1)

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        groups = [batch[f"crops_{i}"] for i in range(len(c.num_crops))]
        B = groups[0].shape[0] // c.num_crops[0]
        z = self.embed(groups)
        # frozen prototypes: no gradient reaches them (official: their grads set to None)
        frozen = self.progress < c.freeze_prototypes_progress
        weight = self.prototypes.weight
        protos = torch.where(frozen, weight.detach(), weight)
        scores = (z @ protos.t()).split(B)                       # one (B, K) per crop
        codes, queue_in_use = self._codes(scores, z.detach(), B)
        loss = swapped_prediction(scores, codes, c.temperature)
        return {"loss": loss, "queue_in_use": queue_in_use}

    @torch.no_grad()
    def _codes(self, scores, z: torch.Tensor, B: int):
        """Sinkhorn codes of the assigned crops over the global batch and, once full, the
        queue (each process takes every W-th of its rows: the processes' shares together are
        the whole queue, as the official per-process queues are); then the crops' global
        embeddings enter the queue when its epoch has come."""
        c = self.cfg
        L = c.queue_length
        full = (self.queue_count >= L).float()
        codes = []
        rank, world = rank_and_world()
        protos = self.prototypes.weight.detach().float()
        for i, crop in enumerate(c.crops_for_assign):
            s = scores[crop].detach().float()
            if L:
                mine = self.queue[i, rank::world]
                s = torch.cat([(mine @ protos.t()).float(), s])
                w = torch.cat([full.expand(len(mine)), torch.ones(B, device=s.device)])
                q = sinkhorn(s, c.epsilon, c.sinkhorn_iterations, w)[-B:]
            else:
                q = sinkhorn(s, c.epsilon, c.sinkhorn_iterations)
            codes.append((crop, q))
        if L:
            active = self.progress >= c.queue_start_progress
            for i, crop in enumerate(c.crops_for_assign):
                new = torch.cat([gather(z[crop * B:(crop + 1) * B].float()), self.queue[i]])[:L]   # newest first
                self.queue[i].copy_(torch.where(active, new, self.queue[i]))
            n = B * world
            self.queue_count.copy_(torch.where(active, (self.queue_count + n).clamp(max=L), self.queue_count))
        return codes, full if L else torch.zeros((), device=z.device)

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.backbone)
