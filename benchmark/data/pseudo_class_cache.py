"""AlignDet's DETR pseudo-classes (``methods.pseudo_classes``) over a whole pretraining set,
as a keyed on-disk cache beside the proposal cache (``benchmark.data.proposal_cache``).

One k-means over every selective-search proposal of the pretraining images: each proposal's
feature is the RoIAlign mean of the parent run's backbone (``method.proposal_features``) on the
image at its stored size. The cache file is ``<cache>/pseudo_classes/classes-<key>.npz``; the
key hashes what the classes depend on: the proposal cache's file (its key covers the dataset
and the selective-search parameters), the sha256 of the parent's ``weights.pt``, the
clustering parameters (k, PCA dimension, seed) and ``CACHE_VERSION``. All of these are in the
identity of the AlignDet DETR run that reads it (parent key, method config, seed), so a run
never reads another backbone's classes, and a second run with the same parent reuses them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from benchmark.data.errors import CorruptImage, DataError
from benchmark.common.fs import atomic_open, file_lock
from methods.augment import to_tensor
from methods.pseudo_classes import pseudo_classes

log = logging.getLogger(__name__)

# Bump when the features or the clustering change: part of the key.
CACHE_VERSION = 1


class PseudoClasses:
    """The classes of one cache file: ``labels(i)`` aligned with the proposals of image ``i``."""

    def __init__(self, path: Path, labels: np.ndarray, offsets: np.ndarray):
        self.path, self._labels, self.offsets = path, labels, offsets

    @classmethod
    def load(cls, path: Path, n_images: int) -> "PseudoClasses":
        try:
            with np.load(path, allow_pickle=False) as z:
                labels, offsets = z["labels"], z["offsets"]
        except Exception as e:
            raise DataError(path, "npz", f"not a readable pseudo-class cache ({type(e).__name__}: {e}); "
                                         f"delete it to recompute") from None
        if len(offsets) != n_images + 1 or offsets[-1] != len(labels):
            raise DataError(path, "offsets", f"inconsistent with {n_images} images / {len(labels)} labels; "
                                             f"delete it to recompute")
        return cls(path, labels, offsets)

    def labels(self, i: int) -> np.ndarray:
        return self._labels[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)


def cache_key(proposals_file: str, weights_sha256: str, params: dict) -> str:
    blob = json.dumps({"proposals": Path(proposals_file).name, "weights": weights_sha256,
                       "params": params, "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def proposal_features(method, source, proposals, device) -> tuple[torch.Tensor, np.ndarray]:
    """(all proposals' features (P, C) in image order, offsets (N + 1,)). An image the proposal
    cache skipped (undecodable) has no proposals and is not read."""
    feats, counts = [], []
    for i in range(len(proposals)):
        boxes = proposals.boxes(i)
        if len(boxes):
            try:
                image = np.asarray(source.record(i)["image"])
            except CorruptImage as e:
                raise DataError(source.path(i), "image", f"unreadable now, readable when the proposals were "
                                                         f"computed ({e})") from None
            feats.append(method.proposal_features(to_tensor(image).to(device), torch.from_numpy(boxes).float().to(device)).cpu())
        counts.append(len(boxes))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (torch.cat(feats) if feats else torch.zeros(0, 0)), offsets


def compute_pseudo_classes(method, source, proposals, cache_dir: str | Path, *, weights_sha256: str,
                           params: dict, device) -> PseudoClasses:
    """The cached classes for these proposals and this backbone, computed (once, under a lock)
    when missing. ``params``: ``{"k", "pca_dim", "seed"}`` (``method.pseudo_class_params()``)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(str(proposals.path), weights_sha256, params)
    final = cache_dir / f"classes-{key}.npz"
    if not final.exists():
        lock = cache_dir / f"classes-{key}.lock"
        with file_lock(lock):
            if not final.exists():
                feats, offsets = proposal_features(method, source, proposals, device)
                log.info("pseudo-classes: k-means of %d proposals of %d images into %d classes",
                         len(feats), len(proposals), params["k"])
                labels = pseudo_classes(feats, params["k"], params["pca_dim"], params["seed"]).numpy()
                with atomic_open(final, "wb") as f:
                    np.savez(f, labels=labels.astype(np.int32), offsets=offsets,
                             meta=json.dumps({"params": params, "weights_sha256": weights_sha256,
                                              "proposals": str(proposals.path), "version": CACHE_VERSION}))
        lock.unlink(missing_ok=True)   # the cache stays one file; waiters find it done
    return PseudoClasses.load(final, len(proposals))
