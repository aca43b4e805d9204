"""Data layer: synthetic scenes, a COCO-format loader, and unlabeled image sources."""
from benchmark.data.coco import CocoDetection, collate_fn
from benchmark.data.errors import CorruptImage, DataError
from benchmark.data.images import ImageSource, SkippingImageDataset
from benchmark.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_dataset, generate_split

__all__ = [
    "CocoDetection",
    "CorruptImage",
    "DataError",
    "ImageSource",
    "SYNTHETIC_CLASSES",
    "SkippingImageDataset",
    "collate_fn",
    "ensure_synthetic_dataset",
    "generate_split",
]
