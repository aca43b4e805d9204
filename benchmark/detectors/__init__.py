"""A decorator registry of fine-tuning detectors, one file each (as ``methods/`` has for
pretraining methods). Adding a detector = one file here, its import at the bottom of this
module, and its entries in ``configs/scales/*.yaml`` (``detectors: {name: {model:
..., finetune: {1x: ...}}}``)."""
from __future__ import annotations

from typing import Callable

from methods.base import ConfigError

_DETECTORS: dict[str, type] = {}


class UnknownDetector(KeyError, ConfigError):
    """A detector name that is not registered (a config error that names the field)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_detector(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _DETECTORS and _DETECTORS[name] is not cls:
            raise KeyError(f"detector {name!r} registered twice ({_DETECTORS[name].__name__}, {cls.__name__})")
        cls.name = name
        _DETECTORS[name] = cls
        return cls
    return deco


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def get_detector(name: str) -> type:
    if name not in _DETECTORS:
        raise UnknownDetector(f"detector.name: unknown detector {name!r} (available: {', '.join(list_detectors())})")
    return _DETECTORS[name]


def detector_config(d: dict):
    """``{"name": ..., **fields}`` -> (detector class, its typed config)."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"detector.name: missing (available: {', '.join(list_detectors())})")
    det = get_detector(d["name"])
    return det, det.Config.from_dict(d, det.name)


def build_detector(d: dict, num_classes: int):
    """The detector a resolved config names, for ``num_classes`` classes including background."""
    det, cfg = detector_config(d)
    return det.build(cfg, num_classes)


from benchmark.detectors.base import (Detector, LoadReport, PretrainedLoadError, load_pretrained,  # noqa: E402
                                      load_weights_file, maybe_sync_bn)
# explicit imports: each registers itself
from benchmark.detectors import (detr, faster_rcnn, faster_rcnn_c4, fcos, mask_rcnn, mask_rcnn_c4,  # noqa: E402,F401
                                 retinanet)

__all__ = ["Detector", "LoadReport", "PretrainedLoadError", "UnknownDetector", "build_detector", "detector_config",
           "get_detector", "list_detectors", "load_pretrained", "load_weights_file", "maybe_sync_bn",
           "register_detector"]
