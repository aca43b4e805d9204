import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from benchmark.data.coco import CocoDetection
from benchmark.detectors import get_detector
from benchmark.detectors.base import SGDRecipe
from benchmark.stages.finetune import TrainSet, hflip, run_finetune
from benchmark.engine.loop import Diverged

MICRO_DET = dict(name="mask_rcnn", backbone="resnet18", fpn_channels=32, box_head_conv_dim=32, box_head_fc_dim=64,
                 mask_head_dim=32, mask_head_convs=2, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                 rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                 rpn_post_nms_top_n_test=100, anchor_sizes=[8, 16, 32, 64, 128], min_size=[56, 64],
                 max_size=107, test_min_size=64)
MICRO_RECIPE = dict(steps=5, batch_size=2, lr=0.01, milestones=[0.6], warmup_steps=2, ckpt_every=100,
                    log_every=1, num_workers=0, hflip_prob=0.5)


def make_tiny_coco(root: Path, n: int = 6, size: int = 64) -> dict:
    """n images of size x size with 1-2 rectangles; categories 3 and 7; a crowd region in
    image 0 and an image without annotations (the last)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        if i < n - 1:
            for j in range(1 + i % 2):
                x0, y0 = rng.integers(0, size // 2, 2)
                w, h = rng.integers(12, size // 2, 2)
                cat = (3, 7)[(i + j) % 2]
                arr[y0:y0 + h, x0:x0 + w] = (220, 40, 40) if cat == 3 else (40, 220, 40)
                poly = [float(v) for v in (x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h)]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                             "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h),
                             "segmentation": [poly]})
        if i == 0:   # crowd region: uncompressed RLE covering rows 50..59 of columns 0..9
            counts = []
            m = np.zeros((size, size), dtype=np.uint8)
            m[50:60, 0:10] = 1
            flat = m.flatten(order="F")
            cur, run = 0, 0
            for v in flat:
                if v != cur:
                    counts.append(run)
                    cur, run = v, 0
                run += 1
            counts.append(run)
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 3, "iscrowd": 1,
                         "bbox": [0.0, 50.0, 10.0, 10.0], "area": 100.0,
                         "segmentation": {"size": [size, size], "counts": counts}})
        Image.fromarray(arr).save(root / "images" / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
    cats = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    split = {"image_root": str(root / "images"), "ann_file": str(ann_file)}
    return {"train": split, "val": split}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


def test_recipe_defaults_and_errors():
    recipes = get_detector("mask_rcnn").recipes
    r = recipes["1x"]
    assert (r.steps, r.batch_size, r.lr, r.milestone_steps(), r.warmup_steps) == (90000, 16, 0.02, (60000, 80000), 1000)
    assert recipes["2x"].milestone_steps() == (120000, 160000)
    with pytest.raises(ValueError, match=r"recipe\.stpes: unknown key"):
        SGDRecipe.from_dict({"stpes": 10})
    with pytest.raises(ValueError, match=r"recipe\.lr: expected a number"):
        SGDRecipe.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match=r"recipe\.milestones"):
        SGDRecipe.from_dict({"milestones": [60000]})


def test_hflip_boxes_and_masks_agree():
    img = torch.zeros(3, 8, 10)
    masks = torch.zeros(1, 8, 10, dtype=torch.uint8)
    masks[0, 2:5, 1:4] = 1      # x in [1, 4)
    img[:, 2:5, 1:4] = 1
    t = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1]), "masks": masks}
    fi, ft = hflip(img, t)
    assert ft["boxes"].tolist() == [[6.0, 2.0, 9.0, 5.0]]
    ys, xs = torch.nonzero(ft["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (6, 9)
    assert torch.equal(fi[0] > 0, ft["masks"][0] > 0)
    assert t["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]   # input untouched


def test_trainset_drops_crowd_and_flips_deterministically(tiny_data):
    base = CocoDetection(tiny_data["train"]["image_root"], tiny_data["train"]["ann_file"])
    assert int(base[0][1]["iscrowd"].sum()) == 1
    ds = TrainSet(base, seed=0, hflip_prob=0.5)
    _, t = ds[(0, 0)]
    assert len(t["boxes"]) == len(t["masks"]) == len(t["labels"]) == 1   # the crowd region is gone
    a, b = ds[(3, 2)], ds[(3, 2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    flips = {bool(torch.equal(ds[(e, 1)][0], base[1][0])) for e in range(8)}
    assert flips == {True, False}   # some epochs flip, some don't
    _, empty = ds[(0, len(base) - 1)]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape[0] == 0


def _final_state(run_dir):
    return torch.load(Path(run_dir) / "model_final.pt", map_location="cpu", weights_only=False)


def test_resume_is_bit_exact(tiny_data, tmp_path):
    torch.manual_seed(5)
    export = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
              if not k.startswith("fc.")}
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": export}, weights)
    kw = dict(detector=MICRO_DET, recipe=MICRO_RECIPE, data=tiny_data, weights=str(weights), seed=3,
              device="cpu", progress=False)
    full = run_finetune(run_dir=tmp_path / "full", **kw)
    assert full["steps"] == 5 and math.isfinite(full["final_loss"])
    part = run_finetune(run_dir=tmp_path / "split", stop_after=2, **kw)
    assert part["steps"] == 2 and not (tmp_path / "split" / "model_final.pt").exists()
    torch.manual_seed(12345)   # the resumed process's global RNG must not matter
    rest = run_finetune(run_dir=tmp_path / "split", **kw)
    assert rest["steps"] == 5 and rest["final_loss"] == full["final_loss"]
    assert run_finetune(run_dir=tmp_path / "full", **kw) == full   # a finished run is not retrained

    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "split")
    assert a["num_classes"] == 3 and a["detector"]["backbone"] == "resnet18"
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    log_a = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log_b if "event" in r] == [{"step": 2, "event": "resumed", "from": "checkpoint.pt"}]
    log_b = [r for r in log_b if "event" not in r]   # the resumed run says so in its log
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    report = json.loads((tmp_path / "full" / "load_report.json").read_text())
    assert report["groups"]["backbone"]["missing"] == [] and report["groups"]["backbone"]["loaded"]
    # pretrained weights are in the backbone and were trained from there
    assert not torch.equal(a["state_dict"]["backbone.body.conv1.weight"], export["conv1.weight"])


def test_divergence_propagates(tiny_data, tmp_path):
    with pytest.raises(Diverged):
        run_finetune(MICRO_DET, {**MICRO_RECIPE, "lr": 1e12, "warmup_steps": 0, "steps": 3}, tiny_data,
                     run_dir=tmp_path, weights=None, seed=0, device="cpu", progress=False)


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error(tiny_data, tmp_path, monkeypatch):
    import benchmark.stages.finetune as ft
    from methods.config import ConfigError
    monkeypatch.setattr(ft, "world", lambda: (0, 3))     # as if 3 processes ran it
    with pytest.raises(ConfigError, match=r"recipe\.batch_size: 2 is not divisible by 3 processes"):
        run_finetune(MICRO_DET, {**MICRO_RECIPE, "batch_size": 2}, tiny_data, run_dir=tmp_path, weights=None,
                     seed=0, device="cpu", progress=False)


def test_bad_data_and_weights_named(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"data\.train\.ann_file: missing"):
        run_finetune(MICRO_DET, MICRO_RECIPE, {"train": {"image_root": "x"}}, run_dir=tmp_path,
                     weights=None, seed=0, device="cpu")
    bad = tmp_path / "w.pt"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)}}, bad)
    with pytest.raises(RuntimeError, match=r"w\.pt: pretrained weights do not fit"):
        run_finetune(MICRO_DET, MICRO_RECIPE, tiny_data, run_dir=tmp_path / "r", weights=str(bad), seed=0,
                     device="cpu")


from tests.conftest import TINY_COCO


@pytest.mark.slow
def test_end_to_end_tiny_coco(tmp_path):
    from benchmark.stages.evaluate import run_evaluate
    data = {s: {"image_root": str(TINY_COCO / f"{s}2017"),
                "ann_file": str(TINY_COCO / "annotations" / f"instances_{s}2017.json")} for s in ("train", "val")}
    det = {**MICRO_DET, "fpn_channels": 64, "box_head_conv_dim": 64, "box_head_fc_dim": 256, "mask_head_dim": 64,
           "box_batch_size_per_image": 64, "rpn_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 500,
           "rpn_post_nms_top_n_train": 200, "rpn_pre_nms_top_n_test": 500, "rpn_post_nms_top_n_test": 200,
           "min_size": [112, 128], "max_size": 213, "test_min_size": 128}
    recipe = dict(steps=20, batch_size=4, lr=0.005, milestones=[0.75], warmup_steps=5, ckpt_every=10,
                  log_every=5, num_workers=0)
    out = run_finetune(det, recipe, data, run_dir=tmp_path / "ft", weights=None, seed=0, device="cpu")
    assert out["steps"] == 20 and math.isfinite(out["final_loss"])
    metrics = run_evaluate(str(tmp_path / "ft" / "model_final.pt"), data, run_dir=tmp_path / "ev", device="cpu")
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(0.0 <= v <= 100.0 for v in metrics["bbox"].values() if not math.isnan(v))
    det_json = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert set(det_json) == {"bbox", "segm"}
    assert json.loads((tmp_path / "ev" / "coco_metrics.json").read_text()).keys() == metrics.keys()
