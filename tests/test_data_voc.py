"""The VOC loader: XML -> COCO records, named errors for bad files, the synthetic VOC layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.coco import CocoDetection
from benchmark.data.errors import DataError
from benchmark.data.voc import VocProtocol, ensure_voc_split, resolve_voc, voc_to_coco
from benchmark.data.voc_xml import parse_voc_xml, write_voc_xml

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2

CLASSES = ("cat", "dog")


def _xml(objects: str, width: int = 40, height: int = 30) -> str:
    return (f"<annotation><folder>VOC2007</folder><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def _obj(name="cat", box=(1, 1, 10, 10), difficult=0) -> str:
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name><truncated>0</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _devkit(root: Path, files: dict[str, str], sets: dict[str, list[str]], year: str = "VOC2007") -> Path:
    d = root / year
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for key, text in files.items():
        (d / "Annotations" / f"{key}.xml").write_text(text)
        Image.new("RGB", (40, 30), (10, 20, 30)).save(d / "JPEGImages" / f"{key}.jpg")
    for name, ids in sets.items():
        (d / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def test_conversion_boxes_difficult_and_loading(tmp_path):
    root = _devkit(tmp_path, {
        "000001": _xml(_obj("cat", (1, 1, 40, 30)) + _obj("dog", (5, 6, 9, 12), difficult=1)),
        "000002": _xml(_obj("dog", (11, 2, 20, 8))),
    }, {"trainval": ["000001"], "test": ["000002", "000001"]})
    _devkit(tmp_path, {"2008_000003": _xml(_obj("cat", (2, 3, 4, 5)))}, {"trainval": ["2008_000003"]}, "VOC2012")
    coco = voc_to_coco(root, ["VOC2007/test"], CLASSES)
    assert [i["file_name"] for i in coco["images"]] == ["VOC2007/JPEGImages/000002.jpg", "VOC2007/JPEGImages/000001.jpg"]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    a = coco["annotations"]
    # 1-based inclusive -> 0-based continuous: (1, 1, 40, 30) covers the whole 40x30 image
    assert a[1]["bbox"] == [0.0, 0.0, 40.0, 30.0] and a[1]["area"] == 1200.0
    assert a[0]["bbox"] == [10.0, 1.0, 10.0, 7.0] and a[0]["category_id"] == 2
    assert [(x["difficult"], x["iscrowd"]) for x in a] == [(0, 0), (0, 0), (1, 1)]

    # training keeps difficult objects as ordinary ones (detectron2), both years in one json
    split = resolve_voc({"kind": "voc", "root": str(root), "classes": list(CLASSES)}, tmp_path / "cache")
    train = json.loads(Path(split["train"]["ann_file"]).read_text())
    assert [i["voc_id"] for i in train["images"]] == ["VOC2007/000001", "VOC2012/2008_000003"]
    assert [(x["difficult"], x["iscrowd"]) for x in train["annotations"]] == [(0, 0), (1, 0), (0, 0)]
    ds = CocoDetection(split["val"]["image_root"], split["val"]["ann_file"], with_masks=False)
    img, tgt = ds[1]
    assert img.shape == (3, 30, 40)
    assert tgt["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0], [4.0, 5.0, 9.0, 12.0]]
    assert tgt["labels"].tolist() == [1, 2] and tgt["iscrowd"].tolist() == [0, 1]
    ds_train = CocoDetection(split["train"]["image_root"], split["train"]["ann_file"], with_masks=False)
    assert len(ds_train) == 2 and ds_train[1][1]["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]


def test_cache_follows_content(tmp_path):
    root = _devkit(tmp_path, {"1": _xml(_obj())}, {"test": ["1"]})
    a = ensure_voc_split(root, ["VOC2007/test"], CLASSES, cache_dir=tmp_path / "c")
    assert ensure_voc_split(root, ["VOC2007/test"], CLASSES, cache_dir=tmp_path / "c") == a
    (root / "VOC2007" / "Annotations" / "1.xml").write_text(_xml(_obj(box=(2, 2, 10, 10))))
    b = ensure_voc_split(root, ["VOC2007/test"], CLASSES, cache_dir=tmp_path / "c")
    assert b["ann_file"] != a["ann_file"]
    assert json.loads(Path(b["ann_file"]).read_text())["annotations"][0]["bbox"] == [1.0, 1.0, 9.0, 9.0]


@pytest.mark.parametrize("text, field, words", [
    ("<annotation><size><width>4", "<xml>", "malformed XML"),
    (_xml(_obj(box=(1, 1, 41, 10))), "object[0].bndbox.xmax", "outside the image"),
    (_xml(_obj() + _obj(box=(1, -3, 5, 5))), "object[1].bndbox.ymin", "outside the image"),
    (_xml(_obj(box=(8, 1, 5, 10))), "object[0].bndbox", "empty box"),
    (_xml(_obj("horse")), "object[0].name", "unknown class 'horse'"),
    (_xml(""), "object", "empty annotation set"),
    (_xml(_obj()).replace("<width>40</width>", ""), "size.width", "missing"),
    (_xml(_obj()).replace("<width>40", "<width>wide"), "size.width", "expected a number"),
    (_xml(_obj(difficult=2)), "object[0].difficult", "expected 0 or 1"),
])
def test_bad_xml_names_file_and_field(tmp_path, text, field, words):
    p = tmp_path / "000007.xml"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        parse_voc_xml(p, CLASSES)
    assert e.value.path == str(p) and e.value.field == field and words in e.value.message
    assert str(p) in str(e.value)


def test_missing_files_are_named(tmp_path):
    root = _devkit(tmp_path, {"1": _xml(_obj())}, {"test": ["1", "2"], "empty": []})
    with pytest.raises(DataError, match="annotation file not found") as e:
        ensure_voc_split(root, ["VOC2007/test"], CLASSES, cache_dir=tmp_path / "c")
    assert e.value.path.endswith("VOC2007/Annotations/2.xml")
    with pytest.raises(DataError, match="image set file not found") as e:
        voc_to_coco(root, ["VOC2007/val"], CLASSES)
    assert e.value.path.endswith("ImageSets/Main/val.txt")
    with pytest.raises(DataError, match="empty image set"):
        voc_to_coco(root, ["VOC2007/empty"], CLASSES)
    with pytest.raises(DataError, match="VOC devkit folder not found"):
        resolve_voc({"kind": "voc", "root": str(tmp_path / "nowhere")}, tmp_path / "c")
    with pytest.raises(DataError, match="expected a non-empty list") as e:
        resolve_voc({"kind": "voc", "root": str(root), "train": "VOC2007/trainval"}, tmp_path / "c")
    assert e.value.field == "data.train"
    with pytest.raises(DataError, match="unknown key"):
        resolve_voc({"kind": "voc", "root": str(root), "years": 2007}, tmp_path / "c")


def test_write_then_parse_round_trip(tmp_path):
    objs = [{"name": "dog", "box": (0, 3, 17, 30), "difficult": 1, "truncated": 1},
            {"name": "cat", "box": (5, 5, 6, 6), "difficult": 0, "truncated": 0}]
    write_voc_xml(tmp_path / "a.xml", folder="VOC2007", filename="a.jpg", width=40, height=30, objects=objs)
    rec = parse_voc_xml(tmp_path / "a.xml", CLASSES)
    assert (rec["width"], rec["height"]) == (40, 30)
    assert [(o["name"], o["label"], o["box"], o["difficult"], o["truncated"]) for o in rec["objects"]] == [
        ("dog", 2, (0.0, 3.0, 17.0, 30.0), 1, 1), ("cat", 1, (5.0, 5.0, 6.0, 6.0), 0, 0)]


def test_protocol_defaults_are_the_papers():
    p = VocProtocol()
    assert (p.iterations, p.batch_size, p.lr, p.lr_steps, p.warmup_iterations) == (24000, 16, 0.02, (18000, 22000), 100)
    assert p.min_size_train == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800) and p.min_size_test == 800
    assert p.seeds == 5 and p.train_sets == ("VOC2007/trainval", "VOC2012/trainval") and p.test_set == "VOC2007/test"
    assert len(p.classes) == 20 and p.classes[0] == "aeroplane" and p.classes[-1] == "tvmonitor"


def test_synthetic_scenes_in_voc_layout(isolated):
    from benchmark.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_dataset
    from benchmark.common.paths import cache_root
    from benchmark.data.resolve import resolve_data
    params = {"image_size": 128, "num_pretrain": 2, "num_train": 4, "num_val": 8, "seed": 0}
    coco = ensure_synthetic_dataset(cache_root(), **params)
    before = {s: Path(v["ann_file"]).read_bytes() for s, v in coco.items()}
    data = resolve_data({"kind": "voc", "synthetic": params})
    root = Path(coco["train"]["ann_file"]).parent.parent
    assert ensure_synthetic_dataset(cache_root(), **params) == coco          # same COCO cache key
    assert {s: Path(v["ann_file"]).read_bytes() for s, v in coco.items()} == before
    main = root / "voc" / "VOC2007" / "ImageSets" / "Main"
    assert (main / "trainval.txt").read_text().split() == [f"{i:06d}" for i in range(4)]
    assert (main / "test.txt").read_text().split() == [f"{i:06d}" for i in range(4, 12)]
    # the VOC val split holds the COCO val boxes, classes and image sizes
    src = json.loads(Path(coco["val"]["ann_file"]).read_text())
    got = json.loads(Path(data["val"]["ann_file"]).read_text())
    assert [c["name"] for c in got["categories"]] == SYNTHETIC_CLASSES
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in got["annotations"]] == \
        [(a["image_id"], a["category_id"], [float(v) for v in a["bbox"]]) for a in src["annotations"]]
    small = [a["area"] < 0.004 * 128 * 128 for a in src["annotations"]]
    assert any(small) and [a["difficult"] for a in got["annotations"]] == [int(s) for s in small]
    assert [a["iscrowd"] for a in got["annotations"]] == [int(s) for s in small]   # ignored at test time
    ds = CocoDetection(data["val"]["image_root"], data["val"]["ann_file"], with_masks=False)
    img, _ = ds[0]
    ref = np.asarray(Image.open(Path(coco["val"]["image_root"]) / "000000.png"), dtype=np.float32) / 255
    assert img.shape == (3, 128, 128) and np.abs(img.permute(1, 2, 0).numpy() - ref).mean() < 0.03  # JPEG q95
