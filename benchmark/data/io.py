"""Image decoding: the one decoder of the code base (:func:`read_rgb`) and the two deferred
forms a pretraining record can carry its pixels in (``recipe.loader``, see
``methods.augment.LOADERS``): :class:`LazyImage` (``cpu_draft``) and :class:`EncodedImage`
(``device``, decoded by :func:`decode_on_device`).

A leaf of the data package: it imports nothing of the project but ``benchmark.data.errors``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from benchmark.data.errors import CorruptImage


def read_rgb(path: str | Path, reduce: int = 1) -> Image.Image:
    """Decode an image file as RGB (alpha dropped, palette and grayscale expanded).

    ``reduce`` in (1, 2, 4, 8): a JPEG is decoded at 1/reduce of its size with libjpeg's DCT
    scaling (PIL draft mode); source pixel coordinate x maps to x / reduce exactly
    (``ceil(W / reduce)`` pixels, the last one covering the remainder). Other formats ignore
    it: check ``img.size``. Any failure, a missing file included, raises
    :class:`CorruptImage` naming the file."""
    try:
        with Image.open(path) as im:
            if reduce > 1 and im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // reduce), max(1, im.height // reduce)))
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
            return im.convert("RGB")
    except FileNotFoundError:
        raise CorruptImage(path, "image", "file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImage(path, "image", f"cannot decode image ({type(e).__name__}: {e})") from None


def read_size(path: str | Path) -> tuple[int, int]:
    """``(W, H)`` from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise CorruptImage(path, "image", "file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImage(path, "image", f"cannot read image header ({type(e).__name__}: {e})") from None


class LazyImage:
    """An image whose pixels are decoded on first use, at the smallest DCT-scaled size that
    still serves the views asking for them (``recipe.loader: cpu_draft``).

    ``size`` is the full-resolution ``(W, H)`` from the header: the frame of crops, boxes and
    proposals. ``pixels(reduce)`` returns the image decoded at ``1/r`` (``r <= reduce``) and
    ``r``; a view then reads it through ``ViewGeometry.on_reduced_source(r)``, so its pixels
    and its boxes stay in one frame. A finer request re-decodes (and is kept)."""

    def __init__(self, path: str):
        self.path = path
        self.size = read_size(path)
        self._img: Image.Image | None = None
        self._reduce = 0

    width = property(lambda self: self.size[0])
    height = property(lambda self: self.size[1])

    def pixels(self, reduce: int = 1) -> tuple[Image.Image, int]:
        if self._img is None or self._reduce > reduce:
            img = read_rgb(self.path, reduce)
            W, H = self.size
            r = next((r for r in (8, 4, 2, 1) if r <= reduce and img.size == (-(-W // r), -(-H // r))), None)
            if r is None:
                raise CorruptImage(self.path, "image", f"decoded size {img.size} is no DCT scale 1/1..1/{reduce} "
                                   f"of the header's {self.size}")
            self._img, self._reduce = img, r
        return self._img, self._reduce


class EncodedImage:
    """An image file's bytes plus its header size (``recipe.loader: device``): the training
    process decodes it on the device (:func:`decode_on_device`)."""

    def __init__(self, path: str):
        self.path = path
        self.size = read_size(path)
        with open(path, "rb") as f:
            self.data = f.read()

    width = property(lambda self: self.size[0])
    height = property(lambda self: self.size[1])

    def __eq__(self, other) -> bool:
        return isinstance(other, EncodedImage) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


def decode_on_device(images: Sequence[EncodedImage], device: torch.device | str) -> list[torch.Tensor]:
    """uint8 (3, H, W) tensors on ``device``. JPEGs are decoded by
    ``torchvision.io.decode_jpeg`` (nvJPEG, batched, on CUDA; libjpeg on CPU); other formats,
    and JPEGs the device decoder rejects (CMYK, say), with PIL (:func:`read_rgb`) and copied
    over. A size differing from the header's, or a file PIL cannot decode either, raises
    :class:`CorruptImage` naming the file: with this loader the pixels are first decoded in
    the training process, so a truncated file stops the run instead of being skipped."""
    from torchvision.io import ImageReadMode, decode_jpeg
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(images)
    jpeg = [i for i, im in enumerate(images) if im.data[:3] == b"\xff\xd8\xff"]
    if jpeg:
        data = [torch.frombuffer(bytearray(images[i].data), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:   # one file fails the batch: decode one by one, PIL for the rejected
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, t in zip(jpeg, decoded):
            out[i] = t
    for i, im in enumerate(images):
        if out[i] is None:
            arr = np.array(read_rgb(im.path), dtype=np.uint8)   # writable: torch shares it
            out[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device, non_blocking=True)
        if tuple(out[i].shape[1:]) != (im.size[1], im.size[0]):
            raise CorruptImage(im.path, "image", f"decoded {tuple(out[i].shape[1:])} (H, W), header says {im.size}")
    return out
