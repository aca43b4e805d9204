"""Category ids that differ between training and evaluation (issue 22, item 1).

A fine-tuned model's labels are positions in its training json's categories. Evaluation used
to map them onto the *val* json's categories by sorted id, so a val json numbering the same
classes differently scored the right boxes under the wrong names. Fine-tuning now records its
classes (``config.json``: ``classes``) and evaluation maps by name; a different class set is
an error naming both lists; a run stored before the record keeps the sorted-id rule."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.common.fs import sha256_file
from benchmark.data.errors import DataError
from benchmark.runs.identity import run_key
from benchmark.runs.store import RunStore
from benchmark.stages import evaluate as ev
from benchmark.stages.evaluate import map_by_name, run_evaluate
from benchmark.stages.finetune import record_classes, run_finetune
from tests.test_finetune import MICRO_DET

W = 64
HEIGHTS = (48, 56, 64, 72)          # one height per image: the oracle knows its image by it
# (image index, class name, box xywh): the scenes every json variant below describes
SCENES = [(0, "red", (4, 4, 20, 16)), (0, "green", (30, 20, 24, 20)),
          (1, "green", (8, 10, 30, 30)), (2, "red", (10, 30, 40, 20)), (2, "red", (40, 2, 16, 16)),
          (3, "green", (2, 40, 24, 24)), (3, "red", (34, 6, 22, 28))]
TRAIN_IDS = {"red": 3, "green": 7}                  # the training json: label 1 = red, 2 = green
PERMUTED = {"green": 3, "red": 7}                   # the same classes, the ids swapped
COLOURS = {"red": (220, 40, 40), "green": (40, 220, 40), "blue": (40, 40, 220)}


def write_coco(root, ids: dict[str, int], rename: dict[str, str] | None = None) -> dict:
    """The scenes as a COCO split under ``root``: categories named and numbered by ``ids`` (listed
    in reverse, as a file may), ``rename`` swaps a class name for another (a different class set)."""
    rename = rename or {}
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, h in enumerate(HEIGHTS):
        arr = np.full((h, W, 3), 30, np.uint8)
        for j, name, (x, y, w, hh) in SCENES:
            if j == i:
                arr[y:y + hh, x:x + w] = COLOURS[name]
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": W, "height": h})
    for j, name, (x, y, w, h) in SCENES:
        anns.append({"id": len(anns) + 1, "image_id": 10 + j, "category_id": ids[name], "iscrowd": 0,
                     "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    cats = [{"id": cid, "name": rename.get(n, n)} for n, cid in sorted(ids.items(), key=lambda kv: -kv[1])]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"image_root": str(root / "images"), "ann_file": str(ann_file)}


class Oracle(torch.nn.Module):
    """Detections in the training label space (1 = red, 2 = green): each object found, jittered,
    and on every other object a confident detection of the other class, so AP is neither 0 nor
    100 and depends on which class each label is scored as."""

    LABEL = {"red": 1, "green": 2}

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        outs = []
        for im in images:
            i = HEIGHTS.index(im.shape[-2])
            boxes, scores, labels = [], [], []
            for k, (j, name, (x, y, w, h)) in enumerate(SCENES):
                if j != i:
                    continue
                boxes.append([x + 1.0, y + 1.0, x + w, y + h])
                scores.append(0.5 + 0.05 * k)
                labels.append(self.LABEL[name])
                if k % 2:
                    boxes.append([float(x), float(y), x + w - 1.0, y + h - 1.0])
                    scores.append(0.95)
                    labels.append(3 - self.LABEL[name])
            outs.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores),
                         "labels": torch.tensor(labels, dtype=torch.int64)})
        return outs


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("cats")
    return {"train": write_coco(root / "train", TRAIN_IDS), "permuted": write_coco(root / "permuted", PERMUTED),
            "renumbered": write_coco(root / "renumbered", {"red": 11, "green": 5}),
            "other": write_coco(root / "other", TRAIN_IDS, rename={"green": "blue"})}


def _oracle_run(folder, classes):
    """A model folder as fine-tuning leaves it: model_final.pt and, for a run made with the
    record, ``classes`` in its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_final.pt").write_bytes(b"")   # never read: load_final_model gives the oracle
    cfg = {"stage": "finetune", "seed": 0}
    if classes is not None:
        cfg["classes"] = classes
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder / "model_final.pt")


def _by_name(dets, ids_from: dict, ids_to: dict):
    """Detections with each category id renamed from one numbering to another."""
    to = {ids_from[n]: ids_to[n] for n in ids_from}
    return [{**d, "category_id": to[d["category_id"]]} for d in dets]


TRAINED = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]    # label order: 1 = red, 2 = green


@pytest.mark.parametrize("protocol", ["coco", "voc"])
def test_permuted_category_ids_evaluate_identically(splits, tmp_path, monkeypatch, protocol):
    monkeypatch.setattr(ev, "load_final_model", lambda path: Oracle())
    model = _oracle_run(tmp_path / "ft", TRAINED)
    out = {}
    for name in ("train", "permuted", "renumbered"):
        out[name] = run_evaluate(model, {"val": splits[name]}, run_dir=tmp_path / name, device="cpu",
                                 progress=False, protocol=protocol)
        out[name + "_dets"] = json.loads((tmp_path / name / "detections.json").read_text())["bbox"]
    base = out["train"]["bbox"]
    assert 5 < base["AP50"] < 95, base        # the wrong-class detections cost something, not everything
    for name, ids in (("permuted", PERMUTED), ("renumbered", {"red": 11, "green": 5})):
        assert out[name] == out["train"], name
        assert out[name + "_dets"] == _by_name(out["train_dets"], TRAIN_IDS, ids)


def test_a_run_without_the_record_keeps_the_sorted_id_rule(splits, tmp_path, monkeypatch):
    """Runs stored before the record: label k is the k-th smallest id of the val json, right
    when the val json numbers as the training json did, wrong (as before) when it does not."""
    monkeypatch.setattr(ev, "load_final_model", lambda path: Oracle())
    old = _oracle_run(tmp_path / "old", None)
    new = _oracle_run(tmp_path / "new", TRAINED)
    same = [run_evaluate(m, {"val": splits["train"]}, run_dir=tmp_path / f"a{i}", device="cpu", progress=False)
            for i, m in enumerate((old, new))]
    assert same[0] == same[1]
    swapped = run_evaluate(old, {"val": splits["permuted"]}, run_dir=tmp_path / "b", device="cpu", progress=False)
    assert swapped["bbox"]["AP50"] < same[0]["bbox"]["AP50"] - 5


def test_a_different_class_set_is_an_error_naming_both_lists(splits, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_final_model", lambda path: Oracle())
    model = _oracle_run(tmp_path / "ft", TRAINED)
    with pytest.raises(DataError) as e:
        run_evaluate(model, {"val": splits["other"]}, run_dir=tmp_path / "ev", device="cpu", progress=False)
    msg = str(e.value)
    assert e.value.path == splits["other"]["ann_file"] and e.value.field == "categories"
    assert "trained on 2 classes [red, green]" in msg and "this file has 2 classes [red, blue]" in msg
    assert "only in training: green" in msg and "only in this file: blue" in msg
    assert "\n" not in msg and not (tmp_path / "ev" / "detections.json").exists()


def test_long_class_lists_are_shortened():
    trained = [{"id": i, "name": f"class{i:02d}"} for i in range(1, 81)]
    val = [{"id": i, "name": f"class{i:02d}"} for i in range(1, 80)] + [{"id": 80, "name": "zebra"}]
    with pytest.raises(DataError) as e:
        map_by_name(trained, val, "val.json")
    msg = str(e.value)
    assert "80 classes [class01, class02, class03, class04, class05, class06, class07, class08, ... (+72 more)]" in msg
    assert "only in training: class80;" in msg and "only in this file: zebra" in msg
    assert "\n" not in msg and len(msg) < 500
    dup = [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]
    with pytest.raises(DataError, match="category name 'a' is given to ids 1 and 2"):
        map_by_name([{"id": 1, "name": "a"}], dup, "val.json")
    assert map_by_name(trained, list(reversed(trained)), "val.json") == {k: k for k in range(1, 81)}


# ----------------------------------------------------------------------------- the real path
@pytest.fixture(scope="module")
def finetuned(splits, tmp_path_factory):
    """A micro fine-tuning run (2 steps) on the training split, in a folder holding the config
    the run store writes (``RunStore.begin``)."""
    root = tmp_path_factory.mktemp("ft")
    recipe = dict(steps=2, batch_size=2, lr=0.01, milestones=[0.6], warmup_steps=1, ckpt_every=100,
                  log_every=1, num_workers=0, hflip_prob=0.5)
    cfg = {"stage": "finetune", "scale": "micro", "seed": 0, "schedule": "1x", "parent": None,
           "detector": MICRO_DET, "recipe": recipe, "data": {"kind": "coco", "train": splits["train"],
                                                               "val": splits["train"]}}
    key = run_key(cfg)
    store = RunStore(root / "runs")
    run_dir = store.begin(key, cfg)
    torch.manual_seed(0)
    run_finetune(MICRO_DET, recipe, {"train": splits["train"]}, run_dir=run_dir, weights=None, seed=0,
                 device="cpu", progress=False)
    store.finish(key, {"model_sha256": sha256_file(run_dir / "model_final.pt")})
    return {"store": store, "key": key, "cfg": cfg, "run_dir": run_dir}


def test_finetune_records_its_classes_out_of_the_key(finetuned):
    store, key = finetuned["store"], finetuned["key"]
    stored = store.config(key)
    assert stored["classes"] == TRAINED          # label order: the training json's sorted ids
    assert {k: v for k, v in stored.items() if k != "classes"} == {**finetuned["cfg"], "key": key}
    assert run_key(stored) == key                # the record is not identity
    store.begin(key, finetuned["cfg"])           # a resumed run's config still hashes to its key
    record_classes(finetuned["run_dir"], TRAINED)   # the same classes again: nothing changes
    with pytest.raises(DataError, match=r"trained on 2 classes \[red, green\], its training data now has "
                                        r"2 classes \[green, red\]"):
        record_classes(finetuned["run_dir"], [{"id": 3, "name": "green"}, {"id": 7, "name": "red"}])


def test_a_finetuned_model_on_permuted_ids_reports_the_same(finetuned, splits, tmp_path):
    model = str(finetuned["run_dir"] / "model_final.pt")
    m = {n: run_evaluate(model, {"val": splits[n]}, run_dir=tmp_path / n, device="cpu", progress=False)
         for n in ("train", "permuted")}
    dets = {n: json.loads((tmp_path / n / "detections.json").read_text())["bbox"] for n in m}
    assert dets["train"], "the micro model detects nothing: the check below would be empty"
    assert dets["permuted"] == _by_name(dets["train"], TRAIN_IDS, PERMUTED)
    assert m["permuted"] == m["train"]


def test_the_cli_says_one_line(finetuned, splits, isolated, capsys):
    from benchmark.cli import main
    store = RunStore(isolated / "runs")
    shutil.copytree(finetuned["run_dir"], store.run_dir(finetuned["key"]))
    other = splits["other"]
    rc = main(["evaluate", "--from", finetuned["key"], "--runs", str(store.root), "--device", "cpu",
               "--data", f"val={other['ann_file']}:{other['image_root']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"detbench: error: {other['ann_file']}: field 'categories': the model was trained "
                             f"on 2 classes [red, green], this file has 2 classes [red, blue]")
