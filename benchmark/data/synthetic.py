"""Synthetic multi-object scenes for the ``tiny`` scale.

Each image is a textured background (low-frequency noise, gradients, stripes, checker
boards, flat colour) with 1-6 coloured shapes pasted on it at random scale, position,
rotation and colour. Later shapes occlude earlier ones; every instance mask holds only
the pixels that stay visible, and an instance whose visible area falls below a small
threshold is dropped from the annotations.

Generation is fully deterministic: image ``index`` of split ``split`` is drawn from a
``numpy.random.Generator`` seeded by ``(seed, crc32(split), index)``, so splits are
independent and any image can be regenerated on its own (parallel or resumed runs give
the same bytes). The output is a COCO-format dataset::

    <root>/<split>/images/000000.png ...
    <root>/<split>/annotations.json

``ensure_synthetic_voc`` also writes the train and val splits in PASCAL VOC layout
(``<root>/voc/VOC2007/{JPEGImages, Annotations, ImageSets/Main/{trainval,test}.txt}``), so the
VOC loader and evaluator run on the tiny scale; the COCO output and its cache key are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from benchmark.common.fs import file_lock
from benchmark.data.voc_xml import write_voc_xml

# Bump when the drawing code changes: it is part of the cache key.
GENERATOR_VERSION = 1

SYNTHETIC_CLASSES: list[str] = [
    "circle",
    "square",
    "triangle",
    "ellipse",
    "star",
    "cross",
    "ring",
    "hexagon",
]

SPLITS = ("pretrain", "train", "val")

# An instance whose visible area is below max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * H * W)
# is dropped (it is almost fully occluded or cut off by the border).
MIN_VISIBLE_PIXELS = 12
MIN_VISIBLE_FRACTION = 0.0015

# Object size (longest side before rotation) as a fraction of the image side: drawn
# log-uniformly so small, medium and large objects all occur.
MIN_SCALE = 0.08
MAX_SCALE = 0.6
MIN_OBJECT_PIXELS = 8


# --------------------------------------------------------------------------- rng
def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split``: independent per image."""
    return np.random.default_rng([int(seed), _split_code(split), int(index)])


# --------------------------------------------------------------------- textures
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random float32 HxWx3 texture with values in [0, 255]."""
    kind = rng.integers(0, 5)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == 0:  # flat colour
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, math.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:  # linear gradient between two colours
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
    elif kind == 2:  # smooth stripes
        period = rng.uniform(4, max(6.0, w / 3))
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
    elif kind == 3:  # checker board (rotated)
        cell = rng.uniform(3, max(4.0, w / 4))
        proj2 = -xx * math.sin(angle) + yy * math.cos(angle)
        t = ((np.floor(proj / cell) + np.floor(proj2 / cell)) % 2).astype(np.float32)
    else:  # low-frequency colour noise: a small random grid upsampled bilinearly
        g = int(rng.integers(3, 9))
        small = rng.integers(0, 256, size=(g, g, 3), dtype=np.uint8)
        up = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
        return np.asarray(up, dtype=np.float32)
    t = t[..., None]
    return c0 * (1.0 - t) + c1 * t


# ----------------------------------------------------------------------- shapes
def _regular_polygon(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _shape_polygons(name: str, size: float, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons (centred at the origin, unrotated) with fill values 1 (add) / 0 (cut)."""
    r = size / 2.0
    if name == "circle":
        return [(_regular_polygon(40, r), 1)]
    if name == "square":
        return [(_regular_polygon(4, 0.8 * r * math.sqrt(2), math.pi / 4), 1)]
    if name == "triangle":
        return [(_regular_polygon(3, r, -math.pi / 2), 1)]
    if name == "ellipse":
        poly = _regular_polygon(40, 1.0)
        aspect = rng.uniform(0.35, 0.7)
        return [(poly * np.array([r, r * aspect]), 1)]
    if name == "star":
        outer = _regular_polygon(5, r, -math.pi / 2)
        inner = _regular_polygon(5, r * rng.uniform(0.38, 0.5), -math.pi / 2 + math.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        return [(pts, 1)]
    if name == "cross":
        t = r * rng.uniform(0.25, 0.4)  # half thickness of the arms
        pts = np.array(
            [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
             (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        )
        return [(pts, 1)]
    if name == "ring":
        return [(_regular_polygon(40, r), 1), (_regular_polygon(40, r * rng.uniform(0.45, 0.65)), 0)]
    if name == "hexagon":
        return [(_regular_polygon(6, r), 1)]
    raise ValueError(f"unknown shape {name!r}")


def _draw_object(rng: np.random.Generator, h: int, w: int, min_scale: float = MIN_SCALE,
                 max_scale: float = MAX_SCALE) -> tuple[int, np.ndarray]:
    """Draw one object's full (unoccluded) mask: returns (class index, bool HxW)."""
    cls = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
    side = min(h, w)
    lo = max(MIN_OBJECT_PIXELS, min_scale * side)
    hi = max(lo, max_scale * side)
    size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    # centre anywhere in the image: objects may be cut by the border
    cx = rng.uniform(0, w)
    cy = rng.uniform(0, h)
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in _shape_polygons(SYNTHETIC_CLASSES[cls], size, rng):
        pts = poly @ rot.T + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return cls, np.asarray(canvas, dtype=bool)


def render_image(
    rng: np.random.Generator, image_size: int, min_objects: int = 1, max_objects: int = 6,
    *, full_masks: list | None = None, min_scale: float = MIN_SCALE, max_scale: float = MAX_SCALE,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one scene: (uint8 HxWx3 RGB image, [(class index, visible bool mask), ...]).

    Instances are returned in drawing order (back to front). If ``full_masks`` is a list,
    the unoccluded mask of every drawn object (kept or dropped) is appended to it.
    ``min_scale``/``max_scale``: object size range as a fraction of the image side.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 < min_scale <= max_scale <= 1.5:
        raise ValueError(f"data.min_scale/max_scale: need 0 < min_scale <= max_scale <= 1.5, "
                         f"got {min_scale}, {max_scale}")
    h = w = int(image_size)
    image = np.array(_texture(rng, h, w), dtype=np.float32)  # writable copy
    ids = np.zeros((h, w), dtype=np.int16)  # 0 = background, k = k-th drawn object
    classes: list[int] = []
    min_area = max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * h * w)
    bg_mean = image.reshape(-1, 3).mean(0)

    def add_object() -> None:
        cls, full = _draw_object(rng, h, w, min_scale, max_scale)
        # object colour: far enough from the mean background colour to be visible
        for _ in range(8):
            colour = _random_colour(rng)
            if np.abs(colour - bg_mean).sum() > 90:
                break
        if rng.random() < 0.3:  # two-tone textured object
            tex = _texture(rng, h, w)
            fill = 0.6 * colour + 0.4 * tex[full]
        else:
            fill = colour
        image[full] = fill
        classes.append(cls)
        if full_masks is not None:
            full_masks.append(full)
        ids[full] = len(classes)

    def visible() -> list[tuple[int, np.ndarray]]:
        counts = np.bincount(ids.ravel(), minlength=len(classes) + 1)
        return [(cls, ids == k) for k, cls in enumerate(classes, start=1) if counts[k] >= min_area]

    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(n):
        add_object()
    instances = visible()
    # an object may vanish under later ones or off the border: top up to min_objects
    for _ in range(10 * max_objects):
        if len(instances) >= min_objects:
            break
        add_object()
        instances = visible()
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 8.0))
    np.clip(image, 0, 255, out=image)  # sensor noise, then quantise
    return np.rint(image).astype(np.uint8), instances


# ---------------------------------------------------------------------- writing
def _annotation(mask: np.ndarray) -> tuple[dict, list[float], int]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = int(mask_utils.area(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, bbox, area


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTHETIC_CLASSES)]


def generate_split(
    out_dir: Path,
    num_images: int,
    image_size: int,
    seed: int,
    split: str,
    min_objects: int = 1,
    max_objects: int = 6,
    *,
    progress=None,
    min_scale: float = MIN_SCALE,
    max_scale: float = MAX_SCALE,
) -> Path:
    """Write ``out_dir/<split>/{images/*.png, annotations.json}``; return the json path.

    The split is written to a temporary directory beside it and moved into place with
    ``os.replace``, so an interrupted run leaves no half-written split. An existing split
    directory is replaced. ``progress`` is an optional callable called with 1 per image.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / split
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-tmp-", dir=out_dir))
    try:
        (tmp / "images").mkdir()
        images, annotations = [], []
        for index in range(int(num_images)):
            rng = image_rng(seed, split, index)
            pixels, instances = render_image(rng, image_size, min_objects, max_objects,
                                             min_scale=min_scale, max_scale=max_scale)
            file_name = f"{index:06d}.png"
            Image.fromarray(pixels, "RGB").save(tmp / "images" / file_name, compress_level=1,
                                             compress_type=zlib.Z_HUFFMAN_ONLY)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name,
                           "width": int(image_size), "height": int(image_size)})
            for cls, mask in instances:
                rle, bbox, area = _annotation(mask)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                    "bbox": bbox, "area": area, "iscrowd": 0, "segmentation": rle,
                })
            if progress is not None:
                progress(1)
        data = {
            "info": {"description": "detbench synthetic shapes", "version": GENERATOR_VERSION,
                     "seed": int(seed), "split": split, "image_size": int(image_size),
                     "min_objects": int(min_objects), "max_objects": int(max_objects),
                     "min_scale": float(min_scale), "max_scale": float(max_scale)},
            "images": images,
            "annotations": annotations,
            "categories": _categories(),
        }
        with open(tmp / "annotations.json", "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, final)
        except OSError:  # target exists and is not empty: move it aside, then replace
            trash = Path(tempfile.mkdtemp(prefix=f".{split}-old-", dir=out_dir))
            os.replace(final, trash / split)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "annotations.json"


def dataset_key(**params) -> str:
    """Short stable hash of the generation parameters (and the generator version)."""
    blob = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _split_complete(split_dir: Path, num_images: int) -> bool:
    ann = split_dir / "annotations.json"
    if not ann.is_file():
        return False
    try:
        with open(ann) as f:
            return len(json.load(f)["images"]) == num_images
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_synthetic_dataset(
    cache_dir: Path,
    *,
    image_size: int = 128,
    num_pretrain: int = 2000,
    num_train: int = 200,
    num_val: int = 200,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 6,
    min_scale: float = MIN_SCALE,
    max_scale: float = MAX_SCALE,
) -> dict[str, dict]:
    """Generate (once) and locate the synthetic dataset under ``cache_dir/synthetic-<hash>/``.

    Only missing (or incomplete) splits are generated. Returns
    ``{split: {"image_root": str, "ann_file": str}}`` for pretrain, train and val.
    """
    from tqdm import tqdm

    params = dict(image_size=int(image_size), num_pretrain=int(num_pretrain), num_train=int(num_train),
                  num_val=int(num_val), seed=int(seed), min_objects=int(min_objects),
                  max_objects=int(max_objects))
    # the scale range enters the key only when it differs from the defaults (older keys hold)
    if (float(min_scale), float(max_scale)) != (MIN_SCALE, MAX_SCALE):
        params.update(min_scale=float(min_scale), max_scale=float(max_scale))
    root = Path(cache_dir) / f"synthetic-{dataset_key(**params)}"
    counts = {"pretrain": num_pretrain, "train": num_train, "val": num_val}
    out: dict[str, dict] = {split: {"image_root": str(root / split / "images"),
                                    "ann_file": str(root / split / "annotations.json")} for split in counts}
    if all(_split_complete(root / split, int(n)) for split, n in counts.items()):
        return out   # complete: read without the lock (a read-only shared cache works)
    # runs started at once (the parallel local executor, array jobs) generate the data once:
    # the others wait on this lock, then find every split complete
    with file_lock(root / ".lock"):
        for split, n in counts.items():
            split_dir = root / split
            if not _split_complete(split_dir, int(n)):
                with tqdm(total=int(n), desc=f"synthetic {split}", unit="img", leave=False) as bar:
                    generate_split(root, int(n), image_size, seed, split, min_objects, max_objects,
                                   progress=bar.update, min_scale=float(min_scale), max_scale=float(max_scale))
    return out


# ------------------------------------------------------------------ VOC layout
# A synthetic instance is "difficult" (VOC's flag for objects too small or too occluded to
# recognise, ignored in evaluation) when its visible area is below this fraction of the image:
# 0.004 is a 8x8-pixel object at 128 px.
DIFFICULT_FRACTION = 0.004
VOC_SPLITS = {"train": "trainval", "val": "test"}


def write_voc_layout(splits: dict[str, dict], out_dir: Path) -> Path:
    """Write the COCO-format synthetic ``splits`` (``{"train": {"image_root", "ann_file"},
    "val": ...}``) as a VOC devkit folder ``out_dir/VOC2007`` (train -> trainval, val -> test;
    images as JPEG, quality 95; ids numbered across both splits). Written to a temporary folder
    and moved into place, so an interrupted run leaves nothing half-written. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".voc-tmp-", dir=out_dir.parent))
    try:
        year = tmp / "VOC2007"
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (year / sub).mkdir(parents=True)
        next_id = 0
        for split, image_set in VOC_SPLITS.items():
            with open(splits[split]["ann_file"]) as f:
                coco = json.load(f)
            names = {c["id"]: c["name"] for c in coco["categories"]}
            anns: dict[int, list] = {}
            for a in coco["annotations"]:
                anns.setdefault(a["image_id"], []).append(a)
            ids = []
            for img in coco["images"]:
                key = f"{next_id:06d}"
                next_id += 1
                W, H = img["width"], img["height"]
                with Image.open(Path(splits[split]["image_root"]) / img["file_name"]) as im:
                    im.convert("RGB").save(year / "JPEGImages" / f"{key}.jpg", quality=95)
                objects = []
                for a in anns.get(img["id"], []):
                    x, y, w, h = a["bbox"]  # integer pixel edges (pycocotools toBbox of a mask)
                    objects.append({"name": names[a["category_id"]], "box": (x, y, x + w, y + h),
                                    "difficult": int(a["area"] < DIFFICULT_FRACTION * W * H),
                                    "truncated": int(x <= 0 or y <= 0 or x + w >= W or y + h >= H)})
                write_voc_xml(year / "Annotations" / f"{key}.xml", folder="VOC2007", filename=f"{key}.jpg",
                              width=W, height=H, objects=objects)
                ids.append(key)
            (year / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(k + "\n" for k in ids))
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_synthetic_voc(cache_dir: Path, **params) -> Path:
    """The synthetic dataset of ``ensure_synthetic_dataset(cache_dir, **params)`` in VOC layout:
    ``<synthetic root>/voc`` (written once, beside the COCO splits). Returns the devkit folder."""
    splits = ensure_synthetic_dataset(cache_dir, **params)
    root = Path(splits["train"]["ann_file"]).parent.parent
    out = root / "voc"

    def done() -> bool:
        return all((out / "VOC2007" / "ImageSets" / "Main" / f"{s}.txt").is_file() for s in VOC_SPLITS.values())
    if done():   # complete: read without the lock (a read-only shared cache works)
        return out
    with file_lock(root / ".voc.lock"):
        if not done():
            write_voc_layout(splits, out)
    return out
