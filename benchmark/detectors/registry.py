"""The registry of fine-tuning detectors (``methods.registry.Registry``), and building one
from a run's config. A detector registers when ``benchmark/detectors/__init__.py`` imports
its module."""
from __future__ import annotations

from methods.config import ConfigError
from methods.registry import Registry, UnknownName

DETECTORS = Registry("detector")
register_detector, list_detectors, get_detector = DETECTORS.register, DETECTORS.names, DETECTORS.get
UnknownDetector = UnknownName


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
