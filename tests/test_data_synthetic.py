"""Synthetic multi-object scenes: determinism, masks vs boxes, occlusion, COCO output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from benchmark.data import synthetic
from benchmark.data.coco import CocoDetection
from benchmark.data.synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_split,
    image_rng,
    render_image,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2

SIZE = 64


def _files(split_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(split_dir)): p.read_bytes() for p in sorted(split_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return generate_split(root, 12, SIZE, seed=0, split="train")


def test_layout_and_categories(split):
    data = json.loads(split.read_text())
    assert split.name == "annotations.json" and split.parent.name == "train"
    assert len(data["images"]) == 12
    for img in data["images"]:
        assert (split.parent / "images" / img["file_name"]).is_file()
        assert (img["width"], img["height"]) == (SIZE, SIZE)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert [c["name"] for c in data["categories"]] == SYNTHETIC_CLASSES
    assert len(SYNTHETIC_CLASSES) >= 6
    per_image = {img["id"]: 0 for img in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]] += 1
        assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
    assert all(1 <= n <= 6 for n in per_image.values())
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_split(tmp_path / "a", 6, SIZE, seed=3, split="val")
    b = generate_split(tmp_path / "b", 6, SIZE, seed=3, split="val")
    c = generate_split(tmp_path / "c", 6, SIZE, seed=4, split="val")
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert fa == fb
    assert fa["annotations.json"] != fc["annotations.json"]
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".png"))


def test_images_independent_of_split_length_and_other_splits(tmp_path):
    short = generate_split(tmp_path / "s", 3, SIZE, seed=1, split="train")
    long = generate_split(tmp_path / "l", 6, SIZE, seed=1, split="train")
    other = generate_split(tmp_path / "l", 3, SIZE, seed=1, split="val")
    for name in ("000000.png", "000001.png", "000002.png"):
        assert (short.parent / "images" / name).read_bytes() == (long.parent / "images" / name).read_bytes()
        assert (short.parent / "images" / name).read_bytes() != (other.parent / "images" / name).read_bytes()


def test_masks_agree_with_boxes_and_areas(split):
    data = json.loads(split.read_text())
    min_area = max(synthetic.MIN_VISIBLE_PIXELS, synthetic.MIN_VISIBLE_FRACTION * SIZE * SIZE)
    for a in data["annotations"]:
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
        assert m.sum() == a["area"] >= min_area


def test_masks_are_visible_pixels_and_occlusion_reduces_area():
    reduced = dropped = 0
    for index in range(40):
        full: list[np.ndarray] = []
        image, instances = render_image(image_rng(0, "occl", index), SIZE, full_masks=full)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        min_area = max(synthetic.MIN_VISIBLE_PIXELS, synthetic.MIN_VISIBLE_FRACTION * SIZE * SIZE)
        expected = []
        for k, f in enumerate(full):
            later = np.zeros_like(f)
            for g in full[k + 1:]:
                later |= g
            vis = f & ~later
            reduced += int(0 < vis.sum() < f.sum())
            if vis.sum() >= min_area:
                expected.append(vis)
            else:
                dropped += 1
        assert len(expected) == len(instances) >= 1
        for vis, (_, mask) in zip(expected, instances):
            np.testing.assert_array_equal(mask, vis)
        union = np.zeros((SIZE, SIZE), dtype=int)
        for _, mask in instances:
            union += mask
        assert union.max() <= 1  # visible masks never overlap
    assert reduced > 0 and dropped > 0


def test_object_counts_respect_limits_and_classes_vary():
    seen = set()
    for index in range(60):
        _, inst = render_image(image_rng(5, "train", index), SIZE, min_objects=2, max_objects=3)
        assert 2 <= len(inst) <= 3
        seen.update(c for c, _ in inst)
    assert len(seen) == len(SYNTHETIC_CLASSES)


def test_scale_range_bounds_object_size_and_enters_the_cache_key_only_when_set(tmp_path):
    def full_sides(**kw):
        sides = []
        for index in range(40):
            full = []
            render_image(image_rng(2, "train", index), 128, min_objects=1, max_objects=2, full_masks=full, **kw)
            for m in full:  # unoccluded masks; skip those cut by the border
                ys, xs = np.nonzero(m)
                if len(xs) and xs.min() > 0 and ys.min() > 0 and xs.max() < 127 and ys.max() < 127:
                    sides.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
        return np.array(sides)

    big = full_sides(min_scale=0.3, max_scale=0.5)
    # a shape's extent is at most its drawn size (0.5 * 128 = 64 px, rotation adds <= sqrt(2))
    assert len(big) > 10 and big.max() <= 64 * 1.42 + 1 and np.median(big) > np.median(full_sides())
    with pytest.raises(ValueError, match="min_scale"):
        render_image(image_rng(0, "train", 0), 64, min_scale=0.5, max_scale=0.2)
    # defaults keep the old key; a different range gets its own dataset
    kw = dict(image_size=SIZE, num_pretrain=1, num_train=1, num_val=1)
    default = ensure_synthetic_dataset(tmp_path, **kw)
    explicit = ensure_synthetic_dataset(tmp_path, **kw, min_scale=synthetic.MIN_SCALE, max_scale=synthetic.MAX_SCALE)
    other = ensure_synthetic_dataset(tmp_path, **kw, min_scale=0.2, max_scale=0.6)
    assert default == explicit and other["train"] != default["train"]
    assert synthetic.dataset_key(image_size=SIZE, num_pretrain=1, num_train=1, num_val=1, seed=0, min_objects=1,
                                 max_objects=6) in default["train"]["ann_file"]


def test_loads_with_coco_detection_and_pycocotools_agrees(split):
    from pycocotools.coco import COCO

    ds = CocoDetection(split.parent / "images", split)
    coco = COCO(str(split))
    assert ds.num_classes == len(SYNTHETIC_CLASSES) and ds.class_names == SYNTHETIC_CLASSES
    assert ds.ids == sorted(coco.getImgIds())
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, SIZE, SIZE)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=ds.ids[i]))
        assert len(anns) == len(target["boxes"]) >= 1
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            assert target["boxes"][k].tolist() == pytest.approx([x, y, x + w, y + h])
            assert target["labels"][k].item() == a["category_id"]
            np.testing.assert_array_equal(target["masks"][k].numpy(), coco.annToMask(a))


def test_pixels_differ_inside_and_outside_objects(split):
    """Objects are drawn where their masks are: the image is not blank background."""
    data = json.loads(split.read_text())
    img = np.asarray(Image.open(split.parent / "images" / data["images"][0]["file_name"]))
    assert img.std() > 5


def test_crash_leaves_no_half_split(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_image

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", flaky)
    with pytest.raises(RuntimeError):
        generate_split(tmp_path, 5, SIZE, seed=0, split="train")
    assert list(tmp_path.iterdir()) == []


def test_regenerating_replaces_existing_split(tmp_path):
    generate_split(tmp_path, 4, SIZE, seed=0, split="train")
    ann = generate_split(tmp_path, 2, SIZE, seed=0, split="train")
    assert len(json.loads(ann.read_text())["images"]) == 2
    assert len(list((ann.parent / "images").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_ensure_generates_once_and_only_missing_splits(tmp_path, monkeypatch):
    kw = dict(image_size=SIZE, num_pretrain=4, num_train=2, num_val=2, seed=0)
    paths = ensure_synthetic_dataset(tmp_path, **kw)
    assert set(paths) == {"pretrain", "train", "val"}
    root = Path(paths["train"]["ann_file"]).parent.parent
    assert root.parent == tmp_path and root.name.startswith("synthetic-")
    for split, p in paths.items():
        assert isinstance(p["image_root"], str) and isinstance(p["ann_file"], str)
        n = len(json.loads(Path(p["ann_file"]).read_text())["images"])
        assert n == kw[f"num_{split}"]
        assert len(list(Path(p["image_root"]).iterdir())) == n

    made = []
    real = synthetic.generate_split
    monkeypatch.setattr(synthetic, "generate_split", lambda root, n, size, seed, split, *a, **k:
                        made.append(split) or real(root, n, size, seed, split, *a, **k))
    assert ensure_synthetic_dataset(tmp_path, **kw) == paths
    assert made == []
    import shutil
    shutil.rmtree(root / "val")
    assert ensure_synthetic_dataset(tmp_path, **kw) == paths
    assert made == ["val"]

    other = ensure_synthetic_dataset(tmp_path, **{**kw, "seed": 1})
    assert Path(other["train"]["ann_file"]).parent.parent != root
