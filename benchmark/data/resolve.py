"""Dataset identities in configs -> local paths. A data config is part of a run's key, so it
names the data by what defines it (generator parameters, or paths), not by cache location."""
from __future__ import annotations

from pathlib import Path

from benchmark.common.paths import cache_root
from benchmark.data.errors import DataError
from benchmark.data.synthetic import ensure_synthetic_dataset
from benchmark.data.voc import resolve_voc


def resolve_data(data: dict) -> dict[str, dict]:
    """{"kind": "synthetic", ...generator params} or {"kind": "coco", "pretrain": {...},
    "train": {...}, "val": {...}} with image_root/ann_file per split (pretrain may instead
    give {"image_root": folder} for an unlabeled folder), or {"kind": "voc", "root": ...} /
    {"kind": "voc", "synthetic": {...}} (train and val only; see ``benchmark.data.voc``)."""
    data = {k: v for k, v in data.items() if k != "identity"}   # content identity: for run keys only
    kind = data.get("kind")
    if kind == "synthetic":
        params = {k: v for k, v in data.items() if k != "kind"}
        return ensure_synthetic_dataset(cache_root(), **params)
    if kind == "coco":
        out = {}
        if not any(split in data for split in ("pretrain", "train", "val")):
            raise DataError("<config>", "data.train", "missing (need image_root and ann_file)")
        for split in ("pretrain", "train", "val"):
            if split not in data:   # the stage that reads it says so
                continue
            s = dict(data[split])
            for f in ("image_root", "ann_file"):
                if f in s and s[f] and not Path(s[f]).exists():
                    raise DataError(s[f], f"data.{split}.{f}", "does not exist")
            out[split] = s
        return out
    if kind == "voc":
        return resolve_voc(data, cache_root())
    raise DataError("<config>", "data.kind", f"unknown {kind!r} (synthetic|coco|voc)")
