"""Unlabeled image sources for pretraining.

:class:`ImageSource` lists images (a folder tree or the images of a COCO json) and
loads one as a record. :class:`SkippingImageDataset` turns a source plus a view function
into a torch Dataset that skips unreadable images (counted, logged once per file) and
gives the view function a ``numpy.random.Generator`` derived from (seed, epoch, index),
so the views do not depend on the number of DataLoader workers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmark.data.coco import load_coco_json, parse_images, read_rgb
from benchmark.data.errors import CorruptImage, DataError

log = logging.getLogger(__name__)

DEFAULT_EXTS = (".jpg", ".jpeg", ".png")


class ImageSource:
    """An indexable list of images: ``record(i)`` loads image ``i`` as uint8 HxWx3 RGB."""

    def __init__(self, paths: Sequence[str | Path], image_ids: Sequence[int] | None = None, *, root: str | Path = ""):
        self.paths = [str(p) for p in paths]
        self.image_ids = list(range(len(self.paths))) if image_ids is None else [int(v) for v in image_ids]
        if len(self.image_ids) != len(self.paths):
            raise ValueError("paths and image_ids differ in length")
        self.root = str(root)

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
        """``{"index", "image_id", "path", "image"}``; unreadable files raise CorruptImage."""
        path = self.paths[i]
        image = np.asarray(read_rgb(path), dtype=np.uint8)
        return {"index": i, "image_id": self.image_ids[i], "path": path, "image": image}


class SkippingImageDataset(torch.utils.data.Dataset):
    """``ds[i] = fn(source.record(i), rng)``, skipping unreadable images.

    ``rng`` is ``numpy.random.default_rng([seed, epoch, i])``: the same for a given
    (seed, epoch, index) in any worker. A corrupt image is logged once per file, counted
    in ``skipped`` (per process: DataLoader workers each keep their own count) and
    replaced by the next readable index.
    """

    def __init__(self, source: ImageSource, fn: Callable[[dict, np.random.Generator], Any], seed: int = 0):
        self.source = source
        self.fn = fn
        self.seed = int(seed)
        self.epoch = 0
        self.skipped = 0
        self.bad_paths: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        n = len(self.source)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        for step in range(n):
            j = (i + step) % n
            try:
                record = self.source.record(j)
            except CorruptImage as e:
                self.skipped += 1
                if e.path not in self.bad_paths:
                    self.bad_paths.add(e.path)
                    log.warning("skipping unreadable image (%d skipped so far): %s", self.skipped, e)
                continue
            return self.fn(record, self.rng(i))
        raise DataError(self.source.root or "<image source>", "images", f"all {n} images are unreadable")
