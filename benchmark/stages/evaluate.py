"""COCO-style evaluation of a detector: inference, COCO results, bbox and segm AP.

Results follow the COCO results format: ``bbox`` in xywh in original image pixels,
``category_id`` the val json's id of the model's class by name (``label_categories``: the
training classes its fine-tuning run recorded; a class set that differs is an error naming
both), masks thresholded at 0.5 and RLE-encoded. Metrics come from faster-coco-eval (checked
against pycocotools in the tests) and are reported in percent. An area range without ground truth gives NaN (COCO's -1).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util

from benchmark.common.device import resolve_device
from benchmark.common.fs import atomic_write_json
from benchmark.data.coco import collate_fn
from benchmark.data.errors import CorruptImage, DataError, SkipLog
from benchmark.data.resolve import resolve_data
from benchmark.data.voc import VocProtocol
from benchmark.detectors import build_detector
from methods.weights import read_weights_file
from benchmark.stages.base import register_stage, Stage, StageContext
from benchmark.stages.finetune import class_list, open_coco, trained_classes
from benchmark.stages.voc_eval import voc_summary

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


class _Indexed(torch.utils.data.Dataset):
    """``(image, i)``; an unreadable image gives ``(CorruptImage, i)``: it is left out of the
    evaluation (no detections, no ground truth) and counted by ``predict`` in this process."""

    def __init__(self, base):
        self.base = base
        if hasattr(base, "skip_unreadable"):
            base.skip_unreadable = False   # never evaluate another image's detections under this id

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            return self.base[i][0], i
        except CorruptImage as e:
            return e, i


def map_by_name(trained: list[dict], categories: list[dict], where) -> dict[int, int]:
    """model label (1..C) -> category id of ``categories`` (a val json's ``{"id", "name"}``),
    through the names of ``trained`` (the training classes in label order). The two name sets
    must be equal; otherwise a ``DataError`` on ``where`` names both lists."""
    ids: dict[str, int] = {}
    for c in categories:
        if c["name"] in ids:
            raise DataError(where, "categories", f"category name {c['name']!r} is given to ids {ids[c['name']]} and "
                                                 f"{c['id']}: the model's classes are mapped by name")
        ids[c["name"]] = c["id"]
    names = [str(c["name"]) for c in trained]
    if len(set(names)) != len(names) or set(names) != set(ids):
        only_t = [n for n in names if n not in ids]
        only_v = [n for n in ids if n not in set(names)]
        diff = "; ".join(f"only in {w}: {', '.join(v[:5])}{', ...' if len(v) > 5 else ''}"
                         for w, v in (("training", only_t), ("this file", only_v)) if v)
        raise DataError(where, "categories",
                        f"the model was trained on {class_list(trained)}, this file has {class_list(categories)}"
                        f"{f' ({diff})' if diff else ' (a training name repeats)'}: evaluation maps the model's "
                        f"classes to categories by name and needs the same set")
    return {k: ids[n] for k, n in enumerate(names, start=1)}


def label_categories(dataset, trained: list[dict] | None) -> dict[int, int]:
    """model label -> ``dataset``'s category id: by name through ``trained`` (the classes the
    fine-tuning run recorded, ``benchmark.stages.finetune.record_classes``); without a record (a
    run stored before it existed) the former rule, label k = the k-th smallest category id of the
    val json, right only when it numbers its categories as the training json did."""
    if trained is None:
        return dict(dataset.contiguous_to_cat_id)
    mapping = map_by_name(trained, dataset.categories, dataset.ann_file)
    if mapping != dataset.contiguous_to_cat_id:
        log.info("%s numbers its categories differently from the training data: mapped by name", dataset.ann_file)
    return mapping


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, *, batch_size: int = 4, device="cpu", num_workers: int = 0,
            progress: bool = True, mask_threshold: float = 0.5,
            categories: dict[int, int] | None = None) -> dict[str, list[dict]]:
    """Run ``model`` over ``dataset``; returns ``{"bbox": [...]}`` COCO results, ``"segm"``
    where the model predicts masks, and ``"unreadable"``: ``{image_id: error}`` of the images
    that could not be decoded. ``categories``: model label -> category id
    (``label_categories``; default the sorted-id rule of ``dataset``)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.module if hasattr(model, "module") else model
    was_training = model.training
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate_fn)
    mapping = dataset.contiguous_to_cat_id if categories is None else categories
    results: dict = {"bbox": [], "unreadable": {}}
    try:
        for images, idxs in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
            for im, i in zip(images, idxs):
                if isinstance(im, CorruptImage):
                    log.warning("evaluation leaves out an unreadable image: %s", im)
                    results["unreadable"][int(dataset.ids[i])] = str(im)
            keep = [(im, i) for im, i in zip(images, idxs) if not isinstance(im, CorruptImage)]
            if not keep:
                continue
            images, idxs = zip(*keep)
            outputs = model([im.to(device) for im in images])
            for out, i in zip(outputs, idxs):
                image_id = int(dataset.ids[i])
                boxes = out["boxes"].float().cpu().numpy()
                scores = out["scores"].float().cpu().tolist()
                cats = [int(mapping[int(l)]) for l in out["labels"].cpu().tolist()]
                xywh = boxes.copy()
                xywh[:, 2:] -= xywh[:, :2]
                for b, s, c in zip(xywh.tolist(), scores, cats):
                    results["bbox"].append({"image_id": image_id, "category_id": c, "bbox": b, "score": s})
                if "masks" in out:
                    results.setdefault("segm", [])
                if "masks" in out and len(scores):
                    m = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
                    rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0)))
                    for rle, s, c in zip(rles, scores, cats):
                        rle["counts"] = rle["counts"].decode("ascii")
                        # no "bbox" here: COCO would use the box area for the segm area ranges
                        results["segm"].append({"image_id": image_id, "category_id": c,
                                                "segmentation": rle, "score": s})
    finally:
        model.train(was_training)
    return results


def coco_summary(gt, results: list[dict], iou_type: str, *, img_ids=None,
                 backend: str = "faster") -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent of ``results`` against ``gt`` (an annotation
    file path, or a loaded COCO object of the chosen backend). ``backend``: "faster"
    (faster-coco-eval) or "pycocotools" (the reference implementation, for checking)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type: unknown {iou_type!r} ({' | '.join(IOU_TYPES)})")
    if not results:  # nothing detected: every AP is 0 where there is ground truth
        return {k: 0.0 for k in METRIC_NAMES}
    quiet = contextlib.redirect_stdout(io.StringIO())
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster
        with quiet:
            coco_gt = COCO(str(gt)) if isinstance(gt, (str, Path)) else gt
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        with quiet:
            coco_gt = COCO(str(gt)) if isinstance(gt, (str, Path)) else gt
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
    else:
        raise ValueError(f"backend: unknown {backend!r} (faster | pycocotools)")
    if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
    with quiet:
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) * 100 if v >= 0 else math.nan) for k, v in zip(METRIC_NAMES, ev.stats[:6])}


def evaluate_results(ann_file, results: dict[str, list[dict]], *, img_ids=None) -> dict:
    """Metrics per IoU type present in ``results`` (``segm`` only for detectors with masks)."""
    from faster_coco_eval import COCO
    bad = sorted(set(results) - set(IOU_TYPES))
    if bad:
        raise ValueError(f"results: unknown IoU type {bad[0]!r} ({' | '.join(IOU_TYPES)})")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    return {t: coco_summary(gt, results[t], t, img_ids=img_ids) for t in IOU_TYPES if t in results}


def evaluate_detector(model: torch.nn.Module, dataset, *, batch_size: int = 4, device="cpu",
                      num_workers: int = 0, progress: bool = True, classes: list[dict] | None = None) -> dict:
    """``{"bbox": {"AP", "AP50", ...}[, "segm": {...}]}`` in percent over ``dataset``'s images;
    ``classes``: the model's training classes (``label_categories``)."""
    results = predict(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                      progress=progress, categories=label_categories(dataset, classes))
    bad = results.pop("unreadable")
    return evaluate_results(dataset.ann_file, results, img_ids=[i for i in dataset.ids if i not in bad])


def load_final_model(model_path: str | Path) -> torch.nn.Module:
    """Rebuild the detector saved by ``run_finetune`` as ``model_final.pt``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: fine-tuned model not found")
    ckpt = read_weights_file(model_path)
    for k in ("state_dict", "num_classes", "detector"):
        if not isinstance(ckpt, dict) or k not in ckpt:
            raise ValueError(f"{model_path}: field '{k}': missing (expected a model_final.pt from run_finetune)")
    model = build_detector(ckpt["detector"], int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model


PROTOCOLS = ("coco", "voc")


def run_evaluate(model_path: str, data: dict, *, run_dir: Path, device="auto", batch_size: int = 4,
                 num_workers: int = 0, progress: bool = True, protocol: str = "coco",
                 classes: list[dict] | None = None) -> dict:
    """Evaluate ``model_final.pt`` on ``data["val"]``; writes ``detections.json`` and
    ``coco_metrics.json`` (``protocol: voc``: ``voc_metrics.json``, VOC box AP as the papers'
    VOC tables report it, see ``benchmark.stages.voc_eval``) under ``run_dir`` and returns the metrics
    (the run store writes the run's own ``metrics.json`` last, as its done-marker). The model's
    labels become the val json's categories by name: ``classes``, by default those its
    fine-tuning run recorded beside it (``config.json``); a different class set is a DataError."""
    if not isinstance(data, dict) or "val" not in data:
        raise ValueError("data.val: missing (expected {'val': {'image_root', 'ann_file'}})")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: unknown {protocol!r} ({' | '.join(PROTOCOLS)})")
    dev = resolve_device(device)
    dataset = open_coco(data["val"], "data.val", with_masks=False)
    if classes is None:
        classes = trained_classes(Path(model_path).parent)
    categories = label_categories(dataset, classes)   # before inference: a wrong val set fails at once
    model = load_final_model(model_path)
    results = predict(model, dataset, batch_size=batch_size, device=dev, num_workers=num_workers,
                      progress=progress, categories=categories)
    bad = results.pop("unreadable")
    img_ids = [i for i in dataset.ids if i not in bad]
    if bad:   # counted here, in the main process; recorded in the run; above the threshold an error
        skip = SkipLog.active() or SkipLog(Path(run_dir) / "skipped_images.jsonl")
        for image_id, err in bad.items():
            skip.record(dataset.image_path(image_id), err, len(dataset.ids))
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "detections.json", results)
    if protocol == "voc":
        metrics = {"bbox": voc_summary(dataset.ann_file, results["bbox"], img_ids=img_ids,
                                       eleven_point=VocProtocol.eleven_point)}
    else:
        metrics = evaluate_results(dataset.ann_file, results, img_ids=img_ids)
    atomic_write_json(run_dir / f"{protocol}_metrics.json", metrics)
    log.info("evaluation of %s: %s", model_path, metrics)
    return metrics


@register_stage("evaluate")
class EvaluateStage(Stage):
    """On rank 0 alone: its metrics equal a one-process evaluation."""

    def run(self, ctx: StageContext) -> tuple[dict, bool]:
        if not ctx.main:
            return {}, True
        return run_evaluate(str(ctx.parent_dir / "model_final.pt"), resolve_data(ctx.config["data"]),
                            run_dir=ctx.run_dir, device=ctx.device,
                            protocol=ctx.config.get("protocol", "coco")), True
