"""Unsupervised segmentation masks for DetCon (Hénaff et al., ICCV 2021): one
Felzenszwalb-Huttenlocher id map per image, computed once per dataset and cached.

DetCon's official pipeline (deepmind/detcon ``generate_fh_masks_for_imagenet.py``) segments
every original image at its full stored resolution with scikit-image's ``felzenszwalb``
(scale 1000, min_size 1000, sigma left at 0.8) and stores the id map next to the image.
This module holds the same pipeline over a list of image files:

* :func:`felzenszwalb` -- FH on one RGB image: scikit-image when it is installed, else OpenCV
  contrib's ``cv2.ximgproc.segmentation`` graph segmentation (the same algorithm; the backend
  is part of the cache key, as the two do not agree pixel for pixel).
* :func:`compute_masks` / :class:`MaskCache` -- parallel (worker processes), resumable
  (finished chunks are part files), one cache per (dataset, parameters): an index ``.npz``
  and a blob ``.bin`` of per-image zlib-compressed id maps read through a memory map, so
  DataLoader workers share its pages and a record reads one image's bytes.

The chunking, resuming, locking and dataset hash are the proposal cache's
(:mod:`benchmark.data.proposal_cache`).
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmark.common.fs import atomic_open
from benchmark.data.errors import CorruptImage, DataError
from benchmark.data.chunked import atomic_savez, cached_or_computed, compute_chunks, remove_parts
from benchmark.data.proposal_cache import cache_key, load_rgb

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "CACHE_VERSION", "FH_DEFAULTS", "MaskCache", "compute_masks", "felzenszwalb",
           "fh_backend", "segment"]

# Bump when the on-disk format or the way masks are computed changes (part of the cache key).
CACHE_VERSION = 1
BACKENDS = ("auto", "skimage", "opencv")
# DetCon official generate_fh_masks_for_imagenet.py: flags fh_scales "1000", fh_min_sizes "1000";
# sigma not passed, so scikit-image's default 0.8
FH_DEFAULTS = {"scale": 1000.0, "sigma": 0.8, "min_size": 1000}
_MAX_ID = np.iinfo(np.uint16).max


# ---------------------------------------------------------------------------------------
# segmentation of one image


def fh_backend(backend: str = "auto") -> str:
    """The FH implementation a cache is computed with: ``skimage`` (the official one) when
    scikit-image imports, else ``opencv`` (``cv2.ximgproc``, installed for selective search)."""
    if backend not in BACKENDS:
        raise ValueError(f"felzenszwalb: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        import skimage.segmentation  # noqa: F401
        return "skimage"
    except ImportError:
        return "opencv"


def felzenszwalb(image: np.ndarray, scale: float = 1000.0, sigma: float = 0.8, min_size: int = 1000,
                 backend: str = "auto") -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation of an HxWx3 uint8 RGB image: int64 ids
    0..n-1, one per pixel. ``scale`` is the threshold constant k on 0-255 colour distances
    (scikit-image divides its ``scale`` by 255 for images in [0, 1]; OpenCV takes k on the
    uint8 values: the same k), ``sigma`` the Gaussian pre-smoothing, ``min_size`` the smallest
    segment in pixels (smaller ones are merged)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"felzenszwalb: expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if fh_backend(backend) == "skimage":
        from skimage.segmentation import felzenszwalb as sk_fh
        return sk_fh(image, scale=scale, sigma=sigma, min_size=int(min_size)).astype(np.int64)
    import cv2
    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError("felzenszwalb: OpenCV has no ximgproc (pip install opencv-contrib-python-headless) "
                           "and scikit-image is not installed")
    seg = cv2.ximgproc.segmentation.createGraphSegmentation(float(sigma), float(scale), int(min_size))
    return np.asarray(seg.processImage(np.ascontiguousarray(image)), dtype=np.int64)


def segment(image: np.ndarray, scale: float = 1000.0, sigma: float = 0.8, min_size: int = 1000,
            max_side: int | None = None, backend: str = "auto") -> np.ndarray:
    """The cached id map of one image: :func:`felzenszwalb` at full resolution (official), or
    on a copy whose longer side is ``max_side`` (the map stays at that size; views scale
    their geometry to it, ``methods.geometry.apply_mask``). Ids are 0..n-1 in uint16 (the
    official code casts them to uint8, which merges segments past the 256th: not copied)."""
    h, w = image.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        import cv2
        s = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ids = felzenszwalb(image, scale, sigma, min_size, backend)
    _, ids = np.unique(ids, return_inverse=True)          # compact 0..n-1 in the original order
    ids = ids.reshape(image.shape[:2])
    if ids.max(initial=0) > _MAX_ID:
        raise ValueError(f"segment: {ids.max() + 1} segments do not fit uint16 ids")
    return ids.astype(np.uint16)


def encode_mask(ids: np.ndarray) -> tuple[bytes, bool]:
    """(zlib bytes, wide): uint8 ids when every id is < 256 (``wide`` False), else uint16."""
    wide = bool(ids.max(initial=0) > 255)
    raw = np.ascontiguousarray(ids.astype(np.uint16 if wide else np.uint8)).tobytes()
    return zlib.compress(raw, 6), wide


def decode_mask(buf, width: int, height: int, wide: bool) -> np.ndarray:
    dtype = np.uint16 if wide else np.uint8
    return np.frombuffer(zlib.decompress(bytes(buf)), dtype=dtype).reshape(height, width)


# ---------------------------------------------------------------------------------------
# the on-disk cache


@dataclass
class MaskCache:
    """Every image's FH id map. ``<name>.npz``: ``offsets`` int64 (n + 1), ``mask_sizes`` int32
    (n, 2) (W, H) of each map (0, 0 for a skipped image), ``image_sizes`` int32 (n, 2),
    ``wide`` bool (n) (uint16 ids), ``skipped`` int64, ``meta`` JSON (``params``,
    ``dataset_hash``, ``n_images``, ``n_bytes``, ``version``); ``<name>.bin``: the maps'
    zlib bytes, image i's at ``offsets[i]:offsets[i + 1]``, memory-mapped."""

    path: Path
    params: dict
    meta: dict
    offsets: np.ndarray = field(repr=False)
    mask_sizes: np.ndarray = field(repr=False)
    image_sizes: np.ndarray = field(repr=False)
    wide: np.ndarray = field(repr=False)
    skipped: np.ndarray = field(repr=False)
    _blob: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MaskCache":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("offsets", "mask_sizes", "image_sizes", "wide", "skipped")}
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise DataError(path, "npz", f"not a readable mask cache ({type(exc).__name__}: {exc})") from None
        if meta.get("version") != CACHE_VERSION:
            raise DataError(path, "meta.version", f"expected cache version {CACHE_VERSION}, got {meta.get('version')}")
        off = arrays["offsets"]
        blob = path.with_suffix(".bin")
        size = blob.stat().st_size if blob.exists() else -1
        if len(off) != meta["n_images"] + 1 or off[-1] != size:
            raise DataError(path, "offsets", f"inconsistent with n_images / {blob.name}; delete both to recompute")
        return cls(path=path, params=meta["params"], meta=meta, **arrays)

    @property
    def blob(self) -> np.ndarray:
        if self._blob is None:   # opened on first read (in each DataLoader worker after a pickle)
            n = int(self.offsets[-1])
            self._blob = (np.memmap(self.path.with_suffix(".bin"), dtype=np.uint8, mode="r") if n
                          else np.zeros(0, np.uint8))
        return self._blob

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_blob": None}   # a memory map is reopened, never pickled by value

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def mask(self, i: int) -> np.ndarray:
        """Image ``i``'s id map, (H, W) at ``mask_size(i)``: uint8, or uint16 past 256 ids;
        (0, 0) for an image that could not be decoded."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        i %= len(self)
        w, h = (int(v) for v in self.mask_sizes[i])
        if w == 0:
            return np.zeros((0, 0), np.uint8)
        return decode_mask(self.blob[self.offsets[i]: self.offsets[i + 1]], w, h, bool(self.wide[i]))

    def mask_size(self, i: int) -> tuple[int, int]:
        w, h = self.mask_sizes[i]
        return int(w), int(h)

    def image_size(self, i: int) -> tuple[int, int]:
        """(W, H) of image ``i`` as decoded when the cache was built."""
        w, h = self.image_sizes[i]
        return int(w), int(h)

    @property
    def bytes_per_image(self) -> float:
        """Mean stored bytes of one image's map (the ``.bin`` only; the index adds 29 bytes)."""
        return float(self.offsets[-1]) / max(len(self), 1)

    @property
    def n_skipped(self) -> int:
        return int(self.meta["n_skipped"])


def _init_worker() -> None:
    import cv2
    cv2.setNumThreads(1)   # one process per core


def _compute_chunk(job: tuple) -> dict:
    """Worker: the encoded maps of one chunk of images. Top-level so that ``spawn`` pickles it."""
    chunk_idx, paths, p = job
    out = {"chunk": chunk_idx, "lengths": np.zeros(len(paths), np.int64),
           "mask_sizes": np.zeros((len(paths), 2), np.int32), "image_sizes": np.zeros((len(paths), 2), np.int32),
           "wide": np.zeros(len(paths), bool), "skipped": [], "errors": []}
    blobs = []
    for j, path in enumerate(paths):
        try:
            img = load_rgb(path)
        except CorruptImage as exc:
            out["skipped"].append(j)
            out["errors"].append(str(exc))
            continue
        ids = segment(img, p["scale"], p["sigma"], p["min_size"], p["max_side"], p["backend"])
        buf, out["wide"][j] = encode_mask(ids)
        blobs.append(buf)
        out["lengths"][j] = len(buf)
        out["mask_sizes"][j] = (ids.shape[1], ids.shape[0])
        out["image_sizes"][j] = (img.shape[1], img.shape[0])
    out["data"] = np.frombuffer(b"".join(blobs), np.uint8)
    out["skipped"] = np.asarray(out["skipped"], np.int64)
    return out


_PART_KEYS = ("data", "lengths", "mask_sizes", "image_sizes", "wide", "skipped")


def compute_masks(
    paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    *,
    scale: float = FH_DEFAULTS["scale"],
    sigma: float = FH_DEFAULTS["sigma"],
    min_size: int = FH_DEFAULTS["min_size"],
    max_side: int | None = None,
    backend: str = "auto",
    num_workers: int = 2,
    chunk_size: int = 64,
    progress: bool = True,
) -> MaskCache:
    """FH id maps of ``paths``, cached under ``cache_dir`` as ``masks-<key>.npz`` + ``.bin``;
    ``key`` hashes the dataset (ordered paths, sizes, sampled bytes) and every parameter
    (scale, sigma, min_size, max_side, the resolved backend, the version). An existing cache
    is loaded, never recomputed; otherwise chunks of ``chunk_size`` images run over
    ``num_workers`` processes (``<= 1``: in this process), each finished chunk written
    atomically to ``masks-<key>.parts/part-XXXXX.npz`` so a killed run resumes with the missing
    chunks only; the parts are merged (blob first, index last: the index is the done-marker)
    and removed. An undecodable image is a counted, logged skip with an empty map."""
    if chunk_size < 1:
        raise ValueError(f"compute_masks: chunk_size must be >= 1, got {chunk_size}")
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"compute_masks: max_side must be >= 1 pixel or None, got {max_side}")
    if not (scale > 0 and sigma >= 0 and int(min_size) >= 1):
        raise ValueError(f"compute_masks: need scale > 0, sigma >= 0, min_size >= 1; got {scale}, {sigma}, {min_size}")
    paths = [os.fspath(p) for p in paths]
    params = {"algorithm": "felzenszwalb", "backend": fh_backend(backend), "scale": float(scale),
              "sigma": float(sigma), "min_size": int(min_size),
              "max_side": None if max_side is None else int(max_side), "version": CACHE_VERSION}
    dataset_hash, key = cache_key(paths, params)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"masks-{key}.npz"
    return cached_or_computed(final, MaskCache.load, lambda: _compute(
        paths, cache_dir / f"masks-{key}.parts", params, dataset_hash, key, final,
        num_workers=num_workers, chunk_size=chunk_size, progress=progress))


def _load_part(path: Path, n: int) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in _PART_KEYS}
        if len(part["lengths"]) == n and part["lengths"].sum() == len(part["data"]):
            return part
    except Exception:
        pass
    log.warning("mask part %s is unreadable; recomputing it", path)   # never trusted
    return None


def _save_part(path: Path, res: dict) -> None:
    atomic_savez(path, **{k: res[k] for k in _PART_KEYS})


def _compute(paths, work: Path, params, dataset_hash, key, final, *, num_workers, chunk_size,
             progress) -> MaskCache:
    ordered = compute_chunks(paths, work, chunk_size, params, compute_chunk=_compute_chunk,
                             init_worker=_init_worker, load_part=_load_part, save_part=_save_part,
                             num_workers=num_workers, progress=progress, what=f"masks {key}",
                             on_skip="empty mask")
    cat = lambda k, shape, dtype: (np.concatenate([p[k] for p in ordered]).astype(dtype) if ordered
                                   else np.zeros(shape, dtype))
    lengths = cat("lengths", 0, np.int64)
    offsets = np.zeros(len(paths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    skipped = (np.concatenate([p["skipped"].astype(np.int64) + c * chunk_size for c, p in enumerate(ordered)])
               if ordered else np.zeros(0, np.int64))
    meta = {"version": CACHE_VERSION, "params": params, "dataset_hash": dataset_hash, "key": key,
            "n_images": len(paths), "n_bytes": int(offsets[-1]), "n_skipped": len(skipped),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if meta["n_skipped"]:
        log.warning("masks %s: %d of %d images could not be decoded and have empty masks",
                    key, meta["n_skipped"], len(paths))
    with atomic_open(final.with_suffix(".bin")) as f:   # the blob first, the index (done-marker) last
        for p in ordered:
            f.write(p["data"].tobytes())
    atomic_savez(final, offsets=offsets, mask_sizes=cat("mask_sizes", (0, 2), np.int32),
                 image_sizes=cat("image_sizes", (0, 2), np.int32), wide=cat("wide", 0, bool),
                 skipped=skipped, meta=np.array(json.dumps(meta)))
    remove_parts(work, len(ordered))
    return MaskCache.load(final)
