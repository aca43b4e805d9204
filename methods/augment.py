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


def cutout_in_boxes(t: torch.Tensor, boxes: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                    area: tuple[float, float] = (0.1, 0.3)) -> torch.Tensor:
    """SoCo's per-box cutout (official ``RandomCutoutInBbox``, tools/SoCo_FPN_100ep.sh: p 0.5,
    area 0.1-0.3; not in the paper): for each xyxy box (pixels of ``t``), with probability
    ``p``, erase (value 0 = the mean colour after normalisation) a square of ``area`` times
    the box's area, centred at a uniform point of the box. The square is clipped to the box
    (the official code clips it to the image only, so it may spill past the box by up to
    half its side): the erased pixels always belong to the object they occlude."""
    out = t
    H, W = t.shape[-2:]
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        if rng.random() >= p:
            continue
        side = np.sqrt(rng.uniform(*area) * max(x2 - x1, 0) * max(y2 - y1, 0))
        cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
        # whole pixels inside the box (and the image)
        lo_x, hi_x = max(int(np.ceil(x1)), 0), min(int(np.floor(x2)), W)
        lo_y, hi_y = max(int(np.ceil(y1)), 0), min(int(np.floor(y2)), H)
        a, b = max(int(round(cx - side / 2)), lo_x), min(int(round(cx + side / 2)), hi_x)
        c, d = max(int(round(cy - side / 2)), lo_y), min(int(round(cy + side / 2)), hi_y)
        if a < b and c < d:
            out = out.clone() if out is t else out
            out[..., c:d, a:b] = 0
    return out
