"""Weights out: a run's canonical state dict in the key space of detectron2, mmdetection or
torchvision, in the file each framework loads.

The canonical key space (``methods/base.py``): bare torchvision ResNet names for the backbone,
``fpn.*`` (torchvision ``FeaturePyramidNetwork``) and ``box_head.*`` (torchvision
``FastRCNNConvFCHead`` or ``TwoMLPHead``). Each framework has one key map, ``_KEY_MAPS``: rules
(canonical pattern, framework pattern), read left to right by ``to_framework`` and right to left
by ``from_framework``. Names follow detectron2's ``ResNet``/``FPN``/``FastRCNNConvFCHead`` and
mmdetection's ``ResNet``/``FPN``/``ConvFCBBoxHead`` (``ConvModule``: ``conv`` + ``bn``/``gn``).
The ResNet keys are bare in the detectron2 file, as in its model zoo's ``R-50.pkl`` and MoCo's
``convert-pretrain-to-detectron2.py``, so one file fits R50-FPN (``backbone.bottom_up.res2``) and
R50-C4 (``backbone.res2``, ``roi_heads.res5``) through ``matching_heuristics``. ``torchvision``:
the torchvision detection model's names (``backbone.body.``, ``backbone.fpn.``,
``roi_heads.box_head.``) in a plain state dict.

Nothing is dropped silently: a key with no place in the target raises ``ExportError`` naming
it, unless ``allow_unmapped``, which leaves it out and reports it. The conversion is a pure
renaming: values are the same arrays, so every round trip is bit-exact.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from benchmark.common.fs import atomic_open, sha256_file
from benchmark.common.paths import results_root
from benchmark.stages.base import get_stage
from methods.weights import read_state_dict

FRAMEWORKS = ("detectron2", "mmdet", "torchvision")
SUFFIX = {"detectron2": ".pkl", "mmdet": ".pth", "torchvision": ".pth"}
# what the target framework's config must say for torchvision-style weights (MoCo's
# detection/configs/pascal_voc_R_50_C4_24k_moco.yaml; mmdet's ResNet style='pytorch')
CONFIG_HINTS = {
    "detectron2": "MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB, MODEL.PIXEL_MEAN [123.675, 116.280, "
                  "103.530], MODEL.PIXEL_STD [58.395, 57.120, 57.375]",
    "mmdet": "backbone style='pytorch', img_norm_cfg mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375], "
             "to_rgb=True",
    "torchvision": "torchvision.models.detection builders; model.load_state_dict(state, strict=False)",
}


class ExportError(ValueError):
    """Keys with no place in the target framework, or a state that cannot be placed."""


# ------------------------------------------------------------------ key maps
# A rule is (canonical pattern, framework pattern); a key goes by the first rule whose pattern on
# its side takes it. ``{f}`` is field f's text (_FIELDS); ``{a*f+t}`` is integer field f times a
# plus the terms t (integers, or facts of the state: _EXPORT_FACTS, _IMPORT_FACTS), and read back
# f must be a whole number >= 0 that f's pattern takes. A field only on the framework side is
# written by _DERIVED. A side that is None: keys of the other side's pattern have no name there.
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_FIELDS = {
    "p": r"\w+",                    # a parameter or buffer
    "bn": "|".join(_BN_STATE),      # a BatchNorm's (or GroupNorm's) parameters and buffers
    "wb": "weight|bias",
    "rest": ".*",
    "norm": "bn|gn",                # mmcv ConvModule's norm attribute (build_norm_layer)
    "s": r"\d", "j": r"\d",         # ResNet stage (layer1..4), conv of a block
    "b": r"\d+", "i": r"\d+", "k": r"\d+",
    "x": "[67]",                    # P6/P7; TwoMLPHead's fc6/fc7
}

_RESNET_D2 = [  # torchvision models/resnet.py -> detectron2 modeling/backbone/resnet.py (res2..res5)
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.{p}", "stem.conv1.norm.{p}"),
    ("layer{s}.{b}.conv{j}.weight", "res{s+1}.{b}.conv{j}.weight"),
    ("layer{s}.{b}.bn{j}.{p}", "res{s+1}.{b}.conv{j}.norm.{p}"),
    ("layer{s}.{b}.downsample.0.weight", "res{s+1}.{b}.shortcut.weight"),
    ("layer{s}.{b}.downsample.1.{p}", "res{s+1}.{b}.shortcut.norm.{p}"),
]
_RESNET = [ours for ours, _ in _RESNET_D2]

_KEY_MAPS = {
    "detectron2": [
        *_RESNET_D2,
        # modeling/backbone/fpn.py: fpn_lateral{l}/fpn_output{l} for level l (C_l), top_block.p6/p7
        ("fpn.inner_blocks.{i}.0.{p}", "backbone.fpn_lateral{i+lvl0}.{p}"),
        ("fpn.inner_blocks.{i}.1.{bn}", "backbone.fpn_lateral{i+lvl0}.norm.{bn}"),
        ("fpn.layer_blocks.{i}.0.{p}", "backbone.fpn_output{i+lvl0}.{p}"),
        ("fpn.layer_blocks.{i}.1.{bn}", "backbone.fpn_output{i+lvl0}.norm.{bn}"),
        ("fpn.extra_blocks.p{x}.{wb}", "backbone.top_block.p{x}.{wb}"),
        # modeling/roi_heads/box_head.py FastRCNNConvFCHead: conv1.., fc1..
        ("box_head.{i}.0.{p}", "roi_heads.box_head.conv{i+1}.{p}"),
        ("box_head.{i}.1.{p}", "roi_heads.box_head.conv{i+1}.norm.{p}"),
        ("box_head.{2*k+fc0}.{wb}", "roi_heads.box_head.fc{k+1}.{wb}"),
        ("box_head.fc{x}.{wb}", "roi_heads.box_head.fc{x-5}.{wb}"),
    ],
    "mmdet": [
        *((ours, "backbone." + ours) for ours in _RESNET),      # backbones/resnet.py: torchvision's names
        # necks/fpn.py: lateral_convs, fpn_convs (the levels, then the extra convs), ConvModules
        ("fpn.inner_blocks.{i}.0.{p}", "neck.lateral_convs.{i}.conv.{p}"),
        ("fpn.inner_blocks.{i}.1.{bn}", "neck.lateral_convs.{i}.{norm}.{bn}"),
        ("fpn.extra_blocks.p{x}.{wb}", "neck.fpn_convs.{x+n_levels-6}.conv.{wb}"),
        (None, "neck.fpn_convs.{i+n_levels}.{rest}"),          # any other extra conv has no canonical name
        ("fpn.layer_blocks.{i}.0.{p}", "neck.fpn_convs.{i}.conv.{p}"),
        ("fpn.layer_blocks.{i}.1.{bn}", "neck.fpn_convs.{i}.{norm}.{bn}"),
        # roi_heads/bbox_heads/convfc_bbox_head.py: shared_convs (ConvModules), shared_fcs
        ("box_head.{i}.0.{p}", "roi_head.bbox_head.shared_convs.{i}.conv.{p}"),
        ("box_head.{i}.1.{p}", "roi_head.bbox_head.shared_convs.{i}.{norm}.{p}"),
        ("box_head.{2*k+fc0}.{wb}", "roi_head.bbox_head.shared_fcs.{k}.{wb}"),
        ("box_head.fc{x}.{wb}", "roi_head.bbox_head.shared_fcs.{x-6}.{wb}"),
    ],
    "torchvision": [   # models/detection/backbone_utils.py BackboneWithFPN, faster_rcnn.py
        *((ours, "backbone.body." + ours) for ours in _RESNET),
        ("fpn.{rest}", "backbone.fpn.{rest}"),
        ("box_head.{rest}", "roi_heads.box_head.{rest}"),
        ("rpn.{rest}", "rpn.{rest}"),
        ("roi_heads.{rest}", "roi_heads.{rest}"),
        (None, "backbone.{rest}"),                # read back: no other backbone key has a canonical name
        ("backbone.{rest}", "backbone.{rest}"),   # written: already detector names (AlignDet, a fine-tuned model)
    ],
}


def _distinct(state, pattern: str) -> set[str]:
    return {m.group(1) for k in state if (m := re.fullmatch(pattern, k))}


def _stage_channels(state: dict) -> dict[int, int]:
    """ResNet stage (1..4) -> its output channels, from the last conv of its last block."""
    last: dict[int, tuple] = {}
    for k, v in state.items():
        m = re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)\.weight", k)
        if m:
            s, b, j = map(int, m.groups())
            if s not in last or (b, j) > last[s][:2]:
                last[s] = (b, j, int(v.shape[0]))
    return {s: c for s, (_, _, c) in last.items()}


def _fpn_start_stage(state: dict) -> int:
    """The ResNet stage (1 = C2) feeding ``fpn.inner_blocks.0``, from its input channels (C2 for
    the R-CNNs, C3 for RetinaNet/FCOS)."""
    w = state.get("fpn.inner_blocks.0.0.weight")
    if w is None:
        raise ExportError("fpn.inner_blocks.0.0.weight: missing, so the FPN's levels are unknown")
    matches = [s for s, c in _stage_channels(state).items() if c == w.shape[1]]
    if len(matches) != 1:
        raise ExportError(f"fpn.inner_blocks.0.0.weight: its {w.shape[1]} input channels match "
                          f"{'no' if not matches else 'several'} ResNet stage outputs ({_stage_channels(state)}); "
                          "the FPN level of each block cannot be told")
    return matches[0]


def _norm_name(state: dict, module: str) -> str:
    """mmcv ConvModule's norm attribute: ``bn`` for BatchNorm (running stats), ``gn`` otherwise."""
    return "bn" if f"{module}.running_mean" in state else "gn"


_INNER = r"fpn\.inner_blocks\.(\d+)\..*"
_EXPORT_FACTS = {   # of the canonical state; FastRCNNConvFCHead: the convs, Flatten, then (Linear, ReLU)s
    "fc0": lambda s: len(_distinct(s, r"box_head\.(\d+)\.0\.weight")) + 1,
    "lvl0": lambda s: _fpn_start_stage(s) + 1 if _distinct(s, _INNER) else None,
    "n_levels": lambda s: len(_distinct(s, _INNER)),
}
_IMPORT_FACTS = {   # of the framework's state; no box head convs: a TwoMLPHead (fc6, fc7)
    "fc0": lambda s: (n + 1 if (n := len(_distinct(
        s, r"(?:roi_heads\.box_head\.conv|roi_head\.bbox_head\.shared_convs\.)(\d+)\..*"))) else None),
    "lvl0": lambda s: min((int(lvl) for lvl in _distinct(s, r"backbone\.fpn_lateral(\d)\..*")), default=2),
    "n_levels": lambda s: len(_distinct(s, r"neck\.lateral_convs\.(\d+)\..*")),
}
_DERIVED = {"norm": lambda state, key: _norm_name(state, key.rsplit(".", 1)[0])}

_SLOT = re.compile(r"\{(?:(\d+)\*)?(\w+)((?:[+-]\w+)*)\}")
_DIGITS = r"\d+"


def _offset(terms: tuple, facts: dict) -> int:
    return sum(int(t) if t[1:].isdigit() else int(t[0] + "1") * facts[t[1:]] for t in terms)


class _Pattern:
    """One side of a rule, compiled: ``match`` reads a key's fields, ``format`` writes them."""

    def __init__(self, template: str):
        self.template, self.scaled, parts, pos = template, {}, [], 0
        for m in _SLOT.finditer(template):
            a, f, terms = int(m[1] or 1), m[2], tuple(re.findall(r"[+-]\w+", m[3]))
            if a != 1 or terms:
                self.scaled[f] = (a, terms)
            parts += [re.escape(template[pos:m.start()]), f"(?P<{f}>{_DIGITS if f in self.scaled else _FIELDS[f]})"]
            pos = m.end()
        self.regex = re.compile("".join(parts) + re.escape(template[pos:]))
        self.fields = set(self.regex.groupindex)
        self.facts = {t[1:] for _, terms in self.scaled.values() for t in terms if not t[1:].isdigit()}

    def match(self, key: str, facts: dict) -> dict | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        fields = m.groupdict()
        for f, (a, terms) in self.scaled.items():
            v, r = divmod(int(fields[f]) - _offset(terms, facts), a)
            if r or v < 0 or not re.fullmatch(_FIELDS[f], str(v)):
                return None
            fields[f] = str(v)
        return fields

    def format(self, fields: dict, facts: dict) -> str:
        def slot(m):
            if m[2] not in self.scaled:
                return fields[m[2]]
            a, terms = self.scaled[m[2]]
            return str(a * int(fields[m[2]]) + _offset(terms, facts))
        return _SLOT.sub(slot, self.template)


class _KeyMap:
    """A framework's rules as (source, target) pattern pairs for each direction."""

    def __init__(self, rules):
        self.export = [(ours and _Pattern(ours), theirs and _Pattern(theirs)) for ours, theirs in rules]
        self.imports = [(theirs, ours) for ours, theirs in self.export]
        for ours, theirs in self.export:
            if ours and theirs and not (ours.fields <= theirs.fields and theirs.fields - ours.fields <= set(_DERIVED)):
                raise ValueError(f"rule {ours.template!r} -> {theirs.template!r}: fields do not correspond")
        self.facts = sorted({f for pair in self.export for p in pair if p for f in p.facts})


_MAPS = {fw: _KeyMap(rules) for fw, rules in _KEY_MAPS.items()}


def _translate(key: str, rules: list, facts: dict, state: dict) -> str | None:
    """``key`` in the target pattern of the first rule whose source pattern takes it; None when
    no rule does or that rule's target is None. A rule naming a fact that is None is skipped."""
    for src, dst in rules:
        if src is None or any(facts[f] is None for f in src.facts | (dst.facts if dst else set())):
            continue
        fields = src.match(key, facts)
        if fields is not None:
            derived = {f: _DERIVED[f](state, key) for f in dst.fields - fields.keys()} if dst else {}
            return dst and dst.format({**fields, **derived}, facts)
    return None


def _rename(state: dict, rules: list, facts: dict, *, unique: bool) -> tuple[dict, list[str]]:
    """(``state`` with the keys ``_translate`` places renamed, the keys it does not place);
    ``unique``: two keys onto one raise."""
    out, missing = {}, []
    for k, v in state.items():
        t = _translate(k, rules, facts, state)
        if t is None:
            missing.append(k)
        elif unique and t in out:
            raise ExportError(f"{k}: maps onto {t!r}, which another key already took")
        else:
            out[t] = v
    return out, missing


def to_framework(state: dict, framework: str) -> tuple[dict, list[str]]:
    """Canonical ``state`` -> (``{target key: value}``, canonical keys with no place)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"--to: unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    key_map = _MAPS[framework]
    return _rename(state, key_map.export, {f: _EXPORT_FACTS[f](state) for f in key_map.facts}, unique=True)


def from_framework(state: dict, framework: str) -> dict:
    """A framework's state (as ``to_framework`` writes it) -> canonical keys. Keys it does not
    know raise ``ExportError`` naming them."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    key_map = _MAPS[framework]
    out, unknown = _rename(state, key_map.imports, {f: _IMPORT_FACTS[f](state) for f in key_map.facts}, unique=False)
    if unknown:
        raise ExportError(f"{len(unknown)} {framework} keys have no canonical name: {unknown[:10]}")
    return out


# ------------------------------------------------------------------ files
def save_export(state: dict, framework: str, path: str | Path, *, meta: dict | None = None,
                allow_unmapped: bool = False) -> dict:
    """Write canonical ``state`` as ``framework``'s file at ``path``. Returns a report:
    ``{"framework", "path", "keys", "left_out", "config"}``."""
    mapped, unmapped = to_framework(state, framework)
    if unmapped and not allow_unmapped:
        raise ExportError(f"{len(unmapped)} keys have no {framework} name: {unmapped[:10]}"
                          f"{' ...' if len(unmapped) > 10 else ''} (--allow-unmapped leaves them out and lists them)")
    if not mapped:
        raise ExportError(f"no key maps to {framework} (first keys: {list(state)[:3]})")
    meta = {**(meta or {}), "left_out": unmapped}
    path = Path(path)
    with atomic_open(path) as f:
        if framework == "detectron2":
            pickle.dump({"model": {k: v.detach().cpu().numpy() for k, v in mapped.items()},
                         "__author__": "detbench", "matching_heuristics": True, "detbench": meta}, f)
        elif framework == "mmdet":
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in mapped.items()}, "meta": {"detbench": meta}}, f)
        else:
            torch.save({k: v.detach().cpu() for k, v in mapped.items()}, f)
    return {"framework": framework, "path": str(path), "keys": len(mapped), "left_out": unmapped,
            "config": CONFIG_HINTS[framework]}


def load_export(path: str | Path, framework: str) -> dict:
    """Read a file written by ``save_export`` back to canonical tensors."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: exported weights not found")
    if framework == "detectron2":
        with open(path, "rb") as f:
            obj = pickle.load(f)
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
            raise ExportError(f"{path}: field 'model': missing (not a detectron2 .pkl)")
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in obj["model"].items()}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"] if framework == "mmdet" else obj
    return from_framework(state, framework)


# ------------------------------------------------------------------ runs
_DETECTOR_TO_CANON = (("backbone.body.", ""), ("backbone.fpn.", "fpn."), ("roi_heads.box_head.", "box_head."))


def run_state(store, key: str) -> tuple[dict, dict]:
    """The canonical state of a finished run: a pretraining run's ``weights.pt``, or a
    fine-tuning run's ``model_final.pt`` (its detector keys renamed; heads keep theirs).
    Returns (state, run config)."""
    cfg = store.config(key)
    if cfg is None:
        raise ExportError(f"--run: no run {key!r} in {store.root}")
    if store.status(key) != "done":
        raise ExportError(f"--run: run {key} is {store.status(key)}, not done")
    stage = cfg.get("stage")
    if stage == "pretrain":
        return _read_output(store, key, stage), cfg
    if stage == "finetune":
        state = {}
        for k, v in _read_output(store, key, stage).items():
            for a, b in _DETECTOR_TO_CANON:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            state[k] = v
        return state, cfg
    raise ExportError(f"--run: run {key} is a {stage!r} run; export takes a pretraining or fine-tuning run")


def _read_output(store, key: str, stage: str) -> dict:
    """The state dict of the run's weights file (its stage's ``output``), checked first against
    the sha256 its metrics.json recorded: a missing, damaged or unreadable file is an
    ExportError naming it, never a traceback."""
    name, field = get_stage(stage).output
    path = store.run_dir(key) / name
    if not path.is_file():
        raise ExportError(f"--run: {path} is missing (a run from git keeps its metrics, not its weights)")
    recorded = (store.metrics(key) or {}).get(field)
    if recorded and sha256_file(path) != recorded:
        raise ExportError(f"--run: {path} does not match the {field} its metrics.json recorded (truncated "
                          f"or replaced): not exported")
    try:
        return read_state_dict(path)
    except ValueError as e:
        raise ExportError(f"--run: {e}") from None


def export_run(store, key: str, framework: str, out: str | Path | None = None, *,
               allow_unmapped: bool = False) -> dict:
    """Export run ``key`` of ``store`` to ``framework`` (default path
    ``<results>/exports/<key>/<framework><suffix>``)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"--to: unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    state, cfg = run_state(store, key)
    if out is None:
        out = results_root() / "exports" / key / f"{framework}{SUFFIX[framework]}"
    meta = {"run": key, "stage": cfg.get("stage"), "method": (cfg.get("method") or {}).get("name"),
            "label": cfg.get("label", "")}
    return save_export(state, framework, out, meta=meta, allow_unmapped=allow_unmapped)
