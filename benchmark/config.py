"""Scales and config resolution. A scale (configs/scales/<name>.yaml) is a named set of
overrides over the papers' defaults — which live with the code (method configs and recipes,
the detectors' configs and recipes) — never a fork of the code. Resolution order:
paper defaults < method's own per-scale overrides < scale file < row/grid overrides < CLI."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

from methods import get_method
from methods.base import ConfigError

SCALES_DIR = Path(__file__).parent / "configs" / "scales"
RECIPE_KEYS = {"optimizer", "base_lr", "lr_batch", "batch_size", "weight_decay", "momentum",
               "schedule", "warmup_epochs", "epochs", "steps_per_epoch"}


def available_scales() -> list[str]:
    return sorted(p.stem for p in SCALES_DIR.glob("*.yaml"))


def load_scale(name: str, _seen: tuple = ()) -> dict:
    """A scale's overrides; ``extends: <scale>`` merges them over another scale's (its methods
    then use that scale's per-method overrides unless ``method_scale`` says otherwise)."""
    p = SCALES_DIR / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"scale: unknown {name!r} (available: {', '.join(available_scales())})")
    sc = yaml.safe_load(p.read_text()) or {}
    parent = sc.pop("extends", None)
    if parent is None:
        return sc
    if parent in _seen + (name,):
        raise ConfigError(f"{p}: extends: cycle {' -> '.join(_seen + (name, parent))}")
    base = load_scale(parent, _seen + (name,))
    base.setdefault("method_scale", base.get("name", parent))
    return deep_merge(base, sc)


def deep_merge(base: dict, over: dict | None, where: str = "", strict: bool = False) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if strict and k not in out:
            raise ConfigError(f"{where}{k}: unknown key (known: {', '.join(sorted(out))})")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, f"{where}{k}.", strict)
        else:
            out[k] = copy.deepcopy(v)
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(obj, where: str = "data"):
    """Expand ${VAR} in strings; a missing variable is an error naming it and the field."""
    if isinstance(obj, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, where) for v in obj]
    if isinstance(obj, str):
        def sub(m):
            if m.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set "
                                  f"(this scale reads its data from local paths)")
            return os.environ[m.group(1)]
        return _ENV.sub(sub, obj)
    return obj


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """["method.queue_size=1024", "recipe.base_lr=0.1"] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for it in items or ():
        if "=" not in it:
            raise ConfigError(f"override {it!r}: expected key.path=value")
        path, val = it.split("=", 1)
        node = out
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return out


def pretrain_config(method: str, *, scale: str = "tiny", seed: int = 0, epochs: float | None = None,
                    method_overrides: dict | None = None, recipe_overrides: dict | None = None,
                    data_overrides: dict | None = None) -> dict:
    """The fully resolved config of one pretraining run."""
    cls = get_method(method)
    sc = load_scale(scale)
    mscale = cls.scales.get(sc.get("method_scale", scale), {})
    unknown = set(mscale) - {"method", "recipe"}
    if unknown:
        raise ConfigError(f"{cls.__name__}.scales[{scale!r}]: unknown section {sorted(unknown)}")
    mcfg = expand_env(deep_merge(mscale.get("method", {}), method_overrides), "method")
    mcfg = cls.Config.from_dict(mcfg).to_dict()      # validates names and types
    recipe = deep_merge(cls.recipe, mscale.get("recipe", {}))
    scale_pre = dict(sc.get("pretrain", {}))
    divisor = scale_pre.pop("batch_divisor", None)
    recipe = deep_merge(recipe, scale_pre)
    recipe.setdefault("epochs", 100)
    recipe.setdefault("steps_per_epoch", None)
    if epochs is not None:
        recipe["epochs"] = epochs
    recipe_overrides = dict(recipe_overrides or {})
    if divisor and "batch_size" in recipe_overrides:
        # a paper batch size from a table (SoCo Table 5b) runs at B / divisor at small scales
        recipe_overrides["batch_size"] = max(2, int(recipe_overrides["batch_size"]) // int(divisor))
    recipe = deep_merge(recipe, recipe_overrides)
    bad = set(recipe) - RECIPE_KEYS
    if bad:
        raise ConfigError(f"recipe.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(RECIPE_KEYS))})")
    data = expand_env(deep_merge(sc["data"], data_overrides))
    return {"stage": "pretrain", "scale": scale, "seed": int(seed),
            "method": {"name": method, **mcfg}, "recipe": recipe, "data": data,
            "runtime": dict(sc.get("runtime", {}))}


PROTOCOLS = ("coco", "voc")
SCALE_DETECTOR_KEYS = {"model", "finetune"}


def scale_detector(sc: dict, scale: str, detector: str) -> dict:
    """The scale's overrides of one detector: ``detectors: {<name>: {model: ..., finetune: {1x: ...}}}``."""
    entry = (sc.get("detectors") or {}).get(detector)
    if entry is None:
        raise ConfigError(f"scale {scale!r}: detectors.{detector}: missing (a detector needs its entry in "
                          f"benchmark/configs/scales/{scale}.yaml; the scale has: "
                          f"{', '.join(sorted(sc.get('detectors') or {})) or 'none'})")
    bad = set(entry) - SCALE_DETECTOR_KEYS
    if bad:
        raise ConfigError(f"scale {scale!r}: detectors.{detector}.{sorted(bad)[0]}: unknown key "
                          f"(known: {', '.join(sorted(SCALE_DETECTOR_KEYS))})")
    return entry


def finetune_config(*, scale: str = "tiny", seed: int = 0, schedule: str = "1x", parent: str | None,
                    method: str | None = None, detector: str = "mask_rcnn", protocol: str = "coco",
                    detector_overrides: dict | None = None, recipe_overrides: dict | None = None,
                    data_overrides: dict | None = None) -> dict:
    """One fine-tuning run of ``detector`` from the weights of ``parent`` (None: Scratch,
    random init). The recipe is the detector's for ``schedule`` < the scale's overrides of
    that detector < ``method``'s own fine-tuning overrides (SoCo: weight decay 2.5e-5, for
    the detectors that take them) < ``recipe_overrides``; all recorded in the run's identity.
    ``protocol`` ("coco" | "voc") is passed through to fine-tuning and evaluation; it enters
    the config (and so the key) only when it is not "coco", so existing keys stay."""
    from benchmark.detectors import get_detector
    det = get_detector(detector)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown {protocol!r} ({' | '.join(PROTOCOLS)})")
    sc = load_scale(scale)
    entry = scale_detector(sc, scale, detector)
    known = sorted(set(det.recipes) | set(entry.get("finetune") or {}))
    if schedule not in known:
        raise ConfigError(f"schedule: unknown {schedule!r} for {detector} (known: {', '.join(known)})")
    model = deep_merge(entry.get("model") or {}, detector_overrides)
    model = {"name": detector, **det.Config.from_dict(model, detector).to_dict()}
    base = det.recipes[schedule].to_dict() if schedule in det.recipes else {}
    rec = deep_merge(base, (entry.get("finetune") or {}).get(schedule, {}))
    if method and det.takes_method_overrides:
        rec = deep_merge(rec, get_method(method).finetune_overrides)
    rec = det.Recipe.from_dict(deep_merge(rec, recipe_overrides)).to_dict()
    data = expand_env(deep_merge(sc["data"], data_overrides))
    cfg = {"stage": "finetune", "scale": scale, "seed": int(seed), "schedule": schedule,
           "parent": parent, "detector": model, "recipe": rec, "data": data,
           "runtime": dict(sc.get("runtime", {}))}
    if protocol != "coco":
        cfg["protocol"] = protocol
    return cfg


def evaluate_config(*, parent: str, data: dict, scale: str, protocol: str = "coco") -> dict:
    cfg = {"stage": "evaluate", "scale": scale, "parent": parent, "data": data}
    if protocol != "coco":
        cfg["protocol"] = protocol
    return cfg
