"""VOC box AP: hand-computed all-point and 11-point values, and a sequential devkit-style check."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark.stages.voc_eval import class_pr, voc_ap, voc_evaluate, voc_summary

A, B = 1, 2


def _gt():
    return [
        {"image_id": 1, "label": A, "box": (0, 0, 10, 10), "difficult": False},
        {"image_id": 2, "label": A, "box": (0, 0, 10, 10), "difficult": False},
        {"image_id": 2, "label": A, "box": (20, 20, 30, 30), "difficult": True},
        {"image_id": 1, "label": B, "box": (50, 50, 70, 70), "difficult": False},
    ]


def _dets():
    return [
        {"image_id": 1, "label": A, "score": 0.9, "box": (0, 0, 10, 10)},    # TP
        {"image_id": 2, "label": A, "score": 0.8, "box": (20, 20, 30, 30)},  # the difficult box: ignored
        {"image_id": 1, "label": A, "score": 0.7, "box": (0, 0, 10, 10)},    # duplicate: FP
        {"image_id": 2, "label": A, "score": 0.6, "box": (0, 0, 10, 6)},     # IoU 0.6: TP up to 0.55
        {"image_id": 2, "label": B, "score": 0.95, "box": (50, 50, 70, 70)},  # no B in image 2: FP
        {"image_id": 1, "label": B, "score": 0.5, "box": (50, 50, 70, 70)},  # TP
    ]


def test_ap_of_hand_made_curves():
    # class A at IoU 0.5: rec .5 .5 .5 1, prec 1 1 .5 2/3
    rec, prec = np.array([.5, .5, .5, 1.]), np.array([1, 1, .5, 2 / 3])
    assert voc_ap(rec, prec, eleven_point=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(rec, prec, eleven_point=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # class B: FP then TP
    assert voc_ap(np.array([0., 1.]), np.array([0., .5]), False) == pytest.approx(0.5)
    assert voc_ap(np.array([0., 1.]), np.array([0., .5]), True) == pytest.approx(0.5)


def test_matching_rules_per_threshold():
    gts = {1: (np.array([[0, 0, 10, 10.]]), np.array([False])),
           2: (np.array([[0, 0, 10, 10.], [20, 20, 30, 30]]), np.array([False, True]))}
    dets = [(d["image_id"], d["score"], d["box"]) for d in _dets() if d["label"] == A]
    npos, curves = class_pr(dets, gts, thresholds=(0.5, 0.6))
    assert npos == 2
    rec, prec = curves[0.5]
    np.testing.assert_allclose(rec, [.5, .5, .5, 1.])
    np.testing.assert_allclose(prec, [1, 1, .5, 2 / 3])
    rec, prec = curves[0.6]                          # IoU must exceed the threshold strictly
    np.testing.assert_allclose(rec, [.5, .5, .5, .5])
    np.testing.assert_allclose(prec, [1, 1, .5, 1 / 3])


def test_two_classes_with_a_difficult_box():
    m = voc_evaluate(_gt(), _dets(), ["a", "b"], eleven_point=False)
    a50, a_hi, b = 0.5 + 0.5 * 2 / 3, 0.5, 0.5        # class A at <=0.55 and >=0.6; class B everywhere
    assert m["AP50"] == pytest.approx(100 * (a50 + b) / 2)
    assert m["AP75"] == pytest.approx(100 * (a_hi + b) / 2)
    assert m["AP"] == pytest.approx(100 * ((2 * a50 + 8 * a_hi) / 10 + b) / 2)
    assert m["AP_allpt"] == m["AP"] and m["per_class_AP50"] == pytest.approx({"a": 100 * a50, "b": 50.0})
    e50, e_hi = (6 + 5 * 2 / 3) / 11, 6 / 11           # 11-point: recall .5 reaches 6 of the 11 points
    assert m["AP50_11pt"] == pytest.approx(100 * (e50 + b) / 2)
    m11 = voc_evaluate(_gt(), _dets(), ["a", "b"])    # detectron2 on VOC2007: 11-point everywhere
    assert m11["AP50"] == m11["AP50_11pt"] == m["AP50_11pt"]
    assert m11["AP75"] == pytest.approx(100 * (e_hi + b) / 2)
    assert m11["AP"] == pytest.approx(100 * ((2 * e50 + 8 * e_hi) / 10 + b) / 2)
    assert m11["AP_allpt"] == m["AP"]


def test_class_without_ground_truth_is_left_out_and_named():
    m = voc_evaluate(_gt(), _dets(), ["a", "b", "c"], eleven_point=False)
    assert m["classes_without_gt"] == ["c"] and set(m["per_class_AP50"]) == {"a", "b"}
    with pytest.raises(ValueError, match="no class"):
        voc_evaluate([], _dets(), ["a"])


def _devkit_reference(dets, gts, t, eleven):
    """The devkit loop, one detection at a time (a second, independent implementation)."""
    npos = sum(int((~d).sum()) for _, d in gts.values())
    taken = {img: np.zeros(len(b), bool) for img, (b, _) in gts.items()}
    tp, fp = [], []
    for img, _, box in sorted(dets, key=lambda d: -d[1]):
        ov = -np.inf
        if img in gts:
            b = gts[img][0]
            iw = np.maximum(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0)
            ih = np.maximum(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0)
            inter = iw * ih
            ious = inter / ((box[2] - box[0]) * (box[3] - box[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)
            j, ov = int(np.argmax(ious)), ious.max()
        if ov > t:
            if gts[img][1][j]:
                tp.append(0), fp.append(0)
            elif not taken[img][j]:
                taken[img][j] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(float).eps), eleven)


def test_vectorised_matching_equals_the_devkit_loop():
    rng = np.random.default_rng(0)
    gts = {}
    for img in range(6):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 60, (n, 2))
        gts[img] = (np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1), rng.random(n) < 0.2)
    gts[0][1][0] = False
    dets = []
    for _ in range(60):
        img = int(rng.integers(0, 7))  # image 6 has no ground truth
        ref = gts[img][0][rng.integers(len(gts[img][0]))] if img in gts else np.array([0, 0, 9, 9.])
        dets.append((img, float(rng.random()), ref + rng.normal(0, 3, 4)))
    npos, curves = class_pr(dets, gts)
    for t, (rec, prec) in curves.items():
        for eleven in (True, False):
            assert voc_ap(rec, prec, eleven) == pytest.approx(_devkit_reference(dets, gts, t, eleven))


def test_summary_reads_a_converted_split(tmp_path):
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"image_id": g["image_id"], "category_id": g["label"],
                           "bbox": [g["box"][0], g["box"][1], g["box"][2] - g["box"][0], g["box"][3] - g["box"][1]],
                           "iscrowd": int(g["difficult"]), "difficult": int(g["difficult"])} for g in _gt()]}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    results = [{"image_id": d["image_id"], "category_id": d["label"], "score": d["score"],
                "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
               for d in _dets()]
    assert voc_summary(ann, results) == voc_evaluate(_gt(), _dets(), ["a", "b"])
    perfect = [{**r, "score": 1.0} for r in results if (r["image_id"], r["score"]) in ((1, 0.9), (2, 0.6), (1, 0.5))]
    perfect[1]["bbox"] = [0, 0, 10, 10]
    m = voc_summary(ann, perfect)
    assert m["AP"] == m["AP_allpt"] == 100.0
    with pytest.raises(ValueError, match="category_id 7"):
        voc_summary(ann, [{**results[0], "category_id": 7}])


def test_run_evaluate_with_the_voc_protocol(isolated):
    """``protocol: voc`` on the synthetic scenes in VOC layout: the switch, its file, its keys."""
    import torch

    from benchmark.experiments.config import evaluate_config
    from benchmark.data.resolve import resolve_data
    from benchmark.detectors import build_detector
    from benchmark.stages.evaluate import run_evaluate
    voc_data = {"kind": "voc", "synthetic": {"image_size": 64, "num_pretrain": 2, "num_train": 2, "num_val": 3,
                                             "seed": 1}}
    data = resolve_data(voc_data)
    cfg = dict(name="mask_rcnn", backbone="resnet18", fpn_channels=32, box_head_conv_dim=32,
                                        box_head_fc_dim=64, mask_head_dim=32, mask_head_convs=2,
                                        anchor_sizes=[8, 16, 32, 64, 128], min_size=[64], max_size=128,
                                        test_min_size=64, rpn_pre_nms_top_n_test=100,
                                        rpn_post_nms_top_n_test=50, box_detections_per_img=20,
                                        box_score_thresh=0.0)
    torch.manual_seed(0)
    model = build_detector(cfg, 9)
    path = isolated / "model_final.pt"
    torch.save({"state_dict": model.state_dict(), "num_classes": 9, "detector": cfg}, path)
    m = run_evaluate(str(path), data, run_dir=isolated / "ev", device="cpu", progress=False, protocol="voc")
    stored = json.loads((isolated / "ev" / "voc_metrics.json").read_text())
    assert stored == m and not (isolated / "ev" / "coco_metrics.json").exists()
    keys = {"AP", "AP50", "AP75", "AP50_11pt", "AP_allpt", "AP50_allpt", "AP75_allpt"}
    assert keys <= set(m["bbox"]) and all(0 <= m["bbox"][k] <= 100 for k in keys)
    with pytest.raises(ValueError, match="protocol: unknown 'pascal'"):
        run_evaluate(str(path), data, run_dir=isolated / "ev2", device="cpu", protocol="pascal")
    # ``detbench evaluate`` of a fine-tuning run on VOC data evaluates with the VOC protocol
    import shutil

    from benchmark.cli import main
    from benchmark.runs.store import RunStore
    store = RunStore()
    ft = "0123456789abcdef"   # a run key: 16 hex digits
    d = store.begin(ft, {"stage": "finetune", "scale": "tiny", "seed": 0, "data": voc_data})
    shutil.copy(path, d / "model_final.pt")
    store.finish(ft, {"steps": 1})
    assert main(["evaluate", "--from", ft]) == 0
    (ev,) = [r for r in store.list() if r["stage"] == "evaluate"]
    assert store.config(ev["key"])["protocol"] == "voc"
    assert json.loads((store.run_dir(ev["key"]) / "voc_metrics.json").read_text()) == m
    # the switch enters an evaluation run's identity only when it is not coco
    assert "protocol" not in evaluate_config(parent="k", data={}, scale="tiny")
    assert evaluate_config(parent="k", data={}, scale="tiny", protocol="voc")["protocol"] == "voc"
