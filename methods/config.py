"""The typed-config parser every config of the project uses (methods, recipes, detectors,
scales): a dataclass from a plain dict, unknown keys, bad types and values out of range
(``RULES``, by field name) raised as ``ConfigError`` naming ``<prefix>.<key>``, before
anything runs."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import typing
from typing import Any, Callable


class ConfigError(ValueError):
    """A bad config value or key; the message names the key."""


@functools.lru_cache(maxsize=None)
def type_hints(obj) -> dict[str, Any]:
    """``typing.get_type_hints(obj)``, computed once per class (or function): it resolves
    every string annotation anew on each call, a third of planning a 1,000-run grid.  The
    dict is shared between callers: read it, never change it."""
    return typing.get_type_hints(obj)


def dataclass_from_dict(cls, d: dict | None, prefix: str):
    """Build dataclass ``cls`` from a plain dict; unknown keys and badly typed values raise
    ``ConfigError`` naming ``<prefix>.<key>``. Lists become tuples for tuple fields."""
    d = dict(d or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            near = difflib.get_close_matches(str(k), sorted(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{prefix}.{k}: unknown key (known: {', '.join(sorted(fields))}){hint}")
    hints = type_hints(cls)
    obj = cls(**{k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})
    check_fields(obj, prefix)
    return obj


EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce(v: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args:  # Optional[X] / X | None
        if v is None:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) > 1:   # int | float | None: a value of any of them is kept as it is
            if any(isinstance(v, a) and not (isinstance(v, bool) and a is not bool) for a in others):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{where}: expected a finite number, got {v!r}")
                return v
            raise ConfigError(f"{where}: expected {' or '.join(a.__name__ for a in others)}, got {v!r}")
        tp = others[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = (v,)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        return tuple(coerce(x, args[0] if args else Any, where) for x in v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true/false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    if tp is float:
        if isinstance(v, str) and EXPONENT.match(v):   # YAML 1.1 reads 3e-4 (no dot) as a string
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        if not math.isfinite(v):   # .inf / .nan (YAML): never a meaningful config value
            raise ConfigError(f"{where}: expected a finite number, got {v!r}")
        return float(v)
    if tp is str and not isinstance(v, str):
        raise ConfigError(f"{where}: expected a string, got {v!r}")
    return v


# ----------------------------------------------------------------------------- value rules
# Checked by field name on every dataclass this module builds (method configs, recipes,
# detector configs, table rows) and on the plain mappings that name the same fields (a scale's
# ``pretrain:`` and synthetic ``data:``), so that a meaningless value is a one-line error
# naming the field before any run starts, not a traceback inside it. A field without a rule
# is checked by its type only. Bounds are sanity bounds against typos (``--epochs 1e30``).
EPOCHS_MAX = 10 ** 6      # paper epochs; the longest published schedule here is 800 (PixPro)
COUNT_MAX = 10 ** 9       # steps, images, sizes, channels, queue lengths

Rule = tuple[Callable[[Any], bool], str]   # (holds, what is expected)


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count(lo: int = 1, hi: int = COUNT_MAX) -> Rule:
    want = "> 0" if lo == 1 else f">= {lo}"
    return (lambda v: _int(v) and lo <= v <= hi), f"{want} (an integer up to {hi:.0e})".replace("e+0", "e")


def between(lo: int, hi: int) -> Rule:
    return (lambda v: _int(v) and lo <= v <= hi), f"an integer in {lo}..{hi}"


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         optional: bool = False) -> Rule:
    def holds(v):
        if v is None:
            return optional
        return (_real(v) and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))
    if lo is not None and hi is not None:
        want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        want = "a finite number"
    return holds, want + ("" if lo is None or hi is not None else " (finite)") + (" or null" if optional else "")


def interval(hi: float | None = 1.0) -> Rule:
    """``[lo, hi]`` with ``0 < lo <= hi`` (``<= 1``: fractions of an area, RandomResizedCrop's scale)."""
    def holds(v):
        return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_real(x) for x in v)
                and 0 < v[0] <= v[1] and (hi is None or v[1] <= hi))
    return holds, "[lo, hi] with 0 < lo <= hi" + (f" <= {hi:g}" if hi is not None else "")


def each(rule: Rule, what: str, *, nonempty: bool = True, increasing: bool = False) -> Rule:
    holds = rule[0]

    def ok(v):
        return (isinstance(v, (tuple, list)) and (len(v) > 0 or not nonempty) and all(holds(x) for x in v)
                and (not increasing or list(v) == sorted(v)))
    return ok, ("" if nonempty else "possibly empty ") + ("increasing " if increasing else "") + what


PROB = real(0, 1)
WEIGHT = real(0)
POSITIVE = real(0, lo_open=True)
EPOCHS = (lambda v: _real(v) and 0 < v <= EPOCHS_MAX), f"> 0 (finite, at most {EPOCHS_MAX})"

RULES: dict[str, Rule] = {
    # optimisation (pretraining recipes and fine-tuning recipes)
    "lr": real(0), "base_lr": POSITIVE, "backbone_lr_mult": WEIGHT, "lr_batch": count(),
    "batch_size": count(), "weight_decay": WEIGHT, "weight_decay_norm": WEIGHT,
    "momentum": PROB,                  # SGD momentum and the EMA momentum of target networks
    "gamma": POSITIVE,                 # the lr's decay factor; PixPro's PPM sharpness
    "epochs": EPOCHS, "warmup_epochs": real(0), "steps_per_epoch": real(0, lo_open=True, optional=True),
    "steps": count(), "warmup_steps": count(0), "warmup_factor": real(0, 1, lo_open=True),
    "grad_clip": real(0, lo_open=True, optional=True), "ckpt_every": count(), "log_every": count(),
    "num_workers": count(0), "precise_bn_iters": count(0),
    "seed": count(0), "pretrain_epochs": (lambda v: v is None or EPOCHS[0](v), EPOCHS[1] + " or null"),
    # contrastive losses
    "temperature": POSITIVE, "queue_size": count(), "dim": count(), "embed_dim": count(),
    "hidden_dim": count(0),            # 0: the backbone's feature dim
    "proj_hidden_dim": count(), "proj_dim": count(), "pred_hidden_dim": count(),
    "contrastive_weight": WEIGHT, "instance_weight": WEIGHT, "pos_threshold": POSITIVE,
    "level_weights": each(WEIGHT, "weights >= 0", nonempty=False),
    "bn_groups": count(), "shuffle_bn_splits": count(), "pool_images": count(),
    # views (pixels)
    "crop_size": count(), "view_size": count(), "v3_size": count(), "star_v3_size": count(), "v4_size": count(),
    "v3_scale": WEIGHT,                # 0: v3_size
    "background_size": count(), "image_size": count(),
    "crop_scale": interval(), "fg_crop_scale": interval(), "cutout_area": interval(),
    "fg_crop_ratio": interval(None), "fg_size": each(count(), "[lo, hi] sizes > 0"),
    "flip_prob": PROB, "hflip_prob": PROB, "cutout_prob": PROB, "jitter_prob": PROB, "jitter_ratio": WEIGHT,
    "min_visible": PROB, "num_proposals": count(), "view_tries": count(), "random_candidates": count(),
    "short_sides": each(count(), "sizes > 0"), "min_size": each(count(), "sizes > 0"),
    "max_size": count(), "test_min_size": count(), "size_divisor": count(),
    # proposals and the synthetic scenes
    "ss_max_side": count(0),           # 0: the harness default
    "ss_min_scale": WEIGHT, "max_proposals": count(-1),   # -1: the detector's default, 0: all
    "num_pretrain": count(), "num_train": count(), "num_val": count(),
    "min_objects": count(), "max_objects": count(), "min_scale": real(0, 1, lo_open=True),
    "max_scale": real(0, 1, lo_open=True),
    # networks: FPNs, heads, transformers
    "fpn_channels": count(), "head_conv_dim": count(), "head_fc_dim": count(), "head_num_convs": count(0),
    "box_head_conv_dim": count(), "box_head_fc_dim": count(), "box_head_num_convs": count(0),
    "mask_head_dim": count(), "mask_head_convs": count(0), "head_convs": count(0),
    "roi_size": count(0),              # 0: the method's default per level
    "roi_sampling_ratio": count(-1),   # <= 0: adaptive (torchvision roi_align)
    "trainable_layers": between(0, 5), "anchor_stride": count(),
    "anchor_sizes": each(count(), "sizes > 0"), "aspect_ratios": each(POSITIVE, "ratios > 0"),
    "anchor_scales": each(POSITIVE, "scales > 0"), "anchor_ratios": each(POSITIVE, "ratios > 0"),
    "level_thresholds": each(POSITIVE, "bounds > 0", increasing=True),
    "anchor_iou": PROB, "anchor_nms": PROB, "roi_pos_iou": PROB, "rpn_pos_fraction": PROB,
    "fg_iou_thresh": PROB, "bg_iou_thresh": PROB, "box_score_thresh": PROB, "score_thresh": PROB,
    "nms_thresh": PROB, "center_sampling_radius": WEIGHT,
    "rpn_samples": count(), "roi_samples": count(), "fcos_points": count(), "detr_classes": count(),
    "rpn_batch_size_per_image": count(), "box_batch_size_per_image": count(),
    "rpn_pre_nms_top_n_train": count(), "rpn_pre_nms_top_n_test": count(),
    "rpn_post_nms_top_n_train": count(), "rpn_post_nms_top_n_test": count(),
    "box_detections_per_img": count(), "detections_per_img": count(), "topk_candidates": count(),
    "d_model": count(), "encoder_layers": count(0), "decoder_layers": count(), "attention_heads": count(),
    "ffn_dim": count(), "num_queries": count(), "dropout": real(0, 1, hi_open=True),
    "class_cost": count(0), "bbox_cost": count(0), "giou_cost": count(0), "bbox_loss_coefficient": count(0),
    "giou_loss_coefficient": count(0), "eos_coefficient": WEIGHT, "detr_no_object_weight": WEIGHT,
    "detr_cost": each(WEIGHT, "weights >= 0"), "detr_loss": each(WEIGHT, "weights >= 0"),
}

# (a, b): where a config has both fields, a <= b ("warm-up not longer than the run")
RELATIONS: tuple[tuple[str, str], ...] = (("warmup_steps", "steps"), ("warmup_epochs", "epochs"),
                                          ("min_objects", "max_objects"), ("min_scale", "max_scale"),
                                          ("bg_iou_thresh", "fg_iou_thresh"))

# The ResNets methods.backbones.build_resnet builds (its feature dims; tests/test_config_checks.py
# keeps the two equal). A detector takes the whole torchvision family (benchmark.detectors.base).
METHOD_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")

# rules for a method's config only (``check_method``; a detector's fields of the same name differ)
METHOD_RULES: dict[str, Rule] = {
    "backbone": ((lambda v: v in METHOD_BACKBONES), "one of " + " | ".join(METHOD_BACKBONES)),
    "ppm_layers": ((lambda v: v in (0, 1, 2)), "0, 1 or 2 (PixPro's transform g: identity | conv | MLP)"),
}


def _shown(v):
    return list(v) if isinstance(v, tuple) else v


def check_field(name: str, value: Any, where: str, rules: dict[str, Rule] | None = None) -> None:
    """The rule of field ``name`` (``RULES``, or ``rules``) on ``value``; a ConfigError naming
    ``where`` when it does not hold. A name without a rule passes."""
    rule = (RULES if rules is None else rules).get(name)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{where}: expected {rule[1]}, got {_shown(value)!r}")


def check_mapping(d: dict, prefix: str, rules: dict[str, Rule] | None = None) -> None:
    """``check_field`` on every key of a plain mapping, then ``RELATIONS`` between its keys."""
    for k, v in d.items():
        check_field(str(k), v, f"{prefix}.{k}", rules)
    for a, b in RELATIONS:
        if a in d and b in d and _real(d[a]) and _real(d[b]) and d[a] > d[b]:
            raise ConfigError(f"{prefix}.{a}: expected <= {prefix}.{b} ({_shown(d[b])!r}), got {_shown(d[a])!r}")


def check_fields(obj, prefix: str, rules: dict[str, Rule] | None = None) -> None:
    """``check_mapping`` over the fields of dataclass ``obj`` (those given and the defaults)."""
    check_mapping({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, prefix, rules)


def check_method(obj, prefix: str = "method") -> None:
    """A method's config: ``METHOD_RULES`` (``RULES`` ran when it was built)."""
    for f in dataclasses.fields(obj):
        check_field(f.name, getattr(obj, f.name), f"{prefix}.{f.name}", METHOD_RULES)
