"""Photometric augmentations with explicit numpy RNG (reproducible in any worker).

MoCo v2 "aug+" (Chen et al. 2020, Sec. 3): colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
grayscale p=0.2, Gaussian blur sigma in [0.1, 2.0] p=0.5. BYOL (Grill et al. 2020, Table 6)
views: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur p=1.0 / 0.1, solarize 0 / 0.2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Photometric:
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.jitter_p:
            img = color_jitter(img, rng, *self.jitter)
        if rng.random() < self.gray_p:
            img = ImageOps.grayscale(img).convert("RGB")
        if rng.random() < self.blur_p:
            # PIL's radius is the Gaussian's sigma (as in MoCo v2's GaussianBlur)
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*self.blur_sigma))))
        if rng.random() < self.solarize_p:
            img = ImageOps.solarize(img, 128)
        return img


MOCO_V2_AUG = Photometric()
BYOL_AUG_1 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)
BYOL_AUG_2 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """torchvision's ColorJitter semantics (factors in [1-s, 1+s], hue in [-h, h]),
    applied in a random order."""
    ops = []
    if brightness:
        f = rng.uniform(max(0, 1 - brightness), 1 + brightness)
        ops.append(lambda x, f=f: TF.adjust_brightness(x, f))
    if contrast:
        f = rng.uniform(max(0, 1 - contrast), 1 + contrast)
        ops.append(lambda x, f=f: TF.adjust_contrast(x, f))
    if saturation:
        f = rng.uniform(max(0, 1 - saturation), 1 + saturation)
        ops.append(lambda x, f=f: TF.adjust_saturation(x, f))
    if hue:
        f = rng.uniform(-hue, hue)
        ops.append(lambda x, f=f: TF.adjust_hue(x, f))
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 image -> float tensor normalised with the ImageNet mean and std."""
    t = TF.to_tensor(img)
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


def cutout(t: torch.Tensor, rng: np.random.Generator, p: float = 0.5,
           area: tuple[float, float] = (0.1, 0.3), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Erase one rectangle of area fraction in ``area`` (value 0 = the mean colour after
    normalisation). SoCo's official script (tools/SoCo_FPN_100ep.sh) uses p=0.5, area
    0.1-0.3; the paper does not mention it."""
    if rng.random() >= p:
        return t
    _, H, W = t.shape
    for _ in range(10):
        a = H * W * rng.uniform(*area)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        h, w = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < h < H and 0 < w < W:
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            t = t.clone()
            t[:, y:y + h, x:x + w] = 0
            return t
    return t
