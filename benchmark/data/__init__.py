"""Data layer: synthetic scenes, a COCO-format loader, PASCAL VOC converted to COCO records,
and unlabeled image sources.

Names are imported lazily, so ``benchmark.data.errors`` (used by the proposal cache) does
not pull in pycocotools."""
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
