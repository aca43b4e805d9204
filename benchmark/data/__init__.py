"""Data layer: image decoding (``io``, a leaf), a COCO-format loader (``coco``), unlabeled image
sources (``images``), PASCAL VOC converted to COCO records (``voc``, ``voc_xml``), synthetic
scenes (``synthetic``), datasets given by path (``user``), data configs to paths (``resolve``)
and the proposal and pseudo-class caches.

Names are imported lazily, so importing ``benchmark.data.errors`` (the runner, the proposal
cache) does not pull in pycocotools."""
import importlib

_WHERE = {
    "CocoDetection": "coco", "collate_fn": "coco",
    "CorruptImage": "errors", "DataError": "errors",
    "ImageSource": "images",
    "SYNTHETIC_CLASSES": "synthetic", "ensure_synthetic_dataset": "synthetic", "generate_split": "synthetic",
    "ensure_synthetic_voc": "synthetic",
    "VOC_CLASSES": "voc", "VocProtocol": "voc", "resolve_voc": "voc",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"benchmark.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'benchmark.data' has no attribute {name!r}")
