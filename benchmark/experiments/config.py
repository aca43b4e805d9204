"""Scales and config resolution. A scale (configs/scales/<name>.yaml) is a named set of
overrides over the papers' defaults — which live with the code (method configs and recipes,
the detectors' configs and recipes) — never a fork of the code. Resolution order:
paper defaults < method's own per-scale overrides < scale file < row/grid overrides < CLI."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from pathlib import Path

import yaml

from benchmark.common.paths import configs_root
from benchmark.data.synthetic import ensure_synthetic_dataset
from benchmark.data.user import with_identity
from benchmark.detectors import get_detector
from benchmark.experiments.tables import check_name
from benchmark.runs.identity import strip_defaults
from methods import build_method, get_method
from methods.augment import LOADERS
from methods.base import PretrainRecipe
from methods.config import check_field, check_mapping, check_method, coerce, ConfigError, EXPONENT, type_hints

SCALES_DIR = configs_root() / "scales"


def available_scales() -> list[str]:
    return sorted(p.stem for p in SCALES_DIR.glob("*.yaml"))


def load_scale(name: str, _seen: tuple = ()) -> dict:
    """A scale's overrides; ``extends: <scale>`` merges them over another scale's (its methods
    then use that scale's per-method overrides unless ``method_scale`` says otherwise)."""
    p = SCALES_DIR / f"{check_name(name, 'scale')}.yaml"
    if not p.exists():
        raise ConfigError(f"scale: unknown {name!r} (available: {', '.join(available_scales())})")
    sc = copy.deepcopy(_read_scale(str(p), p.read_text()))
    parent = sc.pop("extends", None)
    if parent is not None:
        if parent in _seen + (name,):
            raise ConfigError(f"{p}: extends: cycle {' -> '.join(_seen + (name, parent))}")
        base = load_scale(parent, _seen + (name,))
        base.setdefault("method_scale", base.get("name", parent))
        sc = deep_merge(base, sc)
    if not _seen:   # the whole scale, its parents merged: what a run reads must be there
        if "data" not in sc:
            raise ConfigError(f"{p}: data: missing (a scale names its data, or extends a scale that does)")
        try:
            check_data(sc["data"])
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    return sc


@functools.lru_cache(maxsize=64)
def _read_scale(path: str, text: str) -> dict:
    """One scale file parsed and checked (``validate_scale``), by its path and text: a plan
    resolves one config per run, each reading the scale, and parsing and checking the YAML
    each time was most of a large grid's planning time (a file edited since reads anew; a bad
    file raises each time, nothing is cached for it). Callers get a deep copy."""
    p = Path(path)
    try:
        sc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if sc is None:
        raise ConfigError(f"{p}: empty scale file (expected a mapping of {', '.join(SCALE_KEYS)})")
    validate_scale(sc, p)
    return sc


def check_data(data: dict, where: str = "data") -> None:
    """A synthetic dataset's parameters (``benchmark.data.synthetic.ensure_synthetic_dataset``'s
    keyword arguments: known keys, types, ``methods.config.RULES``: positive sizes and counts,
    a seed >= 0, min <= max); other kinds are checked where their paths are read."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    params = data.get("synthetic") if data.get("kind") == "voc" else data
    if data.get("kind") not in ("synthetic", "voc") or not isinstance(params, dict):
        return
    where = f"{where}.synthetic" if params is not data else where
    hints = {k: v for k, v in type_hints(ensure_synthetic_dataset).items()
             if k not in ("cache_dir", "return")}
    values = {}
    for k, v in params.items():
        if k in ("kind", "identity"):
            continue
        if k not in hints:
            raise ConfigError(f"{where}.{k}: unknown key (known: kind, {', '.join(hints)})")
        values[k] = coerce(v, hints[k], f"{where}.{k}")
    check_mapping(values, where)


class UnsupportedDetector(ConfigError):
    """A detector that the method pretraining a whole detector has no recipe for."""


SCALE_KEYS = ("name", "extends", "method_scale", "data", "pretrain", "runtime", "detectors")
# runtime: how a run executes, never part of its identity; (type, lowest value)
RUNTIME = {"num_workers": (int, 0), "torch_threads": (int, 1), "local_jobs": (int, 1), "ckpt_every": (int, 1),
           "log_every": (int, 1), "amp": (bool, None),
           # the fast path (benchmark.stages.pretrain.fast_path): same training, to float tolerance
           "channels_last": (bool, None), "fused_optimizer": (bool, None), "compile": (bool, None)}


def validate_scale(sc, path: Path) -> None:
    """Check one scale file's keys, types and ranges when it is loaded, naming the file and
    the field, before anything runs."""
    if not isinstance(sc, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(SCALE_KEYS)}")
    for k in sc:
        if k not in SCALE_KEYS:
            raise ConfigError(f"{path}: {k}: unknown key (known: {', '.join(SCALE_KEYS)})")
    for k in ("data", "pretrain", "runtime", "detectors"):
        if k in sc and not isinstance(sc[k], dict):
            raise ConfigError(f"{path}: {k}: expected a mapping, got {sc[k]!r}")
    try:
        for k, v in sc.get("runtime", {}).items():
            if k not in RUNTIME:
                raise ConfigError(f"runtime.{k}: unknown key (known: {', '.join(RUNTIME)})")
            tp, low = RUNTIME[k]
            v = coerce(v, tp, f"runtime.{k}")
            if low is not None and v < low:
                raise ConfigError(f"runtime.{k}: expected >= {low}, got {v!r}")
        pre = dict(sc.get("pretrain", {}))
        div = pre.pop("batch_divisor", None)
        if div is not None and coerce(div, int, "pretrain.batch_divisor") < 1:
            raise ConfigError(f"pretrain.batch_divisor: expected >= 1, got {div!r}")
        hints = type_hints(PretrainRecipe)
        for k, v in pre.items():
            if k not in hints:
                raise ConfigError(f"pretrain.{k}: unknown key (known: batch_divisor, {', '.join(hints)})")
            check_field(k, coerce(v, hints[k], f"pretrain.{k}"), f"pretrain.{k}")
        for name, entry in (sc.get("detectors") or {}).items():
            det = get_detector(name)
            if not isinstance(entry, dict) or set(entry) - SCALE_DETECTOR_KEYS:
                raise ConfigError(f"detectors.{name}: expected a mapping of {', '.join(sorted(SCALE_DETECTOR_KEYS))}")
            det.Config.from_dict(entry.get("model") or {}, name)
            for sched, rec in (entry.get("finetune") or {}).items():
                if not isinstance(rec, dict):
                    raise ConfigError(f"detectors.{name}.finetune.{sched}: expected a mapping of recipe values, "
                                      f"got {rec!r}")
                base = det.recipes[sched].to_dict() if sched in det.recipes else {}
                det.Recipe.from_dict(deep_merge(base, rec))
    except ValueError as e:   # ConfigError, and the range checks of the detector and recipe
        raise ConfigError(f"{path}: {e}") from None


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


def check_inputs(scale: str, methods=(), *, user_data: bool = False) -> None:
    """Every environment variable and local path a plan at ``scale`` needs (the scale's data
    unless the user gives a dataset; ``methods``' own per-scale paths, e.g. Supervised's
    ``${SUPERVISED_WEIGHTS}``), checked before the first run starts: all that are missing in
    one ``ConfigError``, rather than the first one after hours of other runs."""
    sc = load_scale(scale)
    items = []   # (where, value) of every path-valued setting

    def walk(obj, where):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, str) and where.rsplit(".", 1)[-1] in ("image_root", "ann_file", "root", "weights"):
            items.append((where, obj))
    if not user_data:
        walk(sc.get("data", {}), "data")
    for m in dict.fromkeys(methods):
        walk(get_method(m).scales.get(sc.get("method_scale", scale), {}).get("method", {}), f"{m}: method")
    missing, unset = [], {}
    for where, value in items:
        names = [n for n in _ENV.findall(value) if n not in os.environ]
        for n in names:
            unset.setdefault(n, []).append(where)
        if names:
            continue
        path = _ENV.sub(lambda m: os.environ[m.group(1)], value)
        if path and not Path(path).exists():
            missing.append(f"{path} does not exist ({where} = {value!r})")
    missing = [f"environment variable {n} is not set (for {', '.join(w)})" for n, w in unset.items()] + missing
    if missing:
        raise ConfigError(f"scale {scale} needs, before any run starts:\n  - " + "\n  - ".join(dict.fromkeys(missing))
                          + "\n(export the variables, e.g. COCO_ROOT=/path/to/coco; or give your own dataset "
                            "with --data)")


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
        value = yaml.safe_load(val)
        if isinstance(value, str) and EXPONENT.match(value):   # YAML 1.1 reads 3e-4 as a string
            value = float(value)
        node[parts[-1]] = value
    return out


def resolve_data_config(sc: dict, data: dict | None, data_overrides: dict | None,
                        splits: tuple[str, ...] = ()) -> dict:
    """The scale's data (``${VAR}`` expanded) or, given, the user's dataset instead, with only
    the ``splits`` the stage reads (a fixed validation file does not recompute pretraining);
    a dataset given by path carries its content identity (``benchmark.data.user.with_identity``)."""
    if data is not None:
        if splits == ("pretrain",) and "pretrain" in data:   # unlabeled images, whatever labels come with them
            data = {"kind": "coco", "pretrain": data["pretrain"]}
        elif data.get("kind") == "coco" or "pretrain" not in splits:
            data = {k: v for k, v in data.items() if k not in ("pretrain", "train", "val") or k in splits}
        return with_identity(data)
    data = expand_env(deep_merge(sc["data"], data_overrides))
    if data_overrides:
        check_data(data)
    return with_identity(data)


def pretrain_config(method: str, *, scale: str = "tiny", seed: int = 0, epochs: float | None = None,
                    method_overrides: dict | None = None, recipe_overrides: dict | None = None,
                    data_overrides: dict | None = None, data: dict | None = None,
                    parent: str | None = None) -> dict:
    """The fully resolved config of one pretraining run. ``data``: a dataset that replaces
    the scale's (``--data``). A method that pretrains a whole detector (``cls.pretrain_detector``:
    AlignDet) runs over the backbone of the image-domain run ``parent`` (its key, required):
    the config records ``parent`` and ``detector`` (the scale's config of that detector with
    the method's ``detector_spec`` overrides) so the run's identity covers both, and the
    recipe is ``cls.recipe_for(detector)``'s (multistep drops as fractions, gradient clip)."""
    cls = get_method(method)
    check_run_args(seed, epochs)
    sc = load_scale(scale)
    method_scale = cls.scales.get(sc.get("method_scale", scale), {})
    unknown = set(method_scale) - {"method", "recipe"}
    if unknown:
        raise ConfigError(f"{cls.__name__}.scales[{scale!r}]: unknown section {sorted(unknown)}")
    mcfg = expand_env(deep_merge(method_scale.get("method", {}), method_overrides), "method")
    method_cfg = cls.Config.from_dict(mcfg)   # validates names, types and ranges (methods.config.RULES)
    check_method(method_cfg)
    mcfg = strip_defaults(cls.Config, method_cfg.to_dict())
    detector = cls.pretrain_detector(mcfg)
    if detector is not None and parent is None:
        raise ConfigError(f"parent: missing: {method} pretrains the {detector} detector over the backbone of an "
                          f"image-domain pretraining run (its parent run key)")
    base = cls.recipe.to_dict()
    if detector is not None:   # the box-domain recipe of that detector (drops and clipping included)
        try:
            box = cls.recipe_for(detector)
        except ConfigError as e:
            raise UnsupportedDetector(str(e)) from None
        base = {**box.recipe.to_dict(), "milestones": list(box.milestones), "grad_clip": box.clip_grad}
    recipe = deep_merge(base, method_scale.get("recipe", {}))
    scale_pre = dict(sc.get("pretrain", {}))
    divisor = scale_pre.pop("batch_divisor", None)
    recipe = deep_merge(recipe, scale_pre)
    if epochs is not None:
        recipe["epochs"] = epochs
    recipe_overrides = dict(recipe_overrides or {})
    if divisor and "batch_size" in recipe_overrides:
        # a paper batch size from a table (SoCo Table 5b) runs at B / divisor at small scales
        recipe_overrides["batch_size"] = max(2, int(recipe_overrides["batch_size"]) // int(divisor))
    recipe = deep_merge(recipe, recipe_overrides)
    resolved = PretrainRecipe.from_dict(recipe)   # validates names, types and ranges
    _check_loader(resolved, cls)
    _check_queue(method_cfg, resolved)
    recipe = strip_defaults(PretrainRecipe, recipe)
    if cls.pretrain_images not in ("pretrain", "train"):
        raise ConfigError(f"{cls.__name__}.pretrain_images: expected 'pretrain' or 'train', got {cls.pretrain_images!r}")
    data = resolve_data_config(sc, data, data_overrides, (cls.pretrain_images,))
    cfg = {"stage": "pretrain", "scale": scale, "seed": int(seed),
           "method": {"name": method, **mcfg}, "recipe": recipe, "data": data,
           "runtime": dict(sc.get("runtime", {}))}
    if detector is not None:
        spec = build_method(method, **mcfg).detector_spec()
        cfg["detector"] = detector_model(sc, scale, detector, {k: v for k, v in spec.items() if k != "name"})
        cfg["parent"] = parent
    return cfg


def check_run_args(seed, epochs=None) -> None:
    """A run's seed and, given, its paper epochs (``--seed``/``--first-seed``, ``--epochs``),
    checked before the scale is read (``methods.config.RULES``: seed >= 0, epochs finite in
    (0, EPOCHS_MAX])."""
    check_field("seed", seed, "--seed")
    if epochs is not None:
        check_field("epochs", epochs, "--epochs")


def _check_queue(method_cfg, recipe: PretrainRecipe) -> None:
    """A queue of keys (MoCo's dictionary, InsLoc's per-level queues) takes one key per image
    of the global batch each step; a queue shorter than the batch drops keys before they are
    ever negatives (official facebookresearch/moco moco/builder.py ``_dequeue_and_enqueue``
    asserts ``K % batch_size == 0``)."""
    queue = getattr(method_cfg, "queue_size", None)
    if queue is not None and queue < recipe.batch_size:
        raise ConfigError(f"method.queue_size: expected >= the global batch (recipe.batch_size = "
                          f"{recipe.batch_size}), got {queue}")


def _check_loader(recipe: PretrainRecipe, cls) -> None:
    """``recipe.loader`` (methods.augment.LOADERS) changes pixels, so it is part of a run's
    identity (left out at the default ``cpu``: ``PretrainRecipe.identity``).  ``dali`` needs
    NVIDIA DALI importable where the run is planned (``benchmark.data.dali_loader.require_dali``)."""
    loader = recipe.loader
    if loader not in LOADERS:
        raise ConfigError(f"recipe.loader: unknown {loader!r} ({' | '.join(LOADERS)})")
    supported = cls.loaders
    if loader not in supported:
        raise ConfigError(f"recipe.loader: {loader!r} is not supported by method {cls.name!r} "
                          f"(supported: {' | '.join(supported)})")
    if loader == "dali":   # a missing DALI: this error now, not a traceback in a DataLoader worker
        from benchmark.data.dali_loader import require_dali
        require_dali()


PROTOCOLS = ("coco", "voc")
SCALE_DETECTOR_KEYS = {"model", "finetune"}


def voc_data(sc: dict, scale: str) -> dict:
    """The VOC protocol's data at a scale: the synthetic scenes written in VOC layout at tiny
    (``benchmark.data.synthetic``), ``$VOC_ROOT`` (VOC07+12 trainval / VOC07 test) otherwise."""
    base = sc["data"]
    if base.get("kind") == "synthetic":
        return {"kind": "voc", "synthetic": {k: v for k, v in base.items() if k != "kind"}}
    return with_identity(expand_env({"kind": "voc", "root": "${VOC_ROOT}"}, "data"))


def scale_detector(sc: dict, scale: str, detector: str) -> dict:
    """The scale's overrides of one detector: ``detectors: {<name>: {model: ..., finetune: {1x: ...}}}``."""
    entry = (sc.get("detectors") or {}).get(detector)
    if entry is None:
        raise ConfigError(f"scale {scale!r}: detectors.{detector}: missing (a detector needs its entry in "
                          f"configs/scales/{scale}.yaml; the scale has: "
                          f"{', '.join(sorted(sc.get('detectors') or {})) or 'none'})")
    bad = set(entry) - SCALE_DETECTOR_KEYS
    if bad:
        raise ConfigError(f"scale {scale!r}: detectors.{detector}.{sorted(bad)[0]}: unknown key "
                          f"(known: {', '.join(sorted(SCALE_DETECTOR_KEYS))})")
    return entry


def detector_model(sc: dict, scale: str, detector: str, overrides: dict | None = None) -> dict:
    """A detector's resolved model config at a scale: its defaults < the scale's entry <
    ``overrides``, as ``{"name": detector, **fields}`` (what ``build_detector`` takes)."""
    det = get_detector(detector)
    model = deep_merge(scale_detector(sc, scale, detector).get("model") or {}, overrides)
    return {"name": detector, **det.Config.from_dict(model, detector).to_dict()}


def finetune_config(*, scale: str = "tiny", seed: int = 0, schedule: str = "1x", parent: str | None,
                    method: str | None = None, detector: str = "mask_rcnn", protocol: str = "coco",
                    detector_overrides: dict | None = None, recipe_overrides: dict | None = None,
                    data_overrides: dict | None = None, data: dict | None = None) -> dict:
    """One fine-tuning run of ``detector`` from the weights of ``parent`` (None: Scratch,
    random init). The recipe is the detector's for ``schedule`` < the scale's overrides of
    that detector < ``method``'s own fine-tuning overrides (SoCo: weight decay 2.5e-5, for
    the detectors that take them) < ``recipe_overrides``; all recorded in the run's identity.
    The model is likewise the scale's < ``method``'s ``finetune_detector`` fields that the
    detector has (InsLoc: the ExtraNorm box head) < ``detector_overrides``.
    ``protocol`` ("coco" | "voc") is passed through to fine-tuning and evaluation; it enters
    the config (and so the key) only when it is not "coco", so existing keys stay. ``data``: a
    dataset replacing the scale's (``--data``); a ``voc`` column on a scale whose data is not
    VOC reads the scale's VOC data (``voc_data``)."""
    det = get_detector(detector)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown {protocol!r} ({' | '.join(PROTOCOLS)})")
    check_run_args(seed)
    sc = load_scale(scale)
    entry = scale_detector(sc, scale, detector)
    known = sorted(set(det.recipes) | set(entry.get("finetune") or {}))
    if schedule not in known:
        raise ConfigError(f"schedule: unknown {schedule!r} for {detector} (known: {', '.join(known)})")
    by_method = {}
    if method:   # the method's own detector fields (InsLoc: ExtraNorm head), where the detector has them
        fields = {f.name for f in dataclasses.fields(det.Config)}
        by_method = {k: v for k, v in get_method(method).finetune_detector.items() if k in fields}
    model = detector_model(sc, scale, detector, deep_merge(by_method, detector_overrides))
    # a schedule only the scale names (AlignDet's 12k / 90k) starts from the recipe's defaults
    base = (det.recipes[schedule] if schedule in det.recipes else det.Recipe()).to_dict()
    rec = deep_merge(base, (entry.get("finetune") or {}).get(schedule, {}))
    if method and det.takes_method_overrides:
        mcls = get_method(method)
        rec = deep_merge(rec, mcls.finetune_overrides)
        for k, f in mcls.finetune_factors.items():
            if not isinstance(rec.get(k), (int, float)) or isinstance(rec.get(k), bool):
                raise ConfigError(f"{mcls.__name__}.finetune_factors.{k}: the {detector} recipe has no "
                                  f"numeric {k!r} (known: {', '.join(sorted(rec))})")
            rec[k] = rec[k] * f
    # "finetune": what the user writes (--set finetune.lr, a row's finetune_overrides)
    rec = det.Recipe.from_dict(deep_merge(rec, recipe_overrides), "finetune").to_dict()
    data = resolve_data_config(sc, data, data_overrides, ("train", "val"))
    if protocol == "voc" and data.get("kind") != "voc":
        data = voc_data(sc, scale)
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
