"""Object proposals as a method reads them: SoCo's filter, the K-per-image sampler and
random boxes (SoCo Table 5c). Computing and caching selective search over a dataset is the
harness's job (``benchmark.data.proposal_cache``); this module needs neither.

Box convention: ``xyxy`` in pixel-edge coordinates, ``x2 = x + w`` (exclusive), so a box
``[0, 0, W, H]`` covers the whole image and ``w = x2 - x1``.
"""
from __future__ import annotations

import math

import numpy as np

# SoCo's filter, Sec. 3.1 of the paper: "aspect ratio in [1/3, 3], scale in [0.3, 0.8]"
# (official code: filter strategy 'ratio3size0308' in selective_search/
# filter_ss_proposals_json.py). The scale is sqrt(w*h) / sqrt(W*H).
# min_size=32: hologerry/SoCo selective_search/filters.py keeps a proposal only if
# ``w >= 32 and h >= 32`` (pixels of the image selective search ran on) in every filter
# strategy; the paper does not mention it.
DEFAULT_FILTER = dict(min_ratio=1 / 3, max_ratio=3.0, min_scale=0.3, max_scale=0.8, min_size=32)

# Tolerance for the inclusive comparisons, so that a box sitting exactly on an edge of a
# constraint (10x30 vs ratio 1/3, 30x30 in 100x100 vs scale 0.3) is kept despite float
# round-off.
_EPS = 1e-9


def _keep_mask(boxes: np.ndarray, width: int, height: int, min_ratio, max_ratio, min_scale, max_scale, min_size):
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    ok = (w >= min_size - _EPS) & (h >= min_size - _EPS) & (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = w / h
        scale = np.sqrt(w * h) / math.sqrt(float(width) * float(height))
    ok &= (ratio >= min_ratio - _EPS) & (ratio <= max_ratio + _EPS)
    ok &= (scale >= min_scale - _EPS) & (scale <= max_scale + _EPS)
    return ok


def filter_proposals(
    boxes: np.ndarray,
    width: int,
    height: int,
    *,
    min_ratio: float = DEFAULT_FILTER["min_ratio"],
    max_ratio: float = DEFAULT_FILTER["max_ratio"],
    min_scale: float = DEFAULT_FILTER["min_scale"],
    max_scale: float = DEFAULT_FILTER["max_scale"],
    min_size: float = DEFAULT_FILTER["min_size"],
) -> np.ndarray:
    """SoCo's proposal filter; every bound is inclusive.

    Keeps xyxy boxes with ``min_ratio <= w/h <= max_ratio``,
    ``min_scale <= sqrt(w*h)/sqrt(W*H) <= max_scale`` and ``w, h >= min_size``; order
    and dtype are preserved. Defaults: :data:`DEFAULT_FILTER` (sources cited there).
    """
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"filter_proposals: expected boxes of shape (N, 4), got {boxes.shape}")
    return boxes[_keep_mask(boxes, width, height, min_ratio, max_ratio, min_scale, max_scale, min_size)]


def sample_proposals(
    boxes: np.ndarray,
    k: int = 4,
    rng: np.random.Generator | None = None,
    *,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` proposals for one image (SoCo samples K=4, Sec. 4.1).

    Returns ``(boxes (k, 4) float32, valid (k,) bool)``:

    * ``n >= k`` boxes: ``k`` distinct boxes drawn without replacement; all valid.
    * ``0 < n < k``: all ``n`` boxes in random order, then padded by boxes drawn again
      *with* replacement. Padded rows are real boxes but marked ``valid=False``.
    * ``n == 0``: the whole-image box ``[0, 0, W, H]`` repeated ``k`` times, all marked
      ``valid=False`` (``image_size=(W, H)`` is then required).

    SoCo's official code keeps repeated boxes in the loss, so a method reproducing the
    paper uses every row and may ignore ``valid``; the mask lets a method (or an
    ablation) weight out padding instead. Deterministic for a seeded ``rng``.
    """
    if k < 1:
        raise ValueError(f"sample_proposals: k must be >= 1, got {k}")
    rng = np.random.default_rng() if rng is None else rng
    boxes = np.asarray(boxes).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        if image_size is None:
            raise ValueError("sample_proposals: no proposals and no image_size=(W, H) for the whole-image fallback")
        w, h = image_size
        return np.tile(np.array([0, 0, w, h], dtype=np.float32), (k, 1)), np.zeros(k, dtype=bool)
    if n >= k:
        idx = rng.choice(n, size=k, replace=False)
        return boxes[idx].astype(np.float32), np.ones(k, dtype=bool)
    idx = np.concatenate([rng.permutation(n), rng.choice(n, size=k - n, replace=True)])
    valid = np.arange(k) < n
    return boxes[idx].astype(np.float32), valid


def random_proposals(
    width: int,
    height: int,
    n: int,
    rng: np.random.Generator,
    *,
    max_tries: int = 100,
    **filter_kwargs,
) -> np.ndarray:
    """Random integer xyxy boxes that pass :func:`filter_proposals` (SoCo Table 5c, "random").

    Scale is drawn uniformly in ``[min_scale, max_scale]`` and aspect ratio log-uniformly in
    ``[min_ratio, max_ratio]``; the position uniformly among those that fit the image.
    Returns ``(m, 4)`` int64 with ``m == n`` unless the constraints cannot be met in this
    image (e.g. ``min_size`` larger than the image), where ``m < n`` (possibly 0);
    :func:`sample_proposals` then pads or falls back to the whole image.
    """
    p = {**DEFAULT_FILTER, **filter_kwargs}
    unknown = set(p) - set(DEFAULT_FILTER)
    if unknown:
        raise TypeError(f"random_proposals: unknown filter parameters {sorted(unknown)}")
    out: list[np.ndarray] = []
    have = 0
    root = math.sqrt(float(width) * float(height))
    for _ in range(max_tries):
        if have >= n:
            break
        m = max(16, 2 * (n - have))
        s = rng.uniform(p["min_scale"], p["max_scale"], m) * root
        r = np.exp(rng.uniform(math.log(p["min_ratio"]), math.log(p["max_ratio"]), m))
        bw = np.rint(s * np.sqrt(r))
        bh = np.rint(s / np.sqrt(r))
        fits = (bw <= width) & (bh <= height) & (bw >= 1) & (bh >= 1)
        bw, bh = bw[fits], bh[fits]
        x1 = np.floor(rng.uniform(0, 1, len(bw)) * (width - bw + 1))
        y1 = np.floor(rng.uniform(0, 1, len(bh)) * (height - bh + 1))
        cand = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.int64)
        cand = filter_proposals(cand, width, height, **p)
        out.append(cand[: n - have])
        have += len(out[-1])
    if not out:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(out, axis=0)
