"""Your own data: datasets by path on every command, their content in run keys,
`detbench data check`, no usable annotation, unreadable images skipped and counted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from benchmark.cli import main
from benchmark.data.errors import DataError
from benchmark.runs.store import RunStore
from conftest import MICRO_DATA, TINY_COCO


@pytest.fixture
def coco_folder(isolated):
    """A small COCO-format dataset in a folder of its own (made by the synthetic generator)."""
    from benchmark.data.synthetic import ensure_synthetic_dataset
    splits = ensure_synthetic_dataset(isolated / "gen", **{k: v for k, v in MICRO_DATA.items() if k != "kind"})
    root = isolated / "mydata"
    for s in ("train", "val"):
        shutil.copytree(splits[s]["image_root"], root / s)
        shutil.copy(splits[s]["ann_file"], root / f"{s}.json")
    return root


def _args(root: Path) -> list[str]:
    return ["--data", f"train={root}/train.json:{root}/train", "--data", f"val={root}/val.json:{root}/val"]


def _truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 3])


# ------------------------------------------------------------------ by path, at any scale
def test_set_outside_the_known_sections_is_an_error(isolated, capsys):
    assert main(["pretrain", "--method", "moco_v2", "--set", "data.kind=coco"]) == 2
    assert "reads no section 'data'" in capsys.readouterr().err
    assert not (isolated / "runs").exists() or not any((isolated / "runs").iterdir())


def test_data_args_name_splits_yaml_and_folders(coco_folder, tmp_path, monkeypatch):
    from benchmark.data.user import parse_data_args
    d = parse_data_args([f"train={coco_folder}/train.json:{coco_folder}/train",
                         f"val={coco_folder}/val.json:{coco_folder}/val"])
    assert d["kind"] == "coco" and d["train"]["ann_file"] == str(coco_folder / "train.json")
    assert d["pretrain"] == {"image_root": str(coco_folder / "train")}      # unlabeled train images
    # a dataset YAML: paths relative to its folder
    (coco_folder / "dataset.yaml").write_text(yaml.safe_dump(
        {"train": "train.json:train", "val": {"ann_file": "val.json", "image_root": "val"}}))
    assert parse_data_args([str(coco_folder / "dataset.yaml")]) == d
    # a COCO layout folder and a VOC year folder
    lay = parse_data_args([str(TINY_COCO)])
    assert lay["train"]["image_root"].endswith("train2017")
    assert lay["val"]["ann_file"].endswith("instances_val2017.json")
    monkeypatch.chdir(TINY_COCO.parent)    # a folder given relative to the working directory
    assert parse_data_args([TINY_COCO.name]) == lay
    voc = tmp_path / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for s in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{s}.txt").write_text("")
    assert parse_data_args([str(voc)]) == {"kind": "voc", "root": str(tmp_path.resolve()),
                                           "train": ["VOC2007/trainval"], "test": "VOC2007/test"}
    with pytest.raises(DataError, match="does not exist"):
        parse_data_args([f"train={coco_folder}/nope.json:{coco_folder}/train"])
    assert parse_data_args([str(tmp_path)]) == {"kind": "voc", "root": str(tmp_path)}   # a devkit
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset folder"):
        parse_data_args([str(tmp_path / "empty")])


def test_pretrain_and_finetune_on_a_dataset_given_by_path(coco_folder, capsys):
    assert main(["pretrain", "--method", "moco_v2", "--scale", "micro", *_args(coco_folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    store = RunStore()
    cfg = store.config(out["key"])
    assert cfg["data"]["pretrain"]["image_root"] == str(coco_folder / "train")
    assert set(cfg["data"]) == {"kind", "pretrain", "identity"}       # the splits it reads, by content
    assert main(["finetune", "--from", out["key"], "--scale", "micro", *_args(coco_folder)]) == 0
    ft = json.loads(capsys.readouterr().out)
    fcfg = store.config(ft["key"])
    assert fcfg["data"]["train"]["ann_file"] == str(coco_folder / "train.json") and "pretrain" not in fcfg["data"]
    assert ft["skipped_images"] == 0 and ft["model_sha256"]
    assert main(["evaluate", "--from", ft["key"]]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert store.config(ev["key"])["data"]["val"]["ann_file"] == str(coco_folder / "val.json")


def test_data_check_prints_statistics_and_lists_unreadable_files(coco_folder, capsys):
    assert main(["data", "check", *[a for a in _args(coco_folder) if a != "--data"]]) == 0
    out = capsys.readouterr().out
    assert "train: 8 images" in out and "val: 4 images" in out and "per image" in out
    assert "classes: 8" in out and "image size (w x h): min 64x64" in out and out.strip().endswith("ok")
    bad = sorted((coco_folder / "val").iterdir())[1]
    _truncate(bad)
    assert main(["data", "check", *[a for a in _args(coco_folder) if a != "--data"]]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: {bad}" in out and "1 undecodable image file(s): a run skips them" in out


# ------------------------------------------------------------------ identity by content
def test_fixing_an_annotation_file_in_place_is_a_new_run(coco_folder):
    from benchmark.experiments.config import finetune_config
    from benchmark.data.user import parse_data_args
    from benchmark.runs.identity import run_key
    data = parse_data_args([f"train={coco_folder}/train.json:{coco_folder}/train",
                            f"val={coco_folder}/val.json:{coco_folder}/val"])
    k1 = run_key(finetune_config(scale="micro", parent=None, data=data))
    assert k1 == run_key(finetune_config(scale="micro", parent=None, data=data))   # deterministic
    ann = json.loads((coco_folder / "val.json").read_text())
    ann["annotations"][0]["category_id"] = ann["categories"][-1]["id"]             # a label fixed in place
    (coco_folder / "val.json").write_text(json.dumps(ann))
    k2 = run_key(finetune_config(scale="micro", parent=None, data=data))
    assert k2 != k1
    # the hash is cached by path + mtime + size
    cache = json.loads((Path(__import__("os").environ["DETBENCH_CACHE"]) / "data-identity.json").read_text())
    assert str((coco_folder / "val.json").resolve()) in cache
    # an image replaced by another of a different size changes the key too (next command:
    # image fingerprints are taken once per process)
    img = sorted((coco_folder / "val").iterdir())[2]
    img.write_bytes(img.read_bytes() + b"\0")
    from benchmark.data import user
    user._MEMO.clear()
    assert run_key(finetune_config(scale="micro", parent=None, data=data)) not in (k1, k2)


def test_synthetic_keys_carry_no_identity():
    from benchmark.experiments.config import pretrain_config
    assert "identity" not in pretrain_config("moco_v2", scale="tiny")["data"]


def test_an_empty_annotations_list_is_an_error_naming_the_file(coco_folder, capsys):
    ann = json.loads((coco_folder / "train.json").read_text())
    ann["annotations"] = []
    (coco_folder / "train.json").write_text(json.dumps(ann))
    from benchmark.data.coco import CocoDetection
    with pytest.raises(DataError, match="no usable annotation") as e:
        CocoDetection(coco_folder / "train", coco_folder / "train.json")
    assert e.value.path == str(coco_folder / "train.json")
    assert main(["finetune", "--from", "scratch", "--scale", "micro", *_args(coco_folder)]) == 2
    assert "train.json: field 'annotations': no usable annotation" in capsys.readouterr().err


# ------------------------------------------------------------------ unreadable images
def test_a_truncated_image_is_skipped_counted_and_recorded_in_finetuning_and_evaluation(coco_folder, monkeypatch,
                                                                                        capsys):
    bad_train = sorted((coco_folder / "train").iterdir())[3]
    bad_val = sorted((coco_folder / "val").iterdir())[0]
    _truncate(bad_train)
    _truncate(bad_val)
    monkeypatch.setenv("DETBENCH_MAX_UNREADABLE", "0.3")
    # fine-tuning reads its images in a loader worker: the count reaches the run all the same
    assert main(["finetune", "--from", "scratch", "--scale", "micro", "--set", "finetune.num_workers=1",
                 *_args(coco_folder)]) == 0
    ft = json.loads(capsys.readouterr().out)
    assert ft["skipped_images"] == 1 and ft["skipped_files"] == [str(bad_train)]
    assert main(["evaluate", "--from", ft["key"]]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["skipped_images"] == 1 and ev["skipped_files"] == [str(bad_val)]
    # above the threshold: an error naming the files, the run marked failed
    monkeypatch.setenv("DETBENCH_MAX_UNREADABLE", "0.01")
    assert main(["finetune", "--from", "scratch", "--scale", "micro", "--schedule", "2x", *_args(coco_folder)]) == 2
    err = capsys.readouterr().err
    assert "1 of 8 images are unreadable" in err and str(bad_train) in err and "DETBENCH_MAX_UNREADABLE" in err


def test_pretraining_counts_images_skipped_in_loader_workers(isolated, monkeypatch):
    from benchmark.experiments.config import pretrain_config
    from benchmark.data.synthetic import ensure_synthetic_dataset
    from benchmark.runs.job import Job
    from benchmark.runner import run_job
    from benchmark.runs.identity import run_key
    splits = ensure_synthetic_dataset(isolated / "gen", **{k: v for k, v in MICRO_DATA.items() if k != "kind"})
    root = isolated / "pre"
    shutil.copytree(splits["pretrain"]["image_root"], root)
    bad = sorted(root.iterdir())[5]
    _truncate(bad)
    monkeypatch.setenv("DETBENCH_MAX_UNREADABLE", "0.1")
    cfg = pretrain_config("moco_v2", scale="micro", data={"kind": "coco", "pretrain": {"image_root": str(root)}})
    cfg["runtime"] = {**cfg["runtime"], "num_workers": 1}
    m = run_job(Job("pretrain", run_key(cfg), cfg), progress=False)
    assert m["skipped_images"] == 1 and m["skipped_files"] == [str(bad)]


def test_a_voc_folder_by_path_fine_tunes_and_evaluates_with_vocs_ap(isolated, capsys):
    from benchmark.data.synthetic import ensure_synthetic_voc
    devkit = ensure_synthetic_voc(isolated / "gen", **{k: v for k, v in MICRO_DATA.items() if k != "kind"})
    assert main(["finetune", "--from", "scratch", "--scale", "micro", "--data", str(devkit / "VOC2007")]) == 0
    ft = json.loads(capsys.readouterr().out)
    data = RunStore().config(ft["key"])["data"]
    assert data["kind"] == "voc" and "ellipse" in data["classes"]      # its own classes, from the XML files
    assert main(["evaluate", "--from", ft["key"]]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert RunStore().config(ev["key"])["protocol"] == "voc" and "AP50_11pt" in ev["bbox"]


def test_a_missing_image_read_in_a_loader_worker_is_one_line_naming_it(coco_folder, capsys, monkeypatch):
    import benchmark.data.user as user
    gone = sorted((coco_folder / "train").iterdir())[2]
    checked = user.preflight

    def then_gone(data):   # removed after the check before the run (a file system that changes under a run)
        checked(data)
        gone.unlink(missing_ok=True)
    monkeypatch.setattr(user, "preflight", then_gone)
    assert main(["finetune", "--from", "scratch", "--scale", "micro", "--set", "finetune.num_workers=1",
                 *_args(coco_folder)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("finetune:")]
    assert len(err) == 1 and err[0].startswith("detbench: error: ") and "Traceback" not in err[0]
    assert str(gone) in err[0] and "image file not found" in err[0]
