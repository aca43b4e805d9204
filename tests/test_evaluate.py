import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from benchmark.data.coco import CocoDetection
from benchmark.detectors import build_detector
from benchmark.stages.evaluate import coco_summary, evaluate_detector, evaluate_results, predict, run_evaluate

SIZES = {1: (100, 120), 2: (110, 120), 3: (64, 64)}   # image id -> (h, w)


def _rect_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _rle_of_rect(h, w, x, y, bw, bh):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y:y + bh, x:x + bw] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """Small GT: categories 2 and 9, small/medium/large objects, a crowd region (RLE)."""
    root = tmp_path_factory.mktemp("gt")
    (root / "img").mkdir()
    images = []
    for i, (h, w) in SIZES.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
    anns = []

    def add(img, cat, x, y, w, h, crowd=0):
        seg = ({"size": list(SIZES[img]), "counts": mask_util.encode(np.asfortranarray(
                   _mask(SIZES[img], x, y, w, h)))["counts"].decode("ascii")} if crowd else _rect_poly(x, y, w, h))
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                     "area": float(w * h), "iscrowd": crowd, "segmentation": seg})

    add(1, 2, 10, 10, 50, 60)      # medium
    add(1, 9, 70, 5, 20, 20)       # small
    add(1, 2, 0, 75, 40, 20, crowd=1)
    add(2, 9, 5, 5, 110, 100)      # large
    add(2, 2, 60, 60, 10, 12)      # small
    add(3, 2, 20, 20, 30, 30)      # medium
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 2, "name": "a"}, {"id": 9, "name": "b"}]}))
    return {"ann_file": ann_file, "image_root": root / "img", "anns": anns}


def _mask(hw, x, y, w, h):
    m = np.zeros(hw, dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def _det(img, cat, x, y, w, h, score):
    hh, ww = SIZES[img]
    return ({"image_id": img, "category_id": cat, "bbox": [float(x), float(y), float(w), float(h)], "score": score},
            {"image_id": img, "category_id": cat, "score": score,
             "segmentation": _rle_of_rect(hh, ww, x, y, w, h)})


def _handmade_dets():
    dets = [
        _det(1, 2, 12, 12, 48, 58, 0.9),     # good match (medium)
        _det(1, 2, 20, 20, 40, 40, 0.4),     # duplicate: false positive
        _det(1, 2, 2, 76, 30, 18, 0.8),      # inside the crowd region: ignored, not a false positive
        _det(1, 9, 71, 6, 18, 19, 0.7),      # small, good
        _det(2, 9, 10, 10, 100, 95, 0.6),    # large, IoU ~0.86
        _det(2, 2, 62, 61, 10, 12, 0.95),    # small, IoU ~0.7
        _det(2, 2, 0, 0, 20, 20, 0.85),      # false positive
        _det(3, 9, 20, 20, 30, 30, 0.5),     # wrong class
        _det(3, 2, 25, 22, 30, 30, 0.3),     # medium, IoU ~0.6
    ]
    return [b for b, _ in dets], [s for _, s in dets]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_agrees_with_pycocotools(gt, iou_type):
    boxes, segms = _handmade_dets()
    res = boxes if iou_type == "bbox" else segms
    fast = coco_summary(gt["ann_file"], res, iou_type, backend="faster")
    ref = coco_summary(gt["ann_file"], res, iou_type, backend="pycocotools")
    assert fast.keys() == ref.keys() == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for k in fast:
        assert fast[k] == pytest.approx(ref[k], abs=1e-6, nan_ok=True), (k, fast, ref)
    assert not any(math.isnan(v) for v in fast.values())   # every area range has GT here
    assert 0 < fast["AP"] < 100 and fast["AP50"] > fast["AP75"]


def test_perfect_detections_give_100(gt):
    boxes, segms = [], []
    for a in gt["anns"]:
        if a["iscrowd"]:
            continue
        b, s = _det(a["image_id"], a["category_id"], *[int(v) for v in a["bbox"]], 1.0)
        boxes.append(b)
        segms.append(s)
    m = evaluate_results(gt["ann_file"], {"bbox": boxes, "segm": segms})
    for t in ("bbox", "segm"):
        assert all(v == pytest.approx(100.0) for v in m[t].values()), m[t]


def test_no_detections_is_zero_not_a_crash(gt):
    m = evaluate_results(gt["ann_file"], {"bbox": [], "segm": []})
    assert m == {t: {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} for t in ("bbox", "segm")}
    assert evaluate_results(gt["ann_file"], {"bbox": []}).keys() == {"bbox"}   # a detector without masks
    with pytest.raises(ValueError, match="results: unknown IoU type 'keypoints'"):
        evaluate_results(gt["ann_file"], {"keypoints": []})


class _FixedModel(torch.nn.Module):
    """Returns one detection per image: box (10,20)-(40,60), label 2, mask = that box."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        outs = []
        for im in images:
            h, w = im.shape[-2:]
            m = torch.zeros(1, 1, h, w)
            m[..., 20:60, 10:40] = 0.9
            m[..., 60:62, 10:40] = 0.4          # below the 0.5 threshold
            outs.append({"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.75]),
                         "labels": torch.tensor([2]), "masks": m})
        return outs


def test_predict_converts_to_coco_results(gt):
    ds = CocoDetection(gt["image_root"], gt["ann_file"], with_masks=False)
    res = predict(_FixedModel(), ds, batch_size=2, progress=False)
    assert [r["image_id"] for r in res["bbox"]] == [1, 2, 3]
    r = res["bbox"][0]
    assert r["bbox"] == [10.0, 20.0, 30.0, 40.0] and r["category_id"] == 9 and r["score"] == pytest.approx(0.75)
    s = res["segm"][1]
    assert "bbox" not in s and s["category_id"] == 9 and isinstance(s["segmentation"]["counts"], str)
    rle = dict(s["segmentation"], counts=s["segmentation"]["counts"].encode())
    assert rle["size"] == list(SIZES[2]) and int(mask_util.area(rle)) == 30 * 40
    json.dumps(res)   # serialisable
    m = evaluate_detector(_FixedModel(), ds, batch_size=3, progress=False)
    assert set(m) == {"bbox", "segm"} and all(isinstance(v, float) for v in m["bbox"].values())


def test_run_evaluate_writes_files(gt, tmp_path):
    cfg = dict(name="mask_rcnn", backbone="resnet18", fpn_channels=32, box_head_conv_dim=32,
               box_head_fc_dim=64, mask_head_dim=32, mask_head_convs=2, anchor_sizes=[8, 16, 32, 64, 128],
               min_size=[64], max_size=128, test_min_size=64, rpn_pre_nms_top_n_test=100,
               rpn_post_nms_top_n_test=50, box_detections_per_img=20)
    torch.manual_seed(0)
    model = build_detector(cfg, 3)
    torch.save({"state_dict": model.state_dict(), "num_classes": 3, "detector": cfg},
               tmp_path / "model_final.pt")
    data = {"val": {"image_root": str(gt["image_root"]), "ann_file": str(gt["ann_file"])}}
    metrics = run_evaluate(str(tmp_path / "model_final.pt"), data, run_dir=tmp_path / "ev", device="cpu",
                           progress=False)
    assert json.loads((tmp_path / "ev" / "coco_metrics.json").read_text()).keys() == {"bbox", "segm"}
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert len(dets["bbox"]) == len(dets["segm"])
    assert all(d["category_id"] in (2, 9) for d in dets["bbox"])
    assert all(math.isnan(v) or 0 <= v <= 100 for v in metrics["segm"].values())
    with pytest.raises(ValueError, match="field 'detector'"):
        torch.save({"state_dict": {}, "num_classes": 3}, tmp_path / "bad.pt")
        run_evaluate(str(tmp_path / "bad.pt"), data, run_dir=tmp_path / "ev2", device="cpu")
