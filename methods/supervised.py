"""The Supervised baseline row: multi-label classification pretraining on the synthetic
scenes' labels at ``tiny`` (the stand-in for ImageNet classification); at ``small``/``paper``
no training, the user's local ImageNet weights (nothing is downloaded).

Choices: docs/methods/supervised.md
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from methods.augment import Photometric, to_tensor
from methods.backbones import backbone_state, build_resnet
from methods.config import ConfigError
from methods.base import MethodConfig, PretrainMethod, PretrainRecipe
from methods.geometry import random_view
from methods.registry import register_method
from methods.weights import read_state_dict


@register_method("supervised")
class Supervised(PretrainMethod):
    needs_labels = True
    # the standard ImageNet recipe: SGD lr 0.1 at batch 256, wd 1e-4, cosine
    recipe = PretrainRecipe(optimizer="sgd", base_lr=0.1, lr_batch=256, batch_size=256,
                            weight_decay=1e-4, momentum=0.9, schedule="cosine", warmup_epochs=0)
    # small/paper: the user's own ImageNet-supervised R50 (torchvision key space), e.g.
    # export SUPERVISED_WEIGHTS=/models/resnet50-imagenet.pth — nothing is downloaded
    scales = {"tiny": {"method": {"backbone": "resnet18", "crop_size": 64},
                       "recipe": {"batch_size": 64}},
              "small": {"method": {"weights": "${SUPERVISED_WEIGHTS}"}},
              "paper": {"method": {"weights": "${SUPERVISED_WEIGHTS}"}}}

    @dataclass
    class Config(MethodConfig):
        backbone: str = "resnet50"
        num_classes: int = 0            # 0: from the pretraining set's categories
        crop_size: int = 224
        crop_scale: tuple[float, ...] = (0.08, 1.0)   # the standard ImageNet recipe
        weights: str = ""               # paper scale: local path to ImageNet weights

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.encoder = build_resnet(cfg.backbone)
        self.classifier = nn.Linear(self.encoder.feature_dim, max(1, cfg.num_classes))
        self.aug = Photometric(jitter=(0.4, 0.4, 0.4, 0.0), jitter_p=1.0, gray_p=0.0, blur_p=0.0)

    def views(self, record: dict, rng: np.random.Generator, source=None) -> dict:
        img = Image.fromarray(record["image"])
        g = random_view(img.width, img.height, self.cfg.crop_size, rng, scale=tuple(self.cfg.crop_scale))
        # labels: multi-hot over categories present in the image (crop may hide some: noise
        # accepted, as with ImageNet's single label under random crops)
        return {"image": to_tensor(self.aug(g.apply_image(img), rng)),
                "target": torch.as_tensor(record["labels"], dtype=torch.float32)}

    def given_weights(self) -> dict[str, torch.Tensor] | None:
        """The user's ImageNet weights (torchvision names; a ``state_dict``/``model`` wrapper
        and a ``module.`` prefix are accepted), without the classifier ``fc``."""
        if not self.cfg.weights:
            return None
        try:
            state = read_state_dict(self.cfg.weights)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"method.weights: {e} (a local ImageNet checkpoint; nothing is downloaded)") from None
        state = {k.removeprefix("module."): v for k, v in state.items()}
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    def forward(self, batch: dict) -> dict:
        logits = self.classifier(self.encoder(batch["image"]))
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"])
        acc = ((logits > 0) == (batch["target"] > 0.5)).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return backbone_state(self.encoder)
