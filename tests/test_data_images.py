"""ImageSource and the pretraining dataset over it: listing, records, corrupt-image skips,
determinism of views whatever the DataLoader workers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data.errors import CorruptImage, DataError
from benchmark.data.images import ImageSource
from benchmark.stages.pretrain import PretrainDataset

from tests.conftest import TINY_COCO as TINY


def _save(path: Path, seed: int, mode: str = "RGB", size=(12, 9)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "b.png", 0)
    _save(root / "a.JPG", 1)
    _save(root / "sub" / "c.jpeg", 2, mode="L")
    _save(root / "sub" / "deeper" / "d.png", 3)
    (root / "notes.txt").write_text("not an image")
    return root


class _Method:
    """The part of a method the dataset calls: views of a record, drawn with its rng."""
    needs_source = False

    def views(self, record, rng, source=None):
        return {"index": record["index"], "mean": float(record["image"].mean()), "r": float(rng.random())}


def _dataset(src, seed=0):
    return PretrainDataset(src, _Method(), seed)


def test_from_folder_recursive_sorted_case_insensitive(folder):
    src = ImageSource.from_folder(folder)
    assert [src.path(i).relative_to(folder).as_posix() for i in range(len(src))] == [
        "a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.png"]
    assert len(ImageSource.from_folder(folder, exts=(".png",))) == 2


def test_record_is_rgb_uint8(folder):
    src = ImageSource.from_folder(folder)
    rec = src.record(2)  # grayscale jpeg
    assert rec["index"] == 2 and rec["image_id"] == 2 and rec["path"] == str(folder / "sub" / "c.jpeg")
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (9, 12, 3)
    np.testing.assert_array_equal(rec["image"][..., 0], rec["image"][..., 2])
    np.testing.assert_array_equal(src.record(1)["image"], np.asarray(Image.open(folder / "b.png")))


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(DataError) as exc:
        ImageSource.from_folder(tmp_path / "nope")
    assert exc.value.path == str(tmp_path / "nope") and exc.value.field == "root" and "not found" in str(exc.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(DataError) as exc:
        ImageSource.from_folder(tmp_path / "empty")
    assert exc.value.path == str(tmp_path / "empty") and "no images" in str(exc.value)


def test_from_coco(tmp_path):
    _save(tmp_path / "im" / "x.png", 0)
    _save(tmp_path / "im" / "y.png", 1)
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 20, "file_name": "y.png", "width": 12, "height": 9},
                                          {"id": 5, "file_name": "x.png", "width": 12, "height": 9}],
                               "annotations": [], "categories": [{"id": 1, "name": "t"}]}))
    src = ImageSource.from_coco(tmp_path / "im", ann)
    assert len(src) == 2 and src.path(0).name == "x.png" and src.record(1)["image_id"] == 20
    with pytest.raises(DataError) as exc:
        ImageSource.from_coco(tmp_path / "im", tmp_path / "missing.json")
    assert "missing.json" in str(exc.value)
    with pytest.raises(DataError) as exc:
        ImageSource.from_coco(tmp_path / "nodir", ann)
    assert exc.value.field == "image_root"


def test_from_real_tiny_coco():
    ann_file = TINY / "annotations" / "instances_val2017.json"
    images = json.loads(ann_file.read_text())["images"]
    src = ImageSource.from_coco(TINY / "val2017", ann_file)
    assert len(src) == len(images) > 0
    assert {src.path(i).name for i in range(len(src))} == {im["file_name"] for im in images}
    rec = src.record(0)
    im = next(im for im in images if im["id"] == rec["image_id"])
    assert rec["image"].shape == (im["height"], im["width"], 3) and rec["image"].dtype == np.uint8


def test_corrupt_image_raises_corrupt_image(folder):
    (folder / "b.png").write_bytes(b"\x89PNG garbage")
    src = ImageSource.from_folder(folder)
    with pytest.raises(CorruptImage) as exc:
        src.record(1)
    assert isinstance(exc.value, DataError) and exc.value.path == str(folder / "b.png")


def test_pretraining_dataset_skips_and_logs_once(folder, caplog):
    (folder / "b.png").write_bytes(b"truncated")
    ds = _dataset(ImageSource.from_folder(folder))
    with caplog.at_level(logging.WARNING, logger="benchmark.stages.pretrain"):
        first = ds[(0, 1)]
        again = ds[(0, 1)]
    assert first["index"] == 2 and again == first  # next readable image, same rng as index 1
    assert ds.skipped == {str(folder / "b.png")}
    warnings = [r for r in caplog.records if "b.png" in r.getMessage()]
    assert len(warnings) == 1
    assert ds[(0, 0)]["index"] == 0 and ds[(0, 3)]["index"] == 3


def test_pretraining_dataset_wraps_and_all_corrupt_raises(folder):
    src = ImageSource.from_folder(folder)
    (folder / "sub" / "deeper" / "d.png").write_bytes(b"bad")
    assert _dataset(src)[(0, 3)]["index"] == 0
    for i in range(len(src)):
        src.path(i).write_bytes(b"bad")
    with pytest.raises(DataError, match="unreadable"):
        _dataset(src)[(0, 0)]


def test_rng_from_seed_epoch_index(folder):
    src = ImageSource.from_folder(folder)
    a, b = _dataset(src, seed=1), _dataset(src, seed=1)
    assert [a[(0, i)] for i in range(4)] == [b[(0, i)] for i in range(4)]
    assert a[(0, 0)]["r"] != a[(0, 1)]["r"]
    assert _dataset(src, seed=2)[(0, 0)]["r"] != a[(0, 0)]["r"]
    assert a[(1, 0)]["r"] != a[(0, 0)]["r"] and a[(1, 0)] == b[(1, 0)]


def _collect(ds, workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=[(3, i) for i in range(len(ds))],
                                         num_workers=workers)
    return [d["r"] for d in loader]


def test_views_do_not_depend_on_worker_count(folder):
    ds = _dataset(ImageSource.from_folder(folder), seed=7)
    assert _collect(ds, 0) == _collect(ds, 2)
