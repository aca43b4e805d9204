"""One COCO-format detection dataset for synthetic and real data.

The annotation json is parsed with the standard library and validated eagerly (cheap
checks over every annotation); images are opened lazily in ``__getitem__``. Any bad
input raises :class:`~benchmark.data.errors.DataError` naming the file and the field.

Boxes are converted to ``xyxy`` absolute pixels and clipped to the image; boxes that are
empty after clipping are dropped. Both are counted (``.num_clipped``, ``.num_dropped``)
and reported once as a logged warning. Crowd annotations stay in the target with
``iscrowd=1``: the trainer filters them out of losses, the evaluator needs them.

Pixel orientation is taken as stored in the file (EXIF orientation is ignored), which
is how COCO annotations are defined.
"""
from __future__ import annotations

import json
import logging
import math
from numbers import Real
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from benchmark.data.errors import CorruptImage, DataError, note_unreadable
from benchmark.data.io import read_rgb

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")


# ------------------------------------------------------------------ json parsing
def load_coco_json(ann_file: str | Path) -> dict:
    """Read a COCO json; missing file, malformed JSON or missing keys raise DataError."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(ann_file, "ann_file", "annotation file not found")
    try:
        with open(ann_file, "rb") as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(ann_file, "<json>", f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(ann_file, "<json>", f"not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise DataError(ann_file, "<root>", f"expected a JSON object, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise DataError(ann_file, key, "missing top-level key (COCO needs images, annotations, categories)")
        if not isinstance(data[key], list):
            raise DataError(ann_file, key, f"expected a list, got {type(data[key]).__name__}")
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_images(data: dict, ann_file: Path) -> dict[int, dict]:
    """image id -> image entry (validated: id, file_name, width, height)."""
    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise DataError(ann_file, where, "expected an object")
        if not _is_int(img.get("id")):
            raise DataError(ann_file, f"{where}.id", f"expected an integer, got {img.get('id')!r}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(ann_file, f"{where}.file_name", f"expected a file name, got {img.get('file_name')!r}")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise DataError(ann_file, f"{where}.{key}", f"expected a positive integer, got {img.get(key)!r}")
        if img["id"] in images:
            raise DataError(ann_file, f"{where}.id", f"duplicate image id {img['id']}")
        images[img["id"]] = {**img, "_index": i}
    return images


# ---------------------------------------------------------------------- images
def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3,H,W] in [0,1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


# -------------------------------------------------------------------- dataset
class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection/instance-segmentation dataset.

    ``__getitem__`` returns ``(image, target)``: image float32 [3,H,W] in [0,1] RGB;
    target with ``boxes`` float32 [N,4] xyxy, ``labels`` int64 [N] in 1..C, ``masks``
    uint8 [N,H,W] (when ``with_masks``), ``iscrowd`` int64 [N], ``area`` float32 [N],
    ``image_id`` int64 scalar.
    """

    def __init__(
        self,
        image_root: str | Path,
        ann_file: str | Path,
        *,
        with_masks: bool = True,
        transforms: Callable | None = None,
        remove_images_without_annotations: bool = False,
        skip_unreadable: bool = True,
    ):
        self.image_root = Path(image_root)
        self.ann_file = Path(ann_file)
        self.with_masks = with_masks
        self.transforms = transforms
        # an unreadable image is replaced by the next readable one (training; evaluation turns
        # this off and leaves the image out), logged and recorded (``errors.note_unreadable``)
        self.skip_unreadable = skip_unreadable
        self._unreadable: set[str] = set()
        self.coco = load_coco_json(self.ann_file)
        self.images = parse_images(self.coco, self.ann_file)
        self._parse_categories()
        self._parse_annotations()
        ids = sorted(self.images)
        if remove_images_without_annotations:
            ids = [i for i in ids if any(not a["iscrowd"] for a in self._anns[i])]
        self.ids: list[int] = ids

    # ---- validation -------------------------------------------------------
    def _parse_categories(self) -> None:
        cats = {}
        for i, c in enumerate(self.coco["categories"]):
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DataError(self.ann_file, f"categories[{i}].id", "expected an object with an integer id")
            if c["id"] in cats:
                raise DataError(self.ann_file, f"categories[{i}].id", f"duplicate category id {c['id']}")
            cats[c["id"]] = str(c.get("name", c["id"]))
        if not cats:
            raise DataError(self.ann_file, "categories", "no categories")
        order = sorted(cats)
        self.cat_id_to_contiguous: dict[int, int] = {cid: k + 1 for k, cid in enumerate(order)}
        self.contiguous_to_cat_id: dict[int, int] = {k: cid for cid, k in self.cat_id_to_contiguous.items()}
        self.class_names: list[str] = [cats[cid] for cid in order]
        # the label space a detector trained on this file learns: entry k is label k + 1 (0 is
        # the background), ``{"id", "name"}``; fine-tuning records it, evaluation maps by name
        self.categories: list[dict] = [{"id": cid, "name": cats[cid]} for cid in order]
        self.num_classes = len(order)

    def _check_segmentation(self, seg: Any, where: str, img: dict) -> None:
        if isinstance(seg, list):
            for j, poly in enumerate(seg):
                if not isinstance(poly, list) or not all(_is_number(v) for v in poly) or len(poly) % 2:
                    raise DataError(self.ann_file, f"{where}.segmentation[{j}]",
                                    "expected a polygon: a flat list of x, y numbers")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
                raise DataError(self.ann_file, f"{where}.segmentation.size", f"expected [height, width], got {size!r}")
            if size != [img["height"], img["width"]]:
                raise DataError(self.ann_file, f"{where}.segmentation.size",
                                f"RLE size {size} differs from image {img['id']} size "
                                f"[{img['height']}, {img['width']}]")
            if not isinstance(counts, (str, list)):
                raise DataError(self.ann_file, f"{where}.segmentation.counts",
                                "expected an RLE string or a list of run lengths")
        else:
            raise DataError(self.ann_file, f"{where}.segmentation",
                            f"expected a polygon list or an RLE object, got {type(seg).__name__}")

    def _parse_annotations(self) -> None:
        self._anns: dict[int, list[dict]] = {i: [] for i in self.images}
        clipped = dropped = 0
        for i, a in enumerate(self.coco["annotations"]):
            where = f"annotations[{i}]"
            if not isinstance(a, dict):
                raise DataError(self.ann_file, where, "expected an object")
            ann_id = f" (annotation id {a['id']!r})" if "id" in a else ""
            for key in ("image_id", "category_id", "bbox"):
                if key not in a:
                    raise DataError(self.ann_file, f"{where}.{key}", f"missing{ann_id}")
            if not _is_int(a["image_id"]) or a["image_id"] not in self.images:
                raise DataError(self.ann_file, f"{where}.image_id",
                                f"image id {a['image_id']!r} is not in 'images'{ann_id}")
            if not _is_int(a["category_id"]) or a["category_id"] not in self.cat_id_to_contiguous:
                raise DataError(self.ann_file, f"{where}.category_id",
                                f"unknown category id {a['category_id']!r} (not in 'categories'){ann_id}")
            bbox = a["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise DataError(self.ann_file, f"{where}.bbox",
                                f"expected 4 numbers [x, y, w, h], got {bbox!r}{ann_id}")
            img = self.images[a["image_id"]]
            if self.with_masks and "segmentation" in a and a["segmentation"] not in (None, []):
                self._check_segmentation(a["segmentation"], where, img)
            x, y, w, h = (float(v) for v in bbox)
            x0, y0, x1, y1 = x, y, x + w, y + h
            W, H = img["width"], img["height"]
            cx0, cy0 = min(max(x0, 0.0), W), min(max(y0, 0.0), H)
            cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
            if cx1 <= cx0 or cy1 <= cy0:
                dropped += 1
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                clipped += 1
            iscrowd = a.get("iscrowd", 0)
            area = a.get("area")
            self._anns[a["image_id"]].append({
                "box": (cx0, cy0, cx1, cy1),
                "label": self.cat_id_to_contiguous[a["category_id"]],
                "iscrowd": int(bool(iscrowd)),
                "area": float(area) if _is_number(area) else (cx1 - cx0) * (cy1 - cy0),
                "segmentation": a.get("segmentation"),
            })
        self.num_clipped, self.num_dropped = clipped, dropped
        if not any(not a["iscrowd"] for anns in self._anns.values() for a in anns):
            n = len(self.coco["annotations"])
            why = (f"all {n} annotations are crowd regions or empty boxes" if n else "the annotations list is empty")
            raise DataError(self.ann_file, "annotations",
                            f"no usable annotation ({why}): training would learn nothing and every "
                            f"metric would be NaN")
        if clipped or dropped:
            log.warning("%s: %d boxes extending outside their image were clipped; %d boxes with zero or "
                        "negative width/height (after clipping) were dropped", self.ann_file, clipped, dropped)

    # ---- loading ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.images[image_id]["file_name"]

    def load_image(self, image_id: int) -> Image.Image:
        info = self.images[image_id]
        where = f"images[{info['_index']}]"
        path = self.image_path(image_id)
        if not path.is_file():
            raise DataError(path, f"{where}.file_name",
                            f"image file not found (file_name {info['file_name']!r} in {self.ann_file})")
        img = read_rgb(path)
        for key, actual in (("width", img.width), ("height", img.height)):
            if info[key] != actual:
                raise DataError(path, f"{where}.{key}",
                                f"{self.ann_file} says {key} {info[key]}, the image file has {actual}")
        return img

    def _decode_mask(self, seg: Any, box: tuple, h: int, w: int) -> np.ndarray:
        if isinstance(seg, list) and seg:
            polys = [p for p in seg if len(p) >= 6]  # fewer than 3 points draws nothing
            if polys:
                return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
        elif isinstance(seg, dict):
            if isinstance(seg["counts"], list):  # uncompressed RLE (crowd regions)
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
            return mask_utils.decode(rle)
        # no usable segmentation: fall back to the box
        m = np.zeros((h, w), dtype=np.uint8)
        x0, y0, x1, y1 = box
        m[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = 1
        return m

    def load_target(self, image_id: int) -> dict[str, torch.Tensor]:
        anns = self._anns[image_id]
        info = self.images[image_id]
        h, w = info["height"], info["width"]
        target = {
            "boxes": torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }
        if self.with_masks:
            if anns:
                try:
                    masks = np.stack([self._decode_mask(a["segmentation"], a["box"], h, w) for a in anns])
                except (ValueError, TypeError, UnicodeError) as e:
                    raise DataError(self.ann_file, f"images[{info['_index']}] annotations.segmentation",
                                    f"cannot decode a mask of image {image_id}: {e}") from None
                target["masks"] = torch.from_numpy(masks.astype(np.uint8, copy=False))
            else:
                target["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)
        return target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[i]
        if self.skip_unreadable:
            for step in range(len(self.ids)):
                image_id = self.ids[(i + step) % len(self.ids)]
                try:
                    img = self.load_image(image_id)
                    break
                except CorruptImage as e:
                    note_unreadable(e, len(self.ids), self._unreadable, log)
            else:
                raise DataError(self.image_root, "images", f"all {len(self.ids)} images of {self.ann_file} "
                                                           f"are unreadable")
        else:
            img = self.load_image(image_id)
        image = pil_to_tensor(img)
        target = self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple]) -> tuple[list, list]:
    """Detection collate: ``[(img, tgt), ...] -> ([img, ...], [tgt, ...])``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
