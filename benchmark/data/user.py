"""Your own data: a dataset given by path on the command line, its identity in run keys, and
``detbench data check``.

``--data`` takes, repeatably:

- ``train=ANN.json:IMAGES/``, ``val=...``, ``pretrain=IMAGES/`` (or ``pretrain=ANN.json:IMAGES/``):
  COCO-format splits (pretraining defaults to the train images, unlabeled);
- ``path/to/dataset.yaml``: a data config (``kind: coco`` with ``pretrain/train/val``, each
  ``{image_root, ann_file}`` or ``"ANN.json:IMAGES/"``; or ``kind: voc`` with ``root``),
  relative paths read from the YAML file's folder;
- a folder: a VOC year folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``), a VOC
  devkit holding such folders, or a COCO layout (``annotations/instances_<split>.json`` beside
  ``<split>/`` image folders).

A dataset given by path enters a run's key by its content (``identity``): each annotation
file's sha256 and a fingerprint of its images (names and sizes of all, bytes of the first,
middle and last), so a fixed annotation file is a new run, never a stale reuse. Symlinked
folders are followed (each real folder once). Hashes of annotation files are cached by path,
inode, mtime, ctime and size under the dataset cache (an edit that restores the old mtime
still changes the ctime); image fingerprints are taken once per process (one command sees
one state of its data).
"""
from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import yaml

from benchmark.common.fs import atomic_write_json, file_lock, walk_files
from benchmark.common.paths import cache_root
from benchmark.data.coco import CocoDetection
from benchmark.data.errors import CorruptImage, DataError
from benchmark.data.images import ImageSource
from benchmark.data.io import read_rgb, read_size
from benchmark.data.resolve import resolve_data
from benchmark.data.voc import VOC_CLASSES, voc_years

SPLITS = ("pretrain", "train", "val")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------- parsing
def _split(value, where: str, base: Path) -> dict:
    """``"ANN.json:IMAGES/"`` | ``"IMAGES/"`` | ``{image_root, ann_file}`` -> absolute paths."""
    if isinstance(value, str):
        ann, sep, images = value.partition(":")
        value = {"ann_file": ann, "image_root": images} if sep else {"image_root": ann}
        if sep and not ann.endswith(".json"):
            raise DataError(ann, where, "expected ANN.json:IMAGES/ (a COCO json, a colon, its image folder)")
    if not isinstance(value, dict):
        raise DataError("<data>", where, f"expected ANN.json:IMAGES/ or {{image_root, ann_file}}, got {value!r}")
    unknown = sorted(set(value) - {"image_root", "ann_file"})
    if unknown:
        raise DataError("<data>", f"{where}.{unknown[0]}", "unknown key (known: ann_file, image_root)")
    if not value.get("image_root"):
        raise DataError("<data>", f"{where}.image_root", "missing")
    out = {}
    for k in ("image_root", "ann_file"):
        if value.get(k):
            p = Path(os.path.expanduser(str(value[k])))
            p = (base / p) if not p.is_absolute() else p
            if not p.exists():
                raise DataError(p, f"{where}.{k}", "does not exist")
            out[k] = str(p.resolve())
    return out


def _coco_splits(splits: dict, base: Path, where: str = "data") -> dict:
    out = {"kind": "coco"}
    for name, v in splits.items():
        if name not in SPLITS:
            raise DataError("<data>", f"{where}.{name}", f"unknown split (known: {', '.join(SPLITS)})")
        out[name] = _split(v, f"{where}.{name}", base)
        if name in ("train", "val") and "ann_file" not in out[name]:
            raise DataError("<data>", f"{where}.{name}.ann_file", "missing: a labeled split needs ANN.json:IMAGES/")
    if "pretrain" not in out and "train" in out:   # pretraining reads the train images, unlabeled
        out["pretrain"] = {"image_root": out["train"]["image_root"]}
    return out


def _folder(path: Path) -> dict:
    """A dataset folder: VOC year folder, VOC devkit, or COCO layout (any path: made absolute)."""
    path = path.resolve()
    if (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir():
        sets = path / "ImageSets" / "Main"
        train = "trainval" if (sets / "trainval.txt").is_file() else "train"
        test = next((s for s in ("test", "val") if (sets / f"{s}.txt").is_file() and s != train), None)
        if test is None or not (sets / f"{train}.txt").is_file():
            raise DataError(sets, "ImageSets/Main", "a VOC folder needs trainval.txt (or train.txt) and test.txt "
                                                   "(or val.txt)")
        out = {"kind": "voc", "root": str(path.parent.resolve()), "train": [f"{path.name}/{train}"],
               "test": f"{path.name}/{test}"}
        classes = _voc_classes([path])
        return {**out, "classes": classes} if classes else out
    years = sorted(p.name for p in path.glob("VOC*") if (p / "Annotations").is_dir())
    if years:
        classes = _voc_classes([path / y for y in years])
        return {"kind": "voc", "root": str(path.resolve()), **({"classes": classes} if classes else {})}
    anns = {p.stem[len("instances_"):]: p for p in sorted((path / "annotations").glob("instances_*.json"))}
    if anns:
        train = next((s for s in anns if s.startswith("train")), None)
        val = next((s for s in anns if s.startswith("val")), None)
        if train is None or val is None:
            raise DataError(path / "annotations", "instances_*.json",
                            f"a COCO layout needs instances_train*.json and instances_val*.json, found {sorted(anns)}")
        return _coco_splits({s: {"ann_file": anns[n], "image_root": path / n} for s, n in (("train", train),
                                                                                        ("val", val))}, path)
    raise DataError(path, "--data", "not a dataset folder: expected a VOC folder (Annotations/, ImageSets/Main/), "
                                    "a VOC devkit (VOC2007/, ...) or a COCO layout (annotations/instances_*.json)")


def _voc_classes(years: list[Path]) -> list[str] | None:
    """The object names of a VOC folder's XML files, when they are not PASCAL VOC's 20 classes
    (your own classes, sorted); None when they are (VOC's order and ids)."""
    names = set()
    for y in years:
        for x in sorted((y / "Annotations").glob("*.xml")):
            try:
                names.update((o.findtext("name") or "").strip() for o in ET.parse(x).getroot().iter("object"))
            except ET.ParseError:
                continue   # the loader names the malformed file
    names.discard("")
    return None if names <= set(VOC_CLASSES) else sorted(names)


def load_dataset_yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(path, "<yaml>", f"invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise DataError(path, "<root>", f"expected a mapping (kind, train, val, ...), got {type(d).__name__}")
    base = path.parent
    kind = d.get("kind", "coco")
    if kind == "voc":
        if "root" not in d:
            raise DataError(path, "root", "missing (the VOC devkit folder)")
        root = Path(os.path.expanduser(str(d["root"])))
        d = {**d, "root": str((base / root if not root.is_absolute() else root).resolve())}
        if not Path(d["root"]).is_dir():
            raise DataError(path, "root", f"{d['root']} does not exist")
        return d
    if kind != "coco":
        raise DataError(path, "kind", f"unknown {kind!r} (coco | voc)")
    return _coco_splits({k: v for k, v in d.items() if k != "kind"}, base, where=str(path))


def parse_data_args(items: list[str]) -> dict | None:
    """``--data`` values -> a data config (None when there are none)."""
    if not items:
        return None
    named = [i for i in items if "=" in i.split(":", 1)[0]]
    whole = [i for i in items if i not in named]
    if len(whole) > 1 or (whole and any(not i.startswith("pretrain=") for i in named)):
        raise DataError(whole[0], "--data", "give one dataset (a YAML file or a folder, plus pretrain=IMAGES/ "
                                            "if you like) or split=ANN.json:IMAGES/ pairs, not both")
    if whole:
        p = Path(os.path.expanduser(whole[0]))
        if not p.exists():
            raise DataError(p, "--data", "does not exist")
        data = load_dataset_yaml(p) if p.is_file() else _folder(p)
        for it in named:   # the unlabeled images to pretrain on, beside a labeled dataset
            data["pretrain"] = _split(it.partition("=")[2], "--data pretrain", Path.cwd())
        return data
    splits = {}
    for it in named:
        name, _, value = it.partition("=")
        if name in splits:
            raise DataError(value, f"--data {name}", "given twice")
        splits[name] = value
    return _coco_splits(splits, Path.cwd(), where="--data")


def require_splits(data: dict, splits: tuple[str, ...], command: str) -> None:
    if data.get("kind") == "voc" and "pretrain" in splits and "pretrain" not in data:
        raise DataError(data.get("root", "<data>"), "--data", f"`detbench {command}` pretrains on unlabeled "
                                                             f"images: give them as --data pretrain=IMAGES/ "
                                                             f"(a VOC folder has no pretraining split)")
    if data.get("kind") == "coco":
        missing = [s for s in splits if s not in data]
        if missing:
            raise DataError("<data>", f"--data {missing[0]}", f"`detbench {command}` needs "
                                                              f"{', '.join(s + '=ANN.json:IMAGES/' for s in missing)}")


# ---------------------------------------------------------------------------- identity
_MEMO: dict = {}


def _cache_file() -> Path:
    return cache_root() / "data-identity.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, inode, mtime, ctime, size) in memory and in the
    dataset cache (an unwritable cache only costs the recomputation). The ctime catches a
    same-size edit whose old mtime was put back (``touch -r``, ``rsync -t``)."""
    path = Path(path).resolve()
    st = path.stat()
    sig = f"{path}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_size}"
    if sig in _MEMO:
        return _MEMO[sig]
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(str(path), {}).get("sig") == sig:
        _MEMO[sig] = known[str(path)]["sha256"]
        return _MEMO[sig]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _MEMO[sig] = h.hexdigest()
    try:
        with file_lock(cache.with_suffix(".lock")):
            try:
                known = json.loads(cache.read_text())
            except (OSError, ValueError):
                known = {}
            known[str(path)] = {"sig": sig, "sha256": _MEMO[sig]}
            atomic_write_json(cache, known)
    except OSError:
        pass
    return _MEMO[sig]


def images_fingerprint(paths: list[Path], root: Path) -> str:
    """sha256 over every image's (path relative to ``root``, size) and the bytes of the first,
    middle and last image (the proposal cache's ``_dataset_hash`` idea): renamed, added,
    removed or resized files change it; a missing file counts with size -1."""
    h = hashlib.sha256()
    for p in paths:
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(p, root)}\0{size}\n".encode("utf-8", "surrogateescape"))
    for i in sorted({0, len(paths) // 2, len(paths) - 1} if paths else ()):
        try:
            h.update(hashlib.sha256(paths[i].read_bytes()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def _folder_images(root: Path) -> list[Path]:
    return [p for p in walk_files(root) if p.suffix.lower() in IMAGE_EXTS]


def data_identity(data: dict) -> dict | None:
    """The content identity of a dataset given by path; None for generated data (named by
    its generator parameters, which already fix its content)."""
    kind = data.get("kind")
    if kind == "coco":
        out = {}
        for s in SPLITS:
            if s not in data:
                continue
            split = data[s]
            key = ("coco", s, json.dumps(split, sort_keys=True))
            ident = {}
            if split.get("ann_file"):
                ident["ann_file"] = file_sha256(Path(split["ann_file"]))[:16]
            memo = (key, ident.get("ann_file"))
            if memo not in _MEMO:   # the folder's images (no json parsing: COCO train's is 450 MB)
                _MEMO[memo] = images_fingerprint(_folder_images(split["image_root"]), Path(split["image_root"]))[:16]
            ident["images"] = _MEMO[memo]
            out[s] = ident
        return out
    if kind == "voc" and "root" in data:
        root = Path(data["root"])
        years = voc_years(data)   # only the year folders it reads: a sibling folder is not its content
        memo = ("voc", str(root), tuple(years))
        if memo not in _MEMO:
            h = hashlib.sha256()
            files = [p for y in years for p in walk_files(root / y) if p.suffix in (".xml", ".txt")
                     and p.parent.name in ("Annotations", "Main")]
            for p in files:   # every annotation and image list, by content
                h.update(f"{p.relative_to(root)}\0".encode() + hashlib.sha256(p.read_bytes()).digest())
            images = [p for y in years for p in walk_files(root / y / "JPEGImages")]
            _MEMO[memo] = {"annotations": h.hexdigest()[:16], "images": images_fingerprint(images, root)[:16]}
        return _MEMO[memo]
    return None


def _paths_exist(data: dict) -> bool:
    paths = [data["root"]] if "root" in data else [
        v for s in SPLITS if isinstance(data.get(s), dict) for v in data[s].values()]
    return all(Path(str(p)).exists() for p in paths)


def with_identity(data: dict) -> dict:
    """``data`` with its content identity (``identity``) when it is given by path. A scale's
    data whose paths are not there (planning on a machine without the data) keeps its paths
    only: nothing can run there, and the run's own data check names what is missing."""
    data = {k: v for k, v in data.items() if k != "identity"}
    if not _paths_exist(data):
        return data
    ident = data_identity(data)
    return {**data, "identity": ident} if ident else data


# ---------------------------------------------------------------------------- check
def check_dataset(data: dict, decode: bool = True) -> dict:
    """Validate every labeled split (the same parser the runs use) and gather statistics:
    images, boxes per image, classes, image sizes, unreadable or missing image files. Every
    split is reported with its image count, the unlabeled images beside a VOC dataset too."""
    unlabeled = {"pretrain": data["pretrain"]} if data.get("kind") == "voc" and "pretrain" in data else {}
    splits = {**unlabeled, **resolve_data({k: v for k, v in data.items() if k not in unlabeled})}
    report: dict = {"kind": data.get("kind"), "splits": {}}
    for name, split in splits.items():
        if not split.get("ann_file"):   # the images pretraining reads
            paths = [Path(p) for p in ImageSource.from_folder(split["image_root"]).paths]
            anns = None
            entry: dict = {"image_root": split["image_root"], "images": len(paths)}
        else:
            ds = CocoDetection(split["image_root"], split["ann_file"], with_masks=False)
            paths = [ds.image_path(i) for i in ds.ids]
            per_image = [sum(not a["iscrowd"] for a in ds._anns[i]) for i in ds.ids]
            per_class: dict[str, int] = {n: 0 for n in ds.class_names}
            for i in ds.ids:
                for a in ds._anns[i]:
                    if not a["iscrowd"]:
                        per_class[ds.class_names[a["label"] - 1]] += 1
            sizes = np.array([[ds.images[i]["width"], ds.images[i]["height"]] for i in ds.ids])
            anns = ds
            entry = {"ann_file": split["ann_file"], "image_root": split["image_root"], "images": len(ds.ids),
                     "boxes": int(sum(per_image)), "boxes_per_image": {
                         "mean": round(float(np.mean(per_image)), 2), "min": int(min(per_image)),
                         "max": int(max(per_image))},
                     "images_without_boxes": int(sum(n == 0 for n in per_image)),
                     "crowd_regions": int(sum(a["iscrowd"] for i in ds.ids for a in ds._anns[i])),
                     "classes": len(ds.class_names), "boxes_per_class": per_class,
                     "image_size": {"min": [int(v) for v in sizes.min(0)], "max": [int(v) for v in sizes.max(0)],
                                    "median": [int(v) for v in np.median(sizes, 0)]},
                     "boxes_clipped": ds.num_clipped, "boxes_dropped": ds.num_dropped}
        unreadable, missing, missized = [], [], []
        for k, p in enumerate(paths):
            if not Path(p).is_file():
                missing.append(str(p))
            elif decode:
                try:
                    img = read_rgb(p)
                except CorruptImage as e:
                    unreadable.append(f"{p}: {e.message}")
                    continue
                if anns is not None:
                    info = anns.images[anns.ids[k]]
                    if (img.width, img.height) != (info["width"], info["height"]):
                        missized.append(f"{p}: {img.width}x{img.height}, the annotation file says "
                                        f"{info['width']}x{info['height']}")
        entry["missing_files"] = missing
        entry["missized_files"] = missized
        entry["unreadable_files"] = unreadable
        report["splits"][name] = entry
    return report


# ---------------------------------------------------------------------------- before a run
def preflight(data: dict) -> None:
    """What a run would otherwise find hours in: every annotation file parsed (VOC XML, COCO
    json), every listed image present and of the size its annotation says (header only, no
    decoding). All problems of a split in one ``DataError`` naming the file and the field.
    Generated data is skipped; a dataset that passed is remembered by its content identity, so
    the next command does not read it again. Undecodable images are not looked for here: a run
    skips those (up to ``DETBENCH_MAX_UNREADABLE``)."""
    if data.get("kind") not in ("coco", "voc") or (data.get("kind") == "voc" and "root" not in data):
        return
    data = with_identity(data)
    stamp = None
    if data.get("identity"):
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = cache_root() / "preflight" / f"{digest}.ok"
        if stamp.is_file():
            return
    for name, split in resolve_data(data).items():   # parses every VOC XML (DataError names the file)
        if not split.get("ann_file"):
            continue   # unlabeled images: ImageSource skips what it cannot read
        ds = CocoDetection(split["image_root"], split["ann_file"], with_masks=False)
        bad = []
        for i in ds.ids:
            info, path = ds.images[i], ds.image_path(i)
            where = f"images[{info['_index']}]"
            try:
                w, h = read_size(path)
            except CorruptImage as e:
                if e.message == "file not found":
                    bad.append(f"{where}.file_name {info['file_name']!r}: no such file {path}")
                continue   # undecodable header: skipped by the run like any unreadable image
            if (w, h) != (info["width"], info["height"]):
                bad.append(f"{where}: {path} is {w}x{h}, the annotation says {info['width']}x{info['height']}")
        if bad:
            raise DataError(split["ann_file"], "images",
                            f"{len(bad)} of {len(ds.ids)} images of split {name!r} cannot be trained or evaluated "
                            f"on: " + "; ".join(bad[:3]) + (f"; ... ({len(bad) - 3} more: `detbench data check`)"
                                                             if len(bad) > 3 else "")
                            + ". Nothing was run.")
    if stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text("")
        except OSError:
            pass   # an unwritable cache only costs the check next time
