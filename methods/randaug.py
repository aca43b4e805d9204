"""Soft Teacher's photometric RandAugment "one of" (Xu et al., ICCV 2021), as AlignDet's
views use it (official configs/_base_/datasets/coco_soft-teacher.py: ``OneOf`` over Identity,
AutoContrast, RandEqualize, RandSolarize, RandColor, RandContrast, RandBrightness,
RandSharpness, RandPosterize).

Magnitudes as in the official ``AlignDet/datasets/pipelines/rand_aug.py`` (from
google-research/ssl_detection): a level m drawn uniformly from {1, ..., 9} (``randint(1, 10)``)
on a scale of 10; solarize threshold ``min(int(m * 256 / 10), 255)``; enhance factor
``m * 1.8 / 10 + 0.1``; posterize to ``4 - int(m * 4 / 10)`` bits. Photometric only: boxes
do not move.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10


def _enhance(op):
    return lambda img, m: op(img).enhance(m * 1.8 / MAX_LEVEL + 0.1)


SOFT_TEACHER_OPS = {
    "identity": lambda img, m: img,
    "autocontrast": lambda img, m: ImageOps.autocontrast(img),
    "equalize": lambda img, m: ImageOps.equalize(img),
    "solarize": lambda img, m: ImageOps.solarize(img, min(int(m * 256 / MAX_LEVEL), 255)),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "posterize": lambda img, m: ImageOps.posterize(img, 4 - int(m * 4 / MAX_LEVEL)),
}


def one_of(img: Image.Image, rng: np.random.Generator,
           ops: tuple[str, ...] = tuple(SOFT_TEACHER_OPS)) -> tuple[Image.Image, str]:
    """Apply one op of ``ops``, drawn uniformly, at a random level; returns (image, op name)."""
    name = ops[int(rng.integers(len(ops)))]
    level = int(rng.integers(1, MAX_LEVEL))
    return SOFT_TEACHER_OPS[name](img, level), name
