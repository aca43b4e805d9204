"""Image decoding and unlabeled image sources for pretraining.

:func:`read_rgb` is the one image decoder of the code base (COCO loader, proposal cache,
pretraining). :class:`ImageSource` lists images (a folder tree or the images of a COCO json)
and loads one as a record; how a record carries its pixels depends on the run's
``recipe.loader`` (see ``methods.augment.LOADERS``). The pretraining stage's dataset
(``benchmark.stages.pretrain.PretrainDataset``) skips unreadable images and draws each sample's
views from (seed, epoch, index).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from PIL import Image

from benchmark.data.errors import CorruptImage, DataError
from methods.augment import LOADERS

log = logging.getLogger(__name__)

DEFAULT_EXTS = (".jpg", ".jpeg", ".png")



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


def render_deferred(batch: dict, device: torch.device | str) -> dict:
    """A collated batch with its lists of :class:`~methods.augment.DeferredView` (loader
    ``device``) replaced by their pixels: every source decoded once on ``device``, then each
    view name rendered batched (``methods.augment.render_views``). Other batches pass."""
    from methods.augment import DeferredView, render_views
    keys = [k for k, v in batch.items() if isinstance(v, list) and v and isinstance(v[0], DeferredView)]
    if not keys:
        return batch
    sources = list(dict.fromkeys(v.source for k in keys for v in batch[k]))
    decoded = dict(zip(sources, decode_on_device(sources, device)))
    return {**batch, **{k: render_views(batch[k], decoded) for k in keys}}


class ImageSource:
    """An indexable list of images: ``record(i)`` loads image ``i`` as uint8 HxWx3 RGB."""

    def __init__(self, paths: Sequence[str | Path], image_ids: Sequence[int] | None = None, *, root: str | Path = ""):
        self.paths = [str(p) for p in paths]
        self.image_ids = list(range(len(self.paths))) if image_ids is None else [int(v) for v in image_ids]
        if len(self.image_ids) != len(self.paths):
            raise ValueError("paths and image_ids differ in length")
        self.root = str(root)
        self.loader = "cpu"   # recipe.loader of the run reading it (LOADERS)

    @classmethod
    def from_folder(cls, root: str | Path, exts: Sequence[str] = DEFAULT_EXTS) -> "ImageSource":
        """All files under ``root`` (recursive) whose suffix is in ``exts`` (case-insensitive), sorted."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "root", "image folder not found")
        wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in wanted and p.is_file())
        if not paths:
            raise DataError(root, "root", f"no images with extensions {sorted(wanted)} found (searched recursively)")
        return cls(paths, root=root)

    @classmethod
    def from_coco(cls, image_root: str | Path, ann_file: str | Path) -> "ImageSource":
        """The images listed in a COCO json (sorted by image id); annotations are ignored."""
        from benchmark.data.coco import load_coco_json, parse_images
        image_root, ann_file = Path(image_root), Path(ann_file)
        if not image_root.is_dir():
            raise DataError(image_root, "image_root", "image folder not found")
        images = parse_images(load_coco_json(ann_file), ann_file)
        if not images:
            raise DataError(ann_file, "images", "no images listed")
        ids = sorted(images)
        return cls([image_root / images[i]["file_name"] for i in ids], ids, root=image_root)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(self.paths[i])

    def record(self, i: int) -> dict[str, Any]:
        """``{"index", "image_id", "path", "image"}``; unreadable files raise CorruptImage.
        ``image`` is an HxWx3 uint8 array (loader ``cpu``), a :class:`LazyImage`
        (``cpu_draft``) or an :class:`EncodedImage` (``device``)."""
        path = self.paths[i]
        if self.loader == "cpu":
            image = np.asarray(read_rgb(path), dtype=np.uint8)
        elif self.loader == "cpu_draft":
            image = LazyImage(path)
        elif self.loader == "device":
            image = EncodedImage(path)
        else:
            raise ValueError(f"recipe.loader: unknown {self.loader!r} ({' | '.join(LOADERS)})")
        return {"index": i, "image_id": self.image_ids[i], "path": path, "image": image}
