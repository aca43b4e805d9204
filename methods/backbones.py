"""Backbones in torchvision's ResNet key space (the canonical export space)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

_FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def build_resnet(name: str = "resnet50", zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet (random init, no download) with ``fc`` replaced by Identity, so
    ``forward`` returns the pooled feature. ``state_dict`` keys are torchvision's names."""
    if name not in _FEATURE_DIM:
        raise ValueError(f"method.backbone: unknown {name!r} (known: {', '.join(_FEATURE_DIM)})")
    m = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
    m.fc = nn.Identity()
    m.feature_dim = _FEATURE_DIM[name]
    return m


def resnet_stages(m: nn.Module, x: torch.Tensor, num_stages: int = 4) -> list[torch.Tensor]:
    """C2..C5 feature maps of a torchvision ResNet (the first ``num_stages``: 3 stops at C4,
    the C4 detectors' backbone, whose res5 is the RoI head)."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    out = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4)[:num_stages]:
        x = layer(x)
        out.append(x)
    return out


def c5_size(size: int) -> int:
    """Side of a torchvision ResNet's C5 map for an input side ``size``: five stride-2 layers,
    each rounding up (224 -> 7, 96 -> 3)."""
    for _ in range(5):
        size = -(-size // 2)
    return size


def stage_channels(name: str) -> list[int]:
    base = [64, 128, 256, 512]
    return [c * 4 for c in base] if _FEATURE_DIM[name] == 2048 else base


def backbone_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state in canonical (bare torchvision) names, without ``fc``."""
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if not k.startswith("fc.")}
