"""Target networks as exponential moving averages of online networks (MoCo, BYOL, SoCo,
InsLoc, PixPro, AlignDet), in the style of lightly's ``update_momentum`` / ``cosine_schedule``."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to serve as its EMA target (no gradient flows into it)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad = False
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float, copied: tuple[str, ...] = ()) -> None:
    """target = m * target + (1 - m) * online, parameter by parameter (MoCo Eq. 2).
    Buffers (BN statistics) are not averaged: each network keeps its own, as in the
    official MoCo and BYOL code. Parameters whose name starts with a prefix in ``copied`` are
    copied instead (AlignDet's DETR query embeddings, official ``SelfSupDetector``)."""
    for (name, po), pt in zip(online.named_parameters(), target.parameters()):
        if copied and name.startswith(copied):
            pt.copy_(po.detach())
        else:
            pt.mul_(m).add_(po.detach(), alpha=1.0 - m)


def cosine_schedule(progress: float, start: float, end: float = 1.0) -> float:
    """BYOL's target momentum (Grill et al. 2020, Sec. 3.2):
    tau = end - (end - start) * (cos(pi * progress) + 1) / 2, progress = k / K in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
