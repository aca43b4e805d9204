"""Object proposals for SoCo (Wei et al., NeurIPS 2021) and AlignDet.

SoCo pretrains on *object-level* views: every image carries a set of selective-search
boxes, filtered once offline, of which K are sampled per iteration (K=4 in the paper).
This module holds the whole pipeline:

* :func:`selective_search` -- OpenCV's selective search on one RGB image, xyxy boxes.
* the filter applied to each image (``methods.proposals.filter_proposals``; the sampler and
  random boxes a method draws from the cached boxes live there too).
* :func:`compute_proposals` / :class:`ProposalCache` -- a parallel, resumable, one-file
  on-disk cache of every image's filtered boxes.

Box convention: ``xyxy`` in pixel-edge coordinates, ``x2 = x + w`` (exclusive), so a box
``[0, 0, W, H]`` covers the whole image and ``w = x2 - x1``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmark.data.chunked import atomic_savez, cached_or_computed, compute_chunks, part_path, remove_parts
from benchmark.data.errors import CorruptImage, DataError
from benchmark.data.io import read_rgb
from methods.proposals import DEFAULT_FILTER, filter_proposals

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERSION",
    "MODES",
    "ProposalCache",
    "compute_proposals",
    "load_rgb",
    "selective_search",
]

# Bump when the on-disk format or the way boxes are computed changes: it is part of the
# cache key, so old caches are never silently reused.
CACHE_VERSION = 1

MODES = ("soco", "fast", "quality", "single")

# SoCo's official proposals (selective_search/generate_imagenet_ss_proposals.py): the Python
# selective search, one strategy (colour + texture + size + fill, equally weighted) over one
# Felzenszwalb segmentation with scale 300, sigma 0.9, min size 100.
SOCO_SEGMENTATION = {"sigma": 0.9, "k": 300.0, "min_size": 100}


# ---------------------------------------------------------------------------------------
# selective search on one image


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into an HxWx3 uint8 RGB array with the project's one decoder
    (:func:`benchmark.data.io.read_rgb`): a missing or undecodable file raises
    :class:`~benchmark.data.errors.CorruptImage` (a ``ValueError``) naming it."""
    return np.asarray(read_rgb(path), dtype=np.uint8)


def require_selective_search() -> None:
    """Fail early, with the fix, when OpenCV lacks ximgproc (plain opencv-python installed
    over or instead of the contrib build: the two share the ``cv2`` module)."""
    try:
        import cv2
    except ImportError as exc:
        raise RuntimeError(f"selective search needs OpenCV: pip install opencv-contrib-python-headless ({exc})") from None
    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError(
            f"selective search: OpenCV {getattr(cv2, '__version__', '?')} at {getattr(cv2, '__file__', '?')} has no "
            "ximgproc module; plain opencv-python shadows the contrib build. Fix: pip uninstall -y opencv-python "
            "opencv-python-headless && pip install --force-reinstall opencv-contrib-python-headless")


def opencv_selective_search(bgr: np.ndarray, mode: str = "fast"):
    """The bare OpenCV call: (x, y, w, h) rectangles of a BGR image, unsorted, unfiltered.

    ``"soco"``: SoCo's setup in OpenCV terms: one graph segmentation (``SOCO_SEGMENTATION``)
    of the RGB image, one strategy that sums colour, texture, size and fill similarity. The
    Python original segments the RGB image as well but takes its colour histograms in HSV;
    OpenCV computes both on the one image it is given, so ours are on RGB (the segmentation,
    which sets the number of regions, is the same). ``"fast"`` / ``"quality"``: OpenCV's
    presets (2 / 4 colour spaces x several k x 2 / 4 strategies); ``"single"``: OpenCV's own
    single strategy (HSV, k 200, sigma 0.8)."""
    import cv2

    seg = cv2.ximgproc.segmentation
    searcher = seg.createSelectiveSearchSegmentation()
    if mode == "soco":
        p = SOCO_SEGMENTATION
        searcher.addImage(np.ascontiguousarray(bgr[:, :, ::-1]))
        searcher.addGraphSegmentation(seg.createGraphSegmentation(p["sigma"], p["k"], p["min_size"]))
        searcher.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
            seg.createSelectiveSearchSegmentationStrategyColor(), seg.createSelectiveSearchSegmentationStrategyTexture(),
            seg.createSelectiveSearchSegmentationStrategySize(), seg.createSelectiveSearchSegmentationStrategyFill()))
        return searcher.process()
    searcher.setBaseImage(bgr)
    if mode == "fast":
        searcher.switchToSelectiveSearchFast()
    elif mode == "quality":
        searcher.switchToSelectiveSearchQuality()
    else:
        searcher.switchToSingleStrategy()
    return searcher.process()


def selective_search(image: np.ndarray, mode: str = "fast", max_side: int | None = None) -> np.ndarray:
    """Run OpenCV's selective search on an HxWx3 uint8 RGB image.

    ``mode``: ``"soco"`` (SoCo's official segmentation parameters, one strategy; SoCo's
    default), ``"fast"``, ``"quality"`` or ``"single"`` (see :func:`opencv_selective_search`). ``max_side``: when set and the image's longer side exceeds it, the image is
    downscaled first (cv2.INTER_AREA) and the boxes are mapped back to the original
    pixel grid. Returns int64 boxes ``(N, 4)`` xyxy, clipped to the image, deduplicated
    and sorted lexicographically (OpenCV's own order is random).
    """
    import cv2

    if mode not in MODES:
        raise ValueError(f"selective_search: mode must be one of {MODES}, got {mode!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"selective_search: expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )
    h, w = image.shape[:2]
    scale = 1.0
    work = image
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(work[:, :, ::-1])  # OpenCV wants BGR

    rects = opencv_selective_search(bgr, mode)
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if scale != 1.0:
        boxes = boxes / scale
    boxes = np.rint(boxes)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    boxes = np.unique(boxes.astype(np.int64), axis=0)
    # OpenCV ranks its regions with a random factor, so its output order changes from call
    # to call; np.unique returns them deduplicated in lexicographic (x1, y1, x2, y2) order,
    # which makes the result (and every cache built from it) deterministic.
    return boxes


# ---------------------------------------------------------------------------------------
# the on-disk cache

_BOX_DTYPE = np.uint16  # coordinates up to 65535 px; 8 bytes per box
# Longest image side selective search runs at (boxes scaled back to the image). 500 px: a
# 2000x1333 photo takes 1.15 s instead of 71 s; what it changes in the boxes kept is measured
# by tools/bench/proposals_bench.py (--compare-max-side).
DEFAULT_MAX_SIDE = 500


def _dataset_hash(paths: Sequence[str]) -> str:
    """sha256 over the ordered (path relative to the images' common folder, file size) pairs
    plus the bytes of the first, middle and last image; a missing file is an error. Relative
    paths keep the cache valid when the dataset is moved or mounted elsewhere (another
    node, another checkout): ImageNet's proposals are hours of work. The sampled bytes keep
    two datasets with the same names and sizes apart."""
    h = hashlib.sha256()
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    for p, a in zip(paths, absolute):
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise DataError(p, "path", "image file does not exist") from None
        h.update(f"{os.path.relpath(a, root)}\0{size}\n".encode("utf-8", "surrogateescape"))
    for i in sorted({0, len(paths) // 2, len(paths) - 1} if paths else ()):
        with open(paths[i], "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def _compute_chunk(job: tuple) -> dict:
    """Worker: proposals for one chunk of images. Top-level so that ``spawn`` can pickle it."""
    chunk_idx, paths, p = job
    mode, max_side, filter_kw = p["mode"], p["max_side"], p["filter"]
    counts = np.zeros(len(paths), dtype=np.int64)
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    skipped: list[int] = []
    errors: list[str] = []
    all_boxes = []
    for j, p in enumerate(paths):
        try:
            img = load_rgb(p)
        except CorruptImage as exc:
            skipped.append(j)
            errors.append(str(exc))
            continue
        h, w = img.shape[:2]
        sizes[j] = (w, h)
        boxes = filter_proposals(selective_search(img, mode=mode, max_side=max_side), w, h, **filter_kw)
        counts[j] = len(boxes)
        all_boxes.append(boxes)
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), dtype=np.int64)
    if boxes.size and boxes.max() > np.iinfo(_BOX_DTYPE).max:
        raise ValueError(f"proposal coordinates exceed {np.iinfo(_BOX_DTYPE).max} px in chunk {chunk_idx}")
    return dict(
        chunk=chunk_idx,
        boxes=boxes.astype(_BOX_DTYPE),
        counts=counts,
        sizes=sizes,
        skipped=np.asarray(skipped, dtype=np.int64),
        errors=errors,
    )


@dataclass
class ProposalCache:
    """Every image's filtered proposals, in one ``.npz`` file.

    Layout: ``boxes`` uint16 ``(N_total, 4)`` xyxy; ``offsets`` int64 ``(n_images + 1,)``
    (image ``i`` owns ``boxes[offsets[i]:offsets[i+1]]``); ``sizes`` int32 ``(n_images, 2)``
    as ``(W, H)`` (0, 0 for a skipped image); ``skipped`` int64 indices of images that
    could not be decoded; ``meta`` a JSON string with ``params``, ``dataset_hash``,
    ``n_images``, ``n_skipped``, ``created``, ``version``.
    """

    path: Path
    params: dict
    meta: dict
    _boxes: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    sizes: np.ndarray = field(repr=False)
    skipped: np.ndarray = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProposalCache":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("boxes", "offsets", "sizes", "skipped")}
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise DataError(path, "npz", f"not a readable proposal cache ({type(exc).__name__}: {exc})") from None
        if meta.get("version") != CACHE_VERSION:
            raise DataError(path, "meta.version", f"expected cache version {CACHE_VERSION}, got {meta.get('version')}")
        off = arrays["offsets"]
        if len(off) != meta["n_images"] + 1 or off[-1] != len(arrays["boxes"]):
            raise DataError(path, "offsets", "inconsistent with n_images / boxes; delete the file to recompute")
        return cls(
            path=path,
            params=meta["params"],
            meta=meta,
            _boxes=arrays["boxes"],
            offsets=off,
            sizes=arrays["sizes"],
            skipped=arrays["skipped"],
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def boxes(self, i: int) -> np.ndarray:
        """Filtered proposals of image ``i``: ``(n, 4)`` int64 xyxy (possibly empty)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        i %= len(self)
        return self._boxes[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)

    def image_size(self, i: int) -> tuple[int, int]:
        """``(W, H)`` of image ``i`` as decoded when the cache was built."""
        w, h = self.sizes[i]
        return int(w), int(h)

    @property
    def n_skipped(self) -> int:
        return int(self.meta["n_skipped"])

    @property
    def dataset_hash(self) -> str:
        return self.meta["dataset_hash"]


def cache_key(paths: Sequence[str], params: dict) -> tuple[str, str]:
    """``(dataset_hash, key)``: the key names the cache file; it covers the dataset and params."""
    dataset_hash = _dataset_hash(paths)
    blob = json.dumps({"dataset": dataset_hash, "params": params}, sort_keys=True)
    return dataset_hash, hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_part(path: Path, n_images: int) -> dict | None:
    """A finished chunk's part file, or None when it is damaged or of another length (recomputed, never trusted)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in ("boxes", "counts", "sizes", "skipped")}
            part["errors"] = json.loads(str(z["errors"]))
        if len(part["counts"]) == n_images:
            return part
    except Exception:
        pass
    log.warning("proposal part %s is unreadable; recomputing it", path)
    return None


def _save_part(path: Path, res: dict) -> None:
    atomic_savez(path, boxes=res["boxes"], counts=res["counts"], sizes=res["sizes"], skipped=res["skipped"],
                 errors=np.array(json.dumps(res["errors"])))


def compute_proposals(
    paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    *,
    mode: str = "fast",
    max_side: int | None = None,
    num_workers: int = 2,
    filter_kwargs: dict | None = None,
    chunk_size: int = 64,
    progress: bool = True,
) -> ProposalCache:
    """Selective search + SoCo filter over ``paths``, cached in one file under ``cache_dir``.

    The cache file is ``cache_dir/proposals-<key>.npz`` where ``key`` hashes the ordered
    paths with their file sizes and every parameter (mode, max_side, filter, version): if
    it exists it is loaded, never recomputed (a damaged file is reported and recomputed).
    ``max_side``: selective search runs on a copy whose longest side is at most this many
    pixels and the boxes are scaled back (None: ``DEFAULT_MAX_SIDE``, 500). Otherwise images are processed in chunks of
    ``chunk_size`` over ``num_workers`` processes (``num_workers <= 1``: in this process);
    each finished chunk is written atomically to ``cache_dir/proposals-<key>.parts/
    part-XXXXX.npz``, so a killed run resumes with only the missing chunks. At the end the
    parts are merged into the single cache file (atomically) and removed.

    Images that cannot be decoded are a counted, logged skip: they get zero proposals
    (sampling then falls back to the whole image) and their count and indices are stored
    in the cache (``meta['n_skipped']``, ``skipped``). A missing file is an error
    (:class:`~benchmark.data.errors.DataError` naming it), raised before any work.
    """
    if mode not in MODES:
        raise ValueError(f"compute_proposals: mode must be one of {MODES}, got {mode!r}")
    if chunk_size < 1:
        raise ValueError(f"compute_proposals: chunk_size must be >= 1, got {chunk_size}")
    filter_kw = {**DEFAULT_FILTER, **(filter_kwargs or {})}
    unknown = set(filter_kw) - set(DEFAULT_FILTER)
    if unknown:
        raise TypeError(f"compute_proposals: unknown filter parameters {sorted(unknown)}")
    paths = [os.fspath(p) for p in paths]
    if max_side is None:
        max_side = DEFAULT_MAX_SIDE
    if int(max_side) < 1:
        raise ValueError(f"compute_proposals: max_side must be >= 1 pixel, got {max_side}")
    params = {"mode": mode, "max_side": max_side, "filter": filter_kw, "version": CACHE_VERSION}
    dataset_hash, key = cache_key(paths, params)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"proposals-{key}.npz"
    # one computation per cache: a second process (two SoCo runs started at once) waits for
    # the first and then loads its file instead of repeating the work
    return cached_or_computed(final, ProposalCache.load, lambda: _compute(
        paths, cache_dir / f"proposals-{key}.parts", key, dataset_hash, params, final,
        num_workers=num_workers, chunk_size=chunk_size, progress=progress))


def _compute(paths, work: Path, key, dataset_hash, params, final, *, num_workers, chunk_size, progress) -> ProposalCache:
    """With the cache's lock held: compute the chunks no part file holds, merge all of them
    into ``final``, remove the parts."""
    n_chunks = -(-len(paths) // chunk_size)
    if any(not part_path(work, c).exists() for c in range(n_chunks)):
        require_selective_search()
    ordered = compute_chunks(paths, work, chunk_size, params, compute_chunk=_compute_chunk,
                             init_worker=_init_worker, load_part=_load_part, save_part=_save_part,
                             num_workers=num_workers, progress=progress, what=f"proposals {key}",
                             on_skip="zero proposals")
    arrays = _merge_parts(ordered, chunk_size, len(paths))
    meta = _cache_meta(params, dataset_hash, key, n_images=len(paths), n_boxes=len(arrays["boxes"]),
                       n_skipped=len(arrays["skipped"]))
    if meta["n_skipped"]:
        log.warning("proposals %s: %d of %d images could not be decoded and have zero proposals",
                    key, meta["n_skipped"], len(paths))
    atomic_savez(final, **arrays, meta=np.array(json.dumps(meta)))
    remove_parts(work, n_chunks)
    return ProposalCache.load(final)


def _merge_parts(ordered: list[dict], chunk_size: int, n_images: int) -> dict[str, np.ndarray]:
    """The cache's arrays (``boxes``, ``offsets``, ``sizes``, ``skipped``) from its parts in
    image order; a part's skipped indices are local to its chunk."""
    counts = np.concatenate([p["counts"] for p in ordered]) if ordered else np.zeros(0, np.int64)
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    boxes = (
        np.concatenate([p["boxes"] for p in ordered]).astype(_BOX_DTYPE)
        if ordered
        else np.zeros((0, 4), dtype=_BOX_DTYPE)
    )
    sizes = np.concatenate([p["sizes"] for p in ordered]).astype(np.int32) if ordered else np.zeros((0, 2), np.int32)
    starts = [c * chunk_size for c in range(len(ordered))]
    skipped = (
        np.concatenate([np.asarray(p["skipped"], dtype=np.int64) + s for p, s in zip(ordered, starts)])
        if ordered
        else np.zeros(0, np.int64)
    )
    return {"boxes": boxes, "offsets": offsets, "sizes": sizes, "skipped": skipped}


def _cache_meta(params: dict, dataset_hash: str, key: str, *, n_images: int, n_boxes: int, n_skipped: int) -> dict:
    """The cache file's ``meta`` (see :class:`ProposalCache`); ``params`` and ``dataset_hash`` make its key."""
    return {
        "version": CACHE_VERSION,
        "params": params,
        "dataset_hash": dataset_hash,
        "key": key,
        "n_images": n_images,
        "n_boxes": int(n_boxes),
        "n_skipped": int(n_skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
