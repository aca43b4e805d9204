"""Unlabeled image sources for pretraining.

:class:`ImageSource` lists images (a folder tree or the images of a COCO json) and loads one
as a record; how a record carries its pixels depends on the run's ``recipe.loader`` (see
``methods.augment.LOADERS`` and :mod:`benchmark.data.io`). The pretraining stage's dataset
(``benchmark.stages.pretrain.PretrainDataset``) skips unreadable images and draws each sample's
views from (seed, epoch, index).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmark.common.fs import walk_files
from benchmark.data.coco import load_coco_json, parse_images
from benchmark.data.errors import DataError
from benchmark.data.dali_loader import DaliImage, render_batch, require_dali
from benchmark.data.io import EncodedImage, LazyImage, decode_on_device, read_rgb
from methods.augment import LOADERS, DeferredView, render_views

DEFAULT_EXTS = (".jpg", ".jpeg", ".png")


def render_deferred(batch: dict, device: torch.device | str) -> dict:
    """A collated batch with its lists of :class:`~methods.augment.DeferredView` (loaders
    ``device`` and ``dali``) replaced by their pixels: every source decoded once on
    ``device``, then each view name rendered batched (``methods.augment.render_views``; for
    ``dali`` sources, :class:`~benchmark.data.dali_loader.DaliImage`, by the DALI pipeline,
    ``benchmark.data.dali_loader.render_batch``). Other batches pass."""
    keys = [k for k, v in batch.items() if isinstance(v, list) and v and isinstance(v[0], DeferredView)]
    if not keys:
        return batch
    if isinstance(batch[keys[0]][0].source, DaliImage):
        return render_batch(batch, keys, device)
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

    @property
    def loader(self) -> str:
        return self._loader

    @loader.setter
    def loader(self, value: str) -> None:
        if value == "dali":   # in the process that sets it, before any worker starts
            require_dali()
        self._loader = value

    @classmethod
    def from_folder(cls, root: str | Path, exts: Sequence[str] = DEFAULT_EXTS) -> "ImageSource":
        """All files under ``root`` (recursive, symlinked folders included, each real folder
        once) whose suffix is in ``exts`` (case-insensitive), sorted."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "root", "image folder not found")
        wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
        paths = [p for p in walk_files(root) if p.suffix.lower() in wanted]
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
        """``{"index", "image_id", "path", "image"}``; unreadable files raise CorruptImage.
        ``image`` is an HxWx3 uint8 array (loader ``cpu``), a :class:`LazyImage`
        (``cpu_draft``), an :class:`EncodedImage` (``device``) or a :class:`DaliImage`
        (``dali``)."""
        path = self.paths[i]
        if self.loader == "cpu":
            image = np.asarray(read_rgb(path), dtype=np.uint8)
        elif self.loader == "cpu_draft":
            image = LazyImage(path)
        elif self.loader == "device":
            image = EncodedImage(path)
        elif self.loader == "dali":
            image = DaliImage(path)
        else:
            raise ValueError(f"recipe.loader: unknown {self.loader!r} ({' | '.join(LOADERS)})")
        return {"index": i, "image_id": self.image_ids[i], "path": path, "image": image}
