"""PASCAL VOC box AP, as the papers' VOC tables report it.

The rules are those of the VOC devkit as detectron2's ``PascalVOCDetectionEvaluator``
(``detectron2/evaluation/pascal_voc_evaluation.py``) applies them, which is what MoCo, PixPro
and InsLoc report on VOC07 test:

- per class, detections in decreasing score order; each is matched to the ground-truth box of
  its class in its image with the highest IoU. IoU above the threshold (strictly) and that box
  is ``difficult``: the detection is ignored (neither true nor false positive); not difficult and
  not yet taken: true positive; already taken: false positive. IoU at or below: false positive.
- recall over the non-difficult boxes; precision ``tp / (tp + fp)``.
- AP per class, then the mean over classes (a class without non-difficult ground truth has no
  AP and is left out of the mean, and listed); ``AP`` is the mean over IoU 0.50:0.05:0.95.
- detectron2 uses the VOC07 11-point AP (max precision at recall >= 0, 0.1, ..., 1, averaged)
  at every threshold when the test set is VOC2007: ``eleven_point=True``, the papers' numbers.
  The all-point AP (area under the monotone precision envelope, VOC2010+ devkit) is reported
  beside it.

Boxes are 0-based continuous ``xyxy`` (what the loader and the detectors use). detectron2
shifts detections by +1 to VOC's 1-based indices and adds 1 to every width and height; both
shifts cancel, so plain continuous IoU here equals detectron2's. Ties in score are broken by
input order (a stable sort).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


def voc_ap(rec: np.ndarray, prec: np.ndarray, eleven_point: bool) -> float:
    """AP of one precision/recall curve (detections in score order)."""
    rec, prec = np.asarray(rec, dtype=np.float64), np.asarray(prec, dtype=np.float64)
    if eleven_point:
        # the devkit's recall points, as numpy spells them (np.arange: 0.30000000000000004, ...)
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0
                              for t in np.arange(0.0, 1.1, 0.1)]))
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]        # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def class_pr(dets: list[tuple], gts: dict, thresholds=IOU_THRESHOLDS) -> tuple[int, dict]:
    """Precision/recall of one class at each IoU threshold.

    ``dets``: ``[(image_id, score, xyxy), ...]``; ``gts``: ``{image_id: (boxes [n,4], difficult
    [n] bool)}``. Returns ``(npos, {threshold: (rec, prec)})``; rec is None when npos is 0."""
    npos = int(sum(int((~d).sum()) for _, d in gts.values()))
    order = np.argsort(-np.array([s for _, s, _ in dets], dtype=np.float64), kind="stable")
    n = len(order)
    best_iou = np.full(n, -np.inf)
    best_gt = np.full(n, -1, dtype=np.int64)        # a global index: unique per (image, box)
    best_difficult = np.zeros(n, dtype=bool)
    offsets, total = {}, 0
    for img, (boxes, _) in gts.items():
        offsets[img] = total
        total += len(boxes)
    for rank, k in enumerate(order):
        img, _, box = dets[k]
        if img in gts and len(gts[img][0]):
            boxes, difficult = gts[img]
            ious = _iou(np.asarray(box, dtype=np.float64), boxes)
            j = int(np.argmax(ious))
            best_iou[rank], best_gt[rank], best_difficult[rank] = ious[j], offsets[img] + j, difficult[j]
    out = {}
    for t in thresholds:
        hit = best_iou > t
        counted = hit & ~best_difficult
        tp = np.zeros(n)
        # the first (highest-scoring) detection of each ground-truth box is the true positive
        idx = np.flatnonzero(counted)
        _, first = np.unique(best_gt[idx], return_index=True)
        tp[idx[first]] = 1.0
        fp = (~hit | counted).astype(np.float64) - tp
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos if npos else None
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out[t] = (rec, prec)
    return npos, out


def voc_evaluate(gt: list[dict], detections: list[dict], class_names, *, eleven_point: bool = True) -> dict:
    """VOC AP in percent. ``gt``: ``[{"image_id", "label" (1..C), "box" xyxy, "difficult"}]``;
    ``detections``: ``[{"image_id", "label", "box", "score"}]``; label k names
    ``class_names[k - 1]``. Returns AP, AP50, AP75 (11-point when ``eleven_point``, as
    detectron2 on VOC2007), AP50_11pt, AP_allpt/AP50_allpt/AP75_allpt, per_class_AP50 and
    classes_without_gt."""
    per_gt: dict[int, dict] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for g in gt:
        b, d = per_gt[int(g["label"])][g["image_id"]]
        b.append(g["box"])
        d.append(bool(g["difficult"]))
    per_det: dict[int, list] = defaultdict(list)
    for d in detections:
        per_det[int(d["label"])].append((d["image_id"], float(d["score"]), d["box"]))
    aps = {True: defaultdict(list), False: defaultdict(list)}   # eleven_point -> threshold -> [AP]
    per_class, without = {}, []
    for label, name in enumerate(class_names, start=1):
        gts = {img: (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(d, dtype=bool))
               for img, (b, d) in per_gt[label].items()}
        npos, curves = class_pr(per_det.get(label, []), gts)
        if npos == 0:
            without.append(name)
            continue
        for t, (rec, prec) in curves.items():
            for eleven in (True, False):
                aps[eleven][t].append(100.0 * voc_ap(rec, prec, eleven))
        per_class[name] = aps[eleven_point][0.5][-1]
    if not per_class:
        raise ValueError("voc_evaluate: no class has a non-difficult ground-truth box")

    def summary(eleven):
        m = {t: float(np.mean(v)) for t, v in aps[eleven].items()}
        return float(np.mean(list(m.values()))), m[0.5], m[0.75]
    ap, ap50, ap75 = summary(eleven_point)
    ap_a, ap50_a, ap75_a = summary(False)
    return {"AP": ap, "AP50": ap50, "AP75": ap75, "AP50_11pt": summary(True)[1],
            "AP_allpt": ap_a, "AP50_allpt": ap50_a, "AP75_allpt": ap75_a,
            "per_class_AP50": per_class, "classes_without_gt": without}


def voc_gt_from_coco(ann_file: str | Path, img_ids=None) -> tuple[list[dict], list[str], dict]:
    """Ground truth of a VOC split converted by ``benchmark.data.voc`` (``difficult`` per
    annotation; a plain COCO json counts ``iscrowd`` as difficult). Returns (gt, class names,
    category id -> label)."""
    data = json.loads(Path(ann_file).read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(cats, start=1)}
    keep = None if img_ids is None else {int(i) for i in img_ids}
    gt = []
    for a in data["annotations"]:
        if keep is not None and a["image_id"] not in keep:
            continue
        x, y, w, h = a["bbox"]
        gt.append({"image_id": a["image_id"], "label": label_of[a["category_id"]], "box": (x, y, x + w, y + h),
                   "difficult": bool(a.get("difficult", a.get("iscrowd", 0)))})
    return gt, [str(c.get("name", c["id"])) for c in cats], label_of


def voc_summary(ann_file: str | Path, results: list[dict], *, img_ids=None, eleven_point: bool = True) -> dict:
    """VOC metrics of COCO-format box ``results`` (xywh, category_id) against a converted split."""
    gt, names, label_of = voc_gt_from_coco(ann_file, img_ids)
    dets = []
    for r in results:
        x, y, w, h = r["bbox"]
        if r["category_id"] not in label_of:
            raise ValueError(f"results: category_id {r['category_id']} is not in {ann_file}")
        dets.append({"image_id": r["image_id"], "label": label_of[r["category_id"]], "score": r["score"],
                     "box": (x, y, x + w, y + h)})
    return voc_evaluate(gt, dets, names, eleven_point=eleven_point)
