"""Small composable heads with the papers' dimensions as defaults."""
from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear -> [BN] -> ReLU -> Linear. MoCo v2's projector is 2048-2048-128 without BN
    (official code: fc, relu, fc); BYOL/SoCo's projector and predictor are 4096-256 with BN
    (BYOL Sec. 3.3; SoCo Sec. 4.1). ``out_bias=False``: no bias in the last Linear (BYOL's
    official haiku ``MLP``, byol/utils/networks.py)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False,
                 out_bias: bool = True):
        layers = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=out_bias)]
        super().__init__(*layers)


def moco_v2_projector(in_dim: int = 2048, hidden_dim: int | None = None, out_dim: int = 128) -> MLPHead:
    return MLPHead(in_dim, hidden_dim or in_dim, out_dim, batch_norm=False)


def byol_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> MLPHead:
    return MLPHead(in_dim, hidden_dim, out_dim, batch_norm=True)


def byol_predictor(in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> MLPHead:
    return MLPHead(in_dim, hidden_dim, out_dim, batch_norm=True)


class ConvMLPHead(nn.Sequential):
    """``MLPHead`` applied at every pixel of a feature map: 1x1 conv -> [BN] -> ReLU -> 1x1 conv.
    PixPro's projector is 2048-4096-256 with BN, and its l=2 propagation transform 256-256-256
    (official zdaxie/PixPro ``contrast/models/PixPro.py``, ``MLP2d``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True):
        layers = [nn.Conv2d(in_dim, hidden_dim, 1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)]
        super().__init__(*layers)


def pixpro_projector(in_dim: int = 2048, hidden_dim: int = 4096, out_dim: int = 256) -> ConvMLPHead:
    return ConvMLPHead(in_dim, hidden_dim, out_dim, batch_norm=True)
