"""Fine-tuning detectors, one file each, behind ``benchmark.detectors.base.Detector`` and a
decorator registry (``registry``). Adding a detector: one file here, its import line below,
and its entries in ``configs/scales/*.yaml`` (docs/adding-a-detector.md)."""
from benchmark.detectors import detr, faster_rcnn, faster_rcnn_c4, fcos, mask_rcnn, mask_rcnn_c4, retinanet  # noqa: F401
from benchmark.detectors.base import Detector, LoadReport, PretrainedLoadError, load_pretrained, maybe_sync_bn
from benchmark.detectors.registry import (UnknownDetector, build_detector, detector_config, get_detector,
                                          list_detectors, register_detector)

__all__ = ["Detector", "LoadReport", "PretrainedLoadError", "UnknownDetector", "build_detector", "detector_config",
           "get_detector", "list_detectors", "load_pretrained", "maybe_sync_bn",
           "register_detector"]
