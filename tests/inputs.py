"""Stand-in inputs for timing or checking any registered method without a dataset: random
images carrying what the method declares it reads (labels, proposals, other images); and the
optimizer step and timer the benchmarks share."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from methods import get_method
from methods.proposals import random_proposals

NUM_CLASSES = 8


def by_value(obj):
    """``obj`` with its tensors as numpy arrays, for a worker process's result queue: torch's
    queue shares a tensor's storage through a file descriptor that the worker must still serve
    when the parent reads, so a worker that exits right after ``put`` can leave the parent a
    FileNotFoundError; arrays travel in the pickle itself. ``as_tensors`` undoes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, (tuple, list)):
        return type(obj)(by_value(o) for o in obj)
    return obj


def as_tensors(obj):
    """The inverse of :func:`by_value`."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(as_tensors(o) for o in obj)
    return obj


class ListSource:
    """An in-memory image source (``len`` and ``record(i)``, as ``benchmark.data.images.ImageSource``)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> dict:
        return dict(self.records[i])


def method_config(name: str, method_scale: dict | None = None) -> dict:
    """A method's config at a scale's overrides, made self-contained: no weights file, and
    ``num_classes`` filled in for a method that reads labels."""
    cls = get_method(name)
    cfg = dict((method_scale or {}).get("method", {}))
    cfg.pop("weights", None)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if cls.needs_labels and "num_classes" in fields and not cfg.get("num_classes"):
        cfg["num_classes"] = NUM_CLASSES
    return cfg


def records(method, n: int, size: int | tuple[int, int], seed: int = 0) -> list[dict]:
    """``n`` random RGB records of ``size`` (W or (W, H)); with labels when the method reads
    them, random filtered boxes standing in for cached proposals when it reads those, and
    random pseudo-classes of those boxes when it reads them."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"index": i, "image_id": i + 1, "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
        if method.needs_labels:
            r["labels"] = (rng.random(NUM_CLASSES) > 0.5).astype(np.float32)
        if method.proposal_params() is not None:
            r["proposals"] = random_proposals(w, h, 16, rng)
            if method.pseudo_class_params() is not None:    # AlignDet-DETR: a k-means class per proposal
                r["pseudo_classes"] = rng.integers(0, method.pseudo_class_params()["k"], len(r["proposals"]))
        if method.mask_params() is not None:   # DetCon: stand-in segment ids, 4x4 blocks
            r["masks"] = np.kron(rng.integers(0, 5, (4, 4)), np.ones((-(-h // 4), -(-w // 4)), np.int64))[:h, :w].astype(np.uint16)
        out.append(r)
    return out


def samples(method, n: int, size, seed: int = 0) -> list[dict]:
    """The views of ``n`` random records, each drawn with its own seeded rng."""
    recs = records(method, n, size, seed)
    source = ListSource(recs) if method.needs_source else None
    return [method.views(r, np.random.default_rng([seed, i]), source) for i, r in enumerate(recs)]


def amp_step(loss_fn, opt, scaler, device: str, amp: bool, grad_clip: float | None = None, params=None) -> None:
    """One optimizer step as the training loop takes it: ``loss_fn()`` under autocast (CUDA AMP),
    scaled backward, optional gradient clipping of ``params``, step."""
    with torch.autocast(device, enabled=amp and device == "cuda"):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def seconds_per_step(step, steps: int, device: str, warmup: int = 2) -> float:
    """Mean wall time of ``step()`` over ``steps`` calls after ``warmup`` (allocator, cuDNN
    autotune), the GPU synchronised before and after."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def batches_by_loader(method, folder) -> dict:
    """``{loader: the collated, rendered batch of every image in folder}`` for each of the
    method's ``loaders``, each sample drawn with the same rng (seed = its index)."""
    from benchmark.data.images import ImageSource, render_deferred
    src = ImageSource.from_folder(folder)
    out = {}
    for loader in method.loaders:
        src.loader = loader
        out[loader] = render_deferred(method.collate([method.views(src.record(i), np.random.default_rng(i))
                                                      for i in range(len(src))]), "cpu")
    return out
