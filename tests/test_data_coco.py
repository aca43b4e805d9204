"""CocoDetection: targets, mask formats, a real COCO excerpt, and every bad-input error."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from benchmark.data.coco import CocoDetection, collate_fn
from benchmark.data.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from tests.conftest import TINY_COCO as TINY
W, H = 40, 30


def _rle_str(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _base_json() -> dict:
    rect = np.zeros((H, W), bool)
    rect[20:26, 2:12] = True
    crowd = np.zeros((H, W), bool)
    crowd[0:4, 30:40] = True
    return {
        "images": [
            {"id": 7, "file_name": "rgb.png", "width": W, "height": H},
            {"id": 3, "file_name": "sub/gray.png", "width": W, "height": H},
            {"id": 9, "file_name": "empty.png", "width": W, "height": H},
        ],
        "categories": [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 5, "name": "five"}],
        "annotations": [
            # polygon: a 10x10 square at (5, 5)
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100.0, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
            # compressed RLE
            {"id": 2, "image_id": 7, "category_id": 10, "bbox": [2, 20, 10, 6], "area": 60.0, "iscrowd": 0,
             "segmentation": _rle_str(rect)},
            # uncompressed RLE crowd region
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [30, 0, 10, 4], "area": 40.0, "iscrowd": 1,
             "segmentation": _uncompressed_rle(crowd)},
            {"id": 4, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, 4], "area": 16.0, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
        ],
    }


def _write(root: Path, data: dict, images: dict | None = None) -> tuple[Path, Path]:
    img_root = root / "images"
    (img_root / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if images is None:
        images = {
            "rgb.png": Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), "RGB"),
            "sub/gray.png": Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8), "L"),
            "empty.png": Image.fromarray(rng.integers(0, 255, (H, W, 4), dtype=np.uint8), "RGBA"),
        }
    for name, im in images.items():
        im.save(img_root / name)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return img_root, ann


@pytest.fixture
def toy(tmp_path):
    return _write(tmp_path, _base_json())


def test_targets_shapes_types_and_label_mapping(toy):
    ds = CocoDetection(*toy)
    assert ds.ids == [3, 7, 9]
    assert ds.num_classes == 3 and ds.class_names == ["three", "five", "ten"]
    assert ds.cat_id_to_contiguous == {3: 1, 5: 2, 10: 3}
    assert ds.contiguous_to_cat_id == {1: 3, 2: 5, 3: 10}
    img, t = ds[1]
    assert img.dtype == torch.float32 and img.shape == (3, H, W) and 0 <= img.min() and img.max() <= 1
    assert t["boxes"].dtype == torch.float32 and t["boxes"].tolist() == [[5, 5, 15, 15], [2, 20, 12, 26], [30, 0, 40, 4]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [1, 3, 2]
    assert t["iscrowd"].dtype == torch.int64 and t["iscrowd"].tolist() == [0, 0, 1]
    assert t["area"].dtype == torch.float32 and t["area"].tolist() == [100, 60, 40]
    assert t["image_id"].dtype == torch.int64 and t["image_id"].ndim == 0 and t["image_id"].item() == 7
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (3, H, W)
    rgb = np.asarray(Image.open(toy[0] / "rgb.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), rgb, atol=1e-6)


def test_mask_formats_decode(toy):
    _, t = CocoDetection(*toy)[1]
    poly, rle, crowd = t["masks"].numpy().astype(bool)
    ys, xs = np.nonzero(poly)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (5, 5, 14, 14) and poly.sum() == 100
    expect = np.zeros((H, W), bool)
    expect[20:26, 2:12] = True
    np.testing.assert_array_equal(rle, expect)
    expect = np.zeros((H, W), bool)
    expect[0:4, 30:40] = True
    np.testing.assert_array_equal(crowd, expect)


def test_grayscale_and_rgba_images_become_rgb(toy):
    ds = CocoDetection(*toy)
    gray, t = ds[0]
    assert gray.shape == (3, H, W)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert t["masks"].shape == (1, H, W)
    rgba, _ = ds[2]
    assert rgba.shape == (3, H, W)


def test_palette_image_becomes_rgb(tmp_path):
    data = _base_json()
    pal = Image.fromarray(np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)).convert("P")
    img_root, ann = _write(tmp_path, data)
    pal.save(img_root / "rgb.png")
    img, _ = CocoDetection(img_root, ann)[1]
    assert img.shape == (3, H, W)


def test_image_without_annotations_gives_empty_target(toy):
    ds = CocoDetection(*toy)
    _, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["iscrowd"].shape == (0,) and t["area"].shape == (0,)
    assert t["masks"].shape == (0, H, W) and t["masks"].dtype == torch.uint8
    assert CocoDetection(*toy, remove_images_without_annotations=True).ids == [3, 7]
    assert "masks" not in CocoDetection(*toy, with_masks=False)[1][1]


def test_transforms_and_collate(toy):
    def flip(img, tgt):
        return img.flip(-1), {**tgt, "flipped": True}

    ds = CocoDetection(*toy, transforms=flip)
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert targets[0]["flipped"] and targets[1]["image_id"].item() == 7
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    imgs, tgts = next(iter(loader))
    assert len(imgs) == len(tgts) == 3


def test_boxes_outside_image_are_clipped_and_degenerate_dropped(tmp_path, caplog):
    data = _base_json()
    data["annotations"] += [
        {"id": 10, "image_id": 9, "category_id": 3, "bbox": [-5, 25, 20, 20], "iscrowd": 0,
         "segmentation": [[0, 25, 15, 25, 15, 30, 0, 30]]},
        {"id": 11, "image_id": 9, "category_id": 3, "bbox": [35, 2, 0, 5], "iscrowd": 0},  # zero width
        {"id": 12, "image_id": 9, "category_id": 3, "bbox": [50, 2, 5, 5], "iscrowd": 0},  # fully outside
        {"id": 13, "image_id": 9, "category_id": 3, "bbox": [3, 3, 5, -1], "iscrowd": 0},  # negative height
    ]
    with caplog.at_level(logging.WARNING, logger="benchmark.data.coco"):
        ds = CocoDetection(*_write(tmp_path, data))
    assert ds.num_clipped == 1 and ds.num_dropped == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 boxes" in warnings[0].getMessage() and "3 boxes" in warnings[0].getMessage()
    _, t = ds[2]
    assert t["boxes"].tolist() == [[0, 25, 15, 30]]
    assert t["masks"].shape == (1, H, W)


# ------------------------------------------------------- real COCO excerpt (tests/data)
@pytest.mark.parametrize("split", ["train", "val"])
def test_real_tiny_coco(split):
    ann_file = TINY / "annotations" / f"instances_{split}2017.json"
    raw = json.loads(ann_file.read_text())
    ds = CocoDetection(TINY / f"{split}2017", ann_file)
    cats = sorted(raw["categories"], key=lambda c: c["id"])
    assert len(ds) == len(raw["images"]) and ds.ids == sorted(im["id"] for im in raw["images"])
    assert ds.num_classes == len(cats) and ds.class_names[0] == cats[0]["name"] == "person"
    assert ds.contiguous_to_cat_id[len(cats)] == cats[-1]["id"]
    sizes = {im["id"]: (im["height"], im["width"]) for im in raw["images"]}
    per_image = {im["id"]: 0 for im in raw["images"]}
    for a in raw["annotations"]:
        per_image[a["image_id"]] += 1
    ratios, boxes_seen, crowd_seen, empty_seen = [], 0, 0, 0
    for i in range(len(ds)):
        img, t = ds[i]
        _, h, w = img.shape
        image_id = int(t["image_id"])
        assert image_id == ds.ids[i] and (h, w) == sizes[image_id]
        n = len(t["boxes"])
        assert n <= per_image[image_id]
        boxes_seen += n
        assert t["masks"].shape == (n, h, w) and t["labels"].shape == (n,)
        if n == 0:
            empty_seen += 1
            continue
        assert 1 <= t["labels"].min() and t["labels"].max() <= ds.num_classes
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all() and (b[:, 2] > b[:, 0]).all()
        areas = t["masks"].flatten(1).sum(1).float()
        crowd = t["iscrowd"] == 1
        crowd_seen += int(crowd.sum())
        assert (areas[crowd] > 0).all()
        ratios += (areas[~crowd] / t["area"][~crowd]).tolist()
        big = ~crowd & (t["area"] > 500)
        assert ((areas[big] / t["area"][big] - 1).abs() < 0.15).all()
    # every annotation is a target or counted as dropped; the excerpt keeps crowd (RLE)
    # regions and images without annotations (tests/data/coco_excerpt/SOURCE.md)
    assert boxes_seen + ds.num_dropped == len(raw["annotations"])
    assert crowd_seen == sum(a["iscrowd"] for a in raw["annotations"]) > 0
    assert empty_seen >= sum(1 for v in per_image.values() if v == 0) > 0
    assert abs(float(np.median(ratios)) - 1) < 0.02


# -------------------------------------------------------------------------- errors
def _error(tmp_path, mutate, *, getitem=None, images=None) -> DataError:
    data = _base_json()
    mutate(data)
    img_root, ann = _write(tmp_path, data, images)
    with pytest.raises(DataError) as exc:
        ds = CocoDetection(img_root, ann)
        if getitem is not None:
            ds[getitem]
    return exc.value


def test_missing_ann_file(tmp_path):
    with pytest.raises(DataError) as exc:
        CocoDetection(tmp_path, tmp_path / "nope.json")
    assert exc.value.path == str(tmp_path / "nope.json") and exc.value.field == "ann_file"
    assert "nope.json" in str(exc.value) and "not found" in str(exc.value)


def test_malformed_json_reports_line_and_column(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError) as exc:
        CocoDetection(tmp_path, ann)
    msg = str(exc.value)
    assert msg.startswith(f"{ann}: field '<json>'") and "line 3 column 19" in msg


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    err = _error(tmp_path, lambda d: d.pop(key))
    assert err.path.endswith("ann.json") and err.field == key
    assert str(err).startswith(f"{tmp_path / 'ann.json'}: field '{key}': missing")


@pytest.mark.parametrize("key", ["bbox", "category_id", "image_id"])
def test_annotation_missing_field(tmp_path, key):
    err = _error(tmp_path, lambda d: d["annotations"][1].pop(key))
    assert err.path.endswith("ann.json") and err.field == f"annotations[1].{key}"
    assert "missing" in str(err) and "annotation id 2" in str(err)


@pytest.mark.parametrize("bbox", [[1, 2, 3], "1,2,3,4", [1, 2, "x", 4], [1, 2, None, 4], [1, 2, 3, 4, 5],
                                  [1, 2, float("nan"), 4], [True, 2, 3, 4]])
def test_bbox_not_four_numbers(tmp_path, bbox):
    err = _error(tmp_path, lambda d: d["annotations"][0].__setitem__("bbox", bbox))
    assert err.path.endswith("ann.json") and err.field == "annotations[0].bbox"
    assert "expected 4 numbers" in str(err)


def test_unknown_category_id(tmp_path):
    err = _error(tmp_path, lambda d: d["annotations"][2].__setitem__("category_id", 99))
    assert err.field == "annotations[2].category_id" and "99" in str(err) and "ann.json" in str(err)


def test_image_id_not_in_images(tmp_path):
    err = _error(tmp_path, lambda d: d["annotations"][3].__setitem__("image_id", 12345))
    assert err.field == "annotations[3].image_id" and "12345" in str(err) and "ann.json" in str(err)


def test_bad_segmentation_is_named(tmp_path):
    err = _error(tmp_path, lambda d: d["annotations"][1]["segmentation"].__setitem__("size", [5, 5]))
    assert err.field == "annotations[1].segmentation.size" and "ann.json" in str(err)


def test_missing_image_file_names_path_and_file_name(tmp_path):
    err = _error(tmp_path, lambda d: d["images"][0].__setitem__("file_name", "missing.png"), getitem=1)
    assert err.path == str(tmp_path / "images" / "missing.png")
    assert err.field == "images[0].file_name" and "not found" in str(err)
    assert "missing.png" in str(err)


def test_truncated_image_names_file(tmp_path):
    data = _base_json()
    img_root, ann = _write(tmp_path, data)
    good = (img_root / "rgb.png").read_bytes()
    (img_root / "rgb.png").write_bytes(good[: len(good) // 2])
    ds = CocoDetection(img_root, ann, skip_unreadable=False)   # (the default skips it: test_own_data)
    with pytest.raises(DataError) as exc:
        ds[1]
    assert exc.value.path == str(img_root / "rgb.png") and "cannot decode" in str(exc.value)
    (img_root / "rgb.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as exc:
        ds[1]
    assert exc.value.path == str(img_root / "rgb.png")


@pytest.mark.parametrize("key", ["width", "height"])
def test_image_size_mismatch_names_field(tmp_path, key):
    err = _error(tmp_path, lambda d: d["images"][1].__setitem__(key, 99), getitem=0)
    assert err.field == f"images[1].{key}" and err.path.endswith("gray.png")
    assert "99" in str(err) and "ann.json" in str(err)


def test_bad_image_entry(tmp_path):
    err = _error(tmp_path, lambda d: d["images"][2].pop("id"))
    assert err.field == "images[2].id" and err.path.endswith("ann.json")


def test_data_error_format_and_pickle():
    import pickle

    e = DataError("a/b.json", "bbox", "expected 4 numbers")
    assert str(e) == "a/b.json: field 'bbox': expected 4 numbers"
    assert isinstance(e, ValueError) and (e.path, e.field) == ("a/b.json", "bbox")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and type(e2) is DataError
