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


# -- RandAugment (Cubuk et al. 2020) as InfoMin's views use it -----------------------------
# HobbitLong/PyContrast ``datasets/RandAugment.py`` (timm's implementation), called from
# ``datasets/util.py`` (aug "D") as ``rand_augment_transform('rand-n2-m10-mstd0.5', ...)``:
# 2 ops drawn uniformly with replacement from these 15, each applied with probability 0.5 at a
# magnitude ~ N(10, 0.5) clipped to [0, 10] (of 10); geometric ops fill with the ImageNet mean
# colour and resample bilinear or bicubic at random. Signs of rotate/shear/translate are random.
RAND_AUGMENT_FILL = tuple(min(255, round(255 * v)) for v in (0.485, 0.456, 0.406))   # (124, 116, 104)
_RESAMPLE = (Image.BILINEAR, Image.BICUBIC)


def _signed(rng: np.random.Generator, v: float) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, matrix, rng: np.random.Generator, fill) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=_RESAMPLE[int(rng.integers(2))], fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# name -> op(img, m, rng, fill), m the magnitude in [0, 10]
RAND_AUGMENT_OPS = {
    "autocontrast": lambda img, m, rng, fill: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng, fill: ImageOps.equalize(img),
    "invert": lambda img, m, rng, fill: ImageOps.invert(img),
    "rotate": lambda img, m, rng, fill: img.rotate(_signed(rng, m / MAX_LEVEL * 30.0),
                                                   resample=_RESAMPLE[int(rng.integers(2))], fillcolor=fill),
    "posterize": lambda img, m, rng, fill: ImageOps.posterize(img, int(m / MAX_LEVEL * 4)),   # "PosterizeTpu"
    "solarize": lambda img, m, rng, fill: ImageOps.solarize(img, int(m / MAX_LEVEL * 256)),
    "solarize_add": lambda img, m, rng, fill: _solarize_add(img, int(m / MAX_LEVEL * 110)),
    "color": lambda img, m, rng, fill: ImageEnhance.Color(img).enhance(m / MAX_LEVEL * 1.8 + 0.1),
    "contrast": lambda img, m, rng, fill: ImageEnhance.Contrast(img).enhance(m / MAX_LEVEL * 1.8 + 0.1),
    "brightness": lambda img, m, rng, fill: ImageEnhance.Brightness(img).enhance(m / MAX_LEVEL * 1.8 + 0.1),
    "sharpness": lambda img, m, rng, fill: ImageEnhance.Sharpness(img).enhance(m / MAX_LEVEL * 1.8 + 0.1),
    "shear_x": lambda img, m, rng, fill: _affine(img, (1, _signed(rng, m / MAX_LEVEL * 0.3), 0, 0, 1, 0), rng, fill),
    "shear_y": lambda img, m, rng, fill: _affine(img, (1, 0, 0, _signed(rng, m / MAX_LEVEL * 0.3), 1, 0), rng, fill),
    "translate_x": lambda img, m, rng, fill: _affine(
        img, (1, 0, _signed(rng, m / MAX_LEVEL * 0.45) * img.size[0], 0, 1, 0), rng, fill),   # "TranslateXRel"
    "translate_y": lambda img, m, rng, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(rng, m / MAX_LEVEL * 0.45) * img.size[1]), rng, fill),
}


def rand_augment(img: Image.Image, rng: np.random.Generator, layers: int = 2, magnitude: float = 10.0,
                 magnitude_std: float = 0.5, prob: float = 0.5,
                 fill: tuple[int, int, int] = RAND_AUGMENT_FILL) -> tuple[Image.Image, list[str]]:
    """``layers`` ops of ``RAND_AUGMENT_OPS`` drawn uniformly with replacement, each applied
    with probability ``prob`` at a magnitude ~ N(``magnitude``, ``magnitude_std``) clipped to
    [0, 10]. Returns (image, names of the ops applied)."""
    names = list(RAND_AUGMENT_OPS)
    applied = []
    for i in rng.integers(len(names), size=layers):
        if rng.random() > prob:
            continue
        m = magnitude + magnitude_std * rng.standard_normal() if magnitude_std > 0 else magnitude
        m = min(float(MAX_LEVEL), max(0.0, float(m)))
        img = RAND_AUGMENT_OPS[names[i]](img, m, rng, fill)
        applied.append(names[i])
    return img, applied
