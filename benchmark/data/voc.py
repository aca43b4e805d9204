"""PASCAL VOC detection data, converted to the COCO-format records the rest of the pipeline reads.

A VOC devkit folder (``$VOC_ROOT``, e.g. ``VOCdevkit/``) holds one folder per year::

    <root>/VOC2007/JPEGImages/<id>.jpg    (or whatever file the XML's <filename> names)
    <root>/VOC2007/Annotations/<id>.xml
    <root>/VOC2007/ImageSets/Main/{trainval,test}.txt

The papers' protocol (MoCo, PixPro, InsLoc; detectron2's ``pascal_voc_R_50_C4_24k.yaml``)
trains on VOC07 trainval + VOC12 trainval and tests on VOC07 test. ``voc_to_coco`` reads the
listed XML files into one COCO json (``file_name`` relative to the devkit root, so one
``image_root`` spans both years); ``ensure_voc_split`` caches it keyed by the content of every
XML and image-set file, so ``CocoDetection`` and everything after it are unchanged.

Each XML is read by :mod:`benchmark.data.voc_xml` (boxes in 0-based continuous pixels, as
detectron2's ``pascal_voc.py``). ``difficult`` objects stay in the records with
``difficult: 1``: the test split marks them ``iscrowd: 1`` (ignored by the VOC and the COCO
evaluators alike, the VOC devkit's rule); the training split keeps them as ordinary objects by
default, as detectron2 does ("we include difficult samples in training"),
``train_difficult=False`` makes them ignore regions there too.

Bad input raises :class:`~benchmark.data.errors.DataError` naming the file and the field:
missing file, malformed XML, a box outside its image, an unknown class name, an empty
annotation set.

``resolve_voc`` also serves the synthetic scenes in VOC layout (``data.synthetic``, the tiny
scale: :func:`benchmark.data.synthetic.ensure_synthetic_voc`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from benchmark.common.fs import atomic_write_json
from benchmark.data.errors import DataError
from benchmark.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_voc
from benchmark.data.voc_xml import parse_voc_xml

# The 20 VOC classes in the order of detectron2's builtin_meta / the devkit (alphabetical).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# Bump when the conversion changes: it is part of the cache key of the converted json.
# 2: an image's file is the XML's <filename> (a .png set reads), <id>.jpg only without one.
CONVERTER_VERSION = 2


@dataclass(frozen=True)
class VocProtocol:
    """The VOC fine-tuning protocol of the papers' tables (MoCo Table 2, PixPro Table 3,
    InsLoc): Faster R-CNN R50-C4 fine-tuned with detectron2's ``pascal_voc_R_50_C4_24k.yaml``
    (facebookresearch/moco ``detection/configs``): 24k iterations at batch 16, lr 0.02 with
    steps at 18k/22k and 100 warm-up iterations, train short side 480-800 (step 32), test 800.
    Published standard deviations are 0.2-0.4 AP, so the paper scale averages 5 seeds."""
    train_sets: tuple[str, ...] = ("VOC2007/trainval", "VOC2012/trainval")
    test_set: str = "VOC2007/test"
    classes: tuple[str, ...] = VOC_CLASSES
    detector: str = "faster_rcnn_c4"
    iterations: int = 24000
    batch_size: int = 16
    lr: float = 0.02
    lr_steps: tuple[int, ...] = (18000, 22000)
    warmup_iterations: int = 100
    min_size_train: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    min_size_test: int = 800
    seeds: int = 5
    # detectron2's PascalVOCDetectionEvaluator uses the VOC07 11-point AP at every IoU
    # threshold when the test set is VOC2007 (meta.year == 2007): the papers' AP/AP50/AP75.
    eleven_point: bool = True
    train_difficult: bool = True   # detectron2 trains on difficult objects


# --------------------------------------------------------------------------- conversion
def _split_name(s: str, where: str) -> tuple[str, str]:
    year, _, image_set = str(s).partition("/")
    if not year or not image_set or "/" in image_set:
        raise DataError("<config>", where, f"expected '<year folder>/<image set>', e.g. 'VOC2007/test', got {s!r}")
    return year, image_set


def read_image_set(root: Path, split: str, where: str = "data") -> list[str]:
    """The image ids listed in ``<root>/<year>/ImageSets/Main/<set>.txt``."""
    year, image_set = _split_name(split, where)
    path = Path(root) / year / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise DataError(path, where, f"image set file not found (split {split!r} under {root})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(path, where, "empty image set: no image ids listed")
    return ids


def voc_to_coco(root: str | Path, splits: tuple[str, ...] | list[str], class_names=VOC_CLASSES, *,
                difficult_as_crowd: bool = True, xml_bytes: dict | None = None) -> dict:
    """COCO json dict of the images listed in ``splits`` (e.g. ``["VOC2007/trainval",
    "VOC2012/trainval"]``). Image ids are 1..N in listing order; ``file_name`` is relative to
    ``root``; each annotation carries ``difficult`` and, when ``difficult_as_crowd``,
    ``iscrowd = difficult``. ``xml_bytes``: ``{xml path: bytes}`` already read (not read again)."""
    root = Path(root)
    images, annotations = [], []
    for si, split in enumerate(splits):
        year, _ = _split_name(split, f"splits[{si}]")
        for image_key in read_image_set(root, split, f"splits[{si}]"):
            xml_path = root / year / "Annotations" / f"{image_key}.xml"
            rec = parse_voc_xml(xml_path, class_names, data=(xml_bytes or {}).get(xml_path))
            image_id = len(images) + 1
            # the XML names its image (the devkit's own files and LabelImg's alike); <id>.jpg without
            images.append({"id": image_id, "file_name": f"{year}/JPEGImages/{rec['filename'] or image_key + '.jpg'}",
                           "width": rec["width"], "height": rec["height"], "voc_id": f"{year}/{image_key}"})
            for o in rec["objects"]:
                x0, y0, x1, y1 = o["box"]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": o["label"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(o["difficult"] and difficult_as_crowd),
                    "difficult": o["difficult"], "truncated": o["truncated"],
                })
    return {"info": {"description": "PASCAL VOC converted by detbench", "splits": list(splits),
                     "converter_version": CONVERTER_VERSION},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}


def _content_hash(root: Path, splits, class_names, difficult_as_crowd: bool) -> tuple[str, dict]:
    """sha256 over the image-set lists and every listed XML (paths relative to root, bytes),
    plus the conversion parameters. Returns (hash, {xml path: bytes}) so the XML is read once."""
    h = hashlib.sha256(json.dumps({"v": CONVERTER_VERSION, "splits": list(splits), "classes": list(class_names),
                                   "crowd": bool(difficult_as_crowd)}).encode())
    files = {}
    for si, split in enumerate(splits):
        year, _ = _split_name(split, f"splits[{si}]")
        for image_key in read_image_set(root, split, f"splits[{si}]"):
            p = root / year / "Annotations" / f"{image_key}.xml"
            if not p.is_file():
                raise DataError(p, "<file>", f"annotation file not found (image {image_key!r} is listed in {split})")
            data = p.read_bytes()
            files[p] = data
            h.update(f"{split}/{image_key}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()[:16], files


def ensure_voc_split(root: str | Path, splits, class_names=VOC_CLASSES, *, cache_dir: str | Path,
                     difficult_as_crowd: bool = True) -> dict:
    """Convert (once per content) and locate a VOC split: ``{"image_root", "ann_file"}`` for
    ``CocoDetection``. The json lands in ``<cache_dir>/voc/<content hash>.json``: an edited XML
    gives a new file, never a stale one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data.root", "VOC devkit folder not found (set VOC_ROOT to the folder holding VOC2007/)")
    digest, files = _content_hash(root, splits, tuple(class_names), difficult_as_crowd)
    out = Path(cache_dir) / "voc" / f"{digest}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, voc_to_coco(root, splits, class_names, difficult_as_crowd=difficult_as_crowd,
                                           xml_bytes=files))
    return {"image_root": str(root), "ann_file": str(out)}


def voc_years(data: dict) -> list[str]:
    """The year folders (``VOC2007``, ...) a ``{"kind": "voc", "root": ...}`` config reads."""
    p = VocProtocol()
    sets = list(data.get("train", p.train_sets)) + [data.get("test", p.test_set)]
    return sorted({str(s).partition("/")[0] for s in sets})


def resolve_voc(data: dict, cache_dir: str | Path) -> dict[str, dict]:
    """A ``{"kind": "voc", ...}`` data config -> ``{"train": {...}, "val": {...}}``.

    Real data: ``root`` (the devkit folder, ``${VOC_ROOT}``), optional ``train`` (list of
    ``<year>/<set>``), ``test``, ``classes``, ``train_difficult``; defaults from VocProtocol.
    Synthetic (tiny scale): ``synthetic: {generator params}`` writes the synthetic scenes in
    VOC layout (train -> VOC2007/trainval, val -> VOC2007/test) with their 8 shape classes."""
    p = VocProtocol()
    known = {"kind", "root", "synthetic", "train", "test", "classes", "train_difficult"}
    for k in data:
        if k not in known:
            raise DataError("<config>", f"data.{k}", f"unknown key (known: {', '.join(sorted(known))})")
    if ("root" in data) == ("synthetic" in data):
        raise DataError("<config>", "data.root", "a voc data config names exactly one of root (a VOC devkit "
                                                "folder) or synthetic (generator parameters)")
    if "synthetic" in data:
        root = ensure_synthetic_voc(cache_dir, **dict(data["synthetic"] or {}))
        classes, train, test = tuple(SYNTHETIC_CLASSES), ["VOC2007/trainval"], "VOC2007/test"
    else:
        root = Path(data["root"])
        classes, train, test = data.get("classes", p.classes), data.get("train", p.train_sets), data.get("test", p.test_set)
        for key, v in (("classes", classes), ("train", train)):
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
                raise DataError("<config>", f"data.{key}", f"expected a non-empty list of names, got {v!r}")
        if not isinstance(test, str):
            raise DataError("<config>", "data.test", f"expected '<year folder>/<image set>', got {test!r}")
        classes, train = tuple(classes), list(train)
    crowd_train = not bool(data.get("train_difficult", p.train_difficult))
    return {"train": ensure_voc_split(root, train, classes, cache_dir=cache_dir, difficult_as_crowd=crowd_train),
            "val": ensure_voc_split(root, [test], classes, cache_dir=cache_dir, difficult_as_crowd=True)}

