"""Weights out: a run's canonical state dict in the key space of detectron2, mmdetection or
torchvision, in the file each framework loads.

The canonical key space (``methods/base.py``): bare torchvision ResNet names for the backbone,
``fpn.*`` (torchvision ``FeaturePyramidNetwork``) and ``box_head.*`` (torchvision
``FastRCNNConvFCHead`` or ``TwoMLPHead``). Per framework:

============================  ================================  =====================================
canonical                     detectron2 (.pkl)                 mmdet (.pth, ``state_dict``)
============================  ================================  =====================================
``conv1.weight``, ``bn1.*``   ``stem.conv1.weight``, ``.norm``  ``backbone.conv1``, ``backbone.bn1``
``layer1.0.conv1.weight``     ``res2.0.conv1.weight``           ``backbone.layer1.0.conv1.weight``
``layer1.0.bn1.*``            ``res2.0.conv1.norm.*``           ``backbone.layer1.0.bn1.*``
``layer1.0.downsample.0/1``   ``res2.0.shortcut(.norm)``        ``backbone.layer1.0.downsample.0/1``
``fpn.inner_blocks.i.0/1``    ``backbone.fpn_lateral{l}``       ``neck.lateral_convs.i.conv/bn``
``fpn.layer_blocks.i.0/1``    ``backbone.fpn_output{l}``        ``neck.fpn_convs.i.conv/bn``
``fpn.extra_blocks.p6/p7``    ``backbone.top_block.p6/p7``      ``neck.fpn_convs.{n}/{n+1}.conv``
``box_head.i.0/1`` (conv i)   ``roi_heads.box_head.conv{i+1}``  ``roi_head.bbox_head.shared_convs.i``
``box_head.{n+1+2j}`` (fc j)  ``roi_heads.box_head.fc{j+1}``    ``roi_head.bbox_head.shared_fcs.j``
``box_head.fc6/fc7``          ``roi_heads.box_head.fc1/fc2``    ``roi_head.bbox_head.shared_fcs.0/1``
============================  ================================  =====================================

Names follow detectron2's ``ResNet``/``FPN``/``FastRCNNConvFCHead`` and mmdetection's
``ResNet``/``FPN``/``ConvFCBBoxHead`` (``ConvModule``: ``conv`` + ``bn``/``gn``). The ResNet
keys are bare in the detectron2 file, as in its model zoo's ``R-50.pkl`` and MoCo's
``convert-pretrain-to-detectron2.py``, so one file fits R50-FPN (``backbone.bottom_up.res2``)
and R50-C4 (``backbone.res2``, ``roi_heads.res5``) through ``matching_heuristics``. The FPN
level ``l`` of ``inner_blocks.0`` is read from its input channels (C2 for the R-CNNs, C3 for
RetinaNet/FCOS). ``torchvision``: the torchvision detection model's names
(``backbone.body.``, ``backbone.fpn.``, ``roi_heads.box_head.``) in a plain state dict.

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


# ------------------------------------------------------------------ canonical -> target
_RESNET = [  # (canonical regex, detectron2 template)
    (r"conv1\.weight", "stem.conv1.weight"),
    (r"bn1\.(?P<p>\w+)", "stem.conv1.norm.{p}"),
    (r"layer(?P<s>\d)\.(?P<b>\d+)\.conv(?P<j>\d)\.weight", "res{S}.{b}.conv{j}.weight"),
    (r"layer(?P<s>\d)\.(?P<b>\d+)\.bn(?P<j>\d)\.(?P<p>\w+)", "res{S}.{b}.conv{j}.norm.{p}"),
    (r"layer(?P<s>\d)\.(?P<b>\d+)\.downsample\.0\.weight", "res{S}.{b}.shortcut.weight"),
    (r"layer(?P<s>\d)\.(?P<b>\d+)\.downsample\.1\.(?P<p>\w+)", "res{S}.{b}.shortcut.norm.{p}"),
]
_RESNET_FROM_D2 = [  # (detectron2 regex, canonical template): the inverse of _RESNET
    (r"stem\.conv1\.weight", "conv1.weight"),
    (r"stem\.conv1\.norm\.(?P<p>\w+)", "bn1.{p}"),
    (r"res(?P<S>\d)\.(?P<b>\d+)\.conv(?P<j>\d)\.weight", "layer{s}.{b}.conv{j}.weight"),
    (r"res(?P<S>\d)\.(?P<b>\d+)\.conv(?P<j>\d)\.norm\.(?P<p>\w+)", "layer{s}.{b}.bn{j}.{p}"),
    (r"res(?P<S>\d)\.(?P<b>\d+)\.shortcut\.weight", "layer{s}.{b}.downsample.0.weight"),
    (r"res(?P<S>\d)\.(?P<b>\d+)\.shortcut\.norm\.(?P<p>\w+)", "layer{s}.{b}.downsample.1.{p}"),
]
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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
    """The ResNet stage (1 = C2) feeding ``fpn.inner_blocks.0``, from its input channels."""
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


def _box_head_convs(keys) -> int:
    return len({m.group(1) for k in keys if (m := re.fullmatch(r"box_head\.(\d+)\.0\.weight", k))})


def to_framework(state: dict, framework: str) -> tuple[dict, list[str]]:
    """Canonical ``state`` -> (``{target key: value}``, canonical keys with no place)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"--to: unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    n_convs = _box_head_convs(state)
    n_levels = len({m.group(1) for k in state if (m := re.fullmatch(r"fpn\.inner_blocks\.(\d+)\..*", k))})
    start = _fpn_start_stage(state) if framework == "detectron2" and n_levels else None
    out, unmapped = {}, []
    for k, v in state.items():
        t = _target_key(k, framework, state, n_convs, n_levels, start)
        if t is None:
            unmapped.append(k)
        elif t in out:
            raise ExportError(f"{k}: maps onto {t!r}, which another key already took")
        else:
            out[t] = v
    return out, unmapped


def _target_key(k: str, fw: str, state: dict, n_convs: int, n_levels: int, start: int | None) -> str | None:
    if fw == "torchvision":
        if k.startswith(("fpn.",)):
            return "backbone." + k
        if k.startswith("box_head."):
            return "roi_heads." + k
        if k.startswith(("rpn.", "roi_heads.", "backbone.")):
            return k               # already detector names (AlignDet, a fine-tuned model)
        return "backbone.body." + k if any(re.fullmatch(p, k) for p, _ in _RESNET) else None
    for pat, tmpl in _RESNET:
        m = re.fullmatch(pat, k)
        if m:
            if fw == "mmdet":
                return "backbone." + k
            g = m.groupdict()
            return tmpl.format(**g, S=int(g.get("s", 0)) + 1)
    m = re.fullmatch(r"fpn\.(inner_blocks|layer_blocks)\.(\d+)\.([01])\.(\w+)", k)
    if m:
        kind, i, part, p = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if part == "1" and p not in _BN_STATE:
            return None
        if fw == "detectron2":
            name = f"backbone.fpn_{'lateral' if kind == 'inner_blocks' else 'output'}{start + 1 + i}"
            return f"{name}.{p}" if part == "0" else f"{name}.norm.{p}"
        mod = f"neck.{'lateral_convs' if kind == 'inner_blocks' else 'fpn_convs'}.{i}"
        return f"{mod}.conv.{p}" if part == "0" else f"{mod}.{_norm_name(state, k.rsplit('.', 2)[0] + '.1')}.{p}"
    m = re.fullmatch(r"fpn\.extra_blocks\.p([67])\.(weight|bias)", k)
    if m:
        x, p = int(m.group(1)), m.group(2)
        return (f"backbone.top_block.p{x}.{p}" if fw == "detectron2"
                else f"neck.fpn_convs.{n_levels + x - 6}.conv.{p}")
    m = re.fullmatch(r"box_head\.(\d+)\.([01])\.(\w+)", k)
    if m:
        i, part, p = int(m.group(1)), m.group(2), m.group(3)
        if fw == "detectron2":
            return f"roi_heads.box_head.conv{i + 1}.{p}" if part == "0" else f"roi_heads.box_head.conv{i + 1}.norm.{p}"
        mod = f"roi_head.bbox_head.shared_convs.{i}"
        return f"{mod}.conv.{p}" if part == "0" else f"{mod}.{_norm_name(state, f'box_head.{i}.1')}.{p}"
    m = re.fullmatch(r"box_head\.(?:(\d+)|fc([67]))\.(weight|bias)", k)
    if m:
        if m.group(1):  # FastRCNNConvFCHead: convs, Flatten, then (Linear, ReLU) per fc
            off = int(m.group(1)) - n_convs - 1
            if off < 0 or off % 2:
                return None
            j = off // 2
        else:
            j = int(m.group(2)) - 6
        return (f"roi_heads.box_head.fc{j + 1}.{m.group(3)}" if fw == "detectron2"
                else f"roi_head.bbox_head.shared_fcs.{j}.{m.group(3)}")
    return None


# ------------------------------------------------------------------ target -> canonical
def from_framework(state: dict, framework: str) -> dict:
    """A framework's state (as ``to_framework`` writes it) -> canonical keys. Keys it does not
    know raise ``ExportError`` naming them."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    out, unknown = {}, []
    conv_ids = {m.group(1) for k in state
                if (m := re.fullmatch(r"(?:roi_heads\.box_head\.conv|roi_head\.bbox_head\.shared_convs\.)(\d+)\..*", k))}
    n_convs = len(conv_ids)
    laterals = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"backbone\.fpn_lateral(\d)\..*", k))})
    n_levels = len({m.group(1) for k in state if (m := re.fullmatch(r"neck\.lateral_convs\.(\d+)\..*", k))})
    for k, v in state.items():
        c = _canonical_key(k, framework, laterals[0] if laterals else 2, n_convs, n_levels)
        if c is None:
            unknown.append(k)
        else:
            out[c] = v
    if unknown:
        raise ExportError(f"{len(unknown)} {framework} keys have no canonical name: {unknown[:10]}")
    return out


def _canonical_key(k: str, fw: str, first_level: int, n_convs: int, n_levels: int) -> str | None:
    if fw == "torchvision":
        for a, b in (("backbone.body.", ""), ("backbone.fpn.", "fpn."), ("roi_heads.box_head.", "box_head.")):
            if k.startswith(a):
                return b + k[len(a):]
        return k if k.startswith(("rpn.", "roi_heads.")) else None
    if fw == "mmdet":
        if k.startswith("backbone."):
            bare = k[len("backbone."):]
            return bare if any(re.fullmatch(p, bare) for p, _ in _RESNET) else None
        m = re.fullmatch(r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn|gn)\.(\w+)", k)
        if m:
            kind, i, part, p = m.groups()
            if kind == "fpn_convs" and int(i) >= n_levels:
                return f"fpn.extra_blocks.p{int(i) - n_levels + 6}.{p}" if part == "conv" else None
            blocks = "inner_blocks" if kind == "lateral_convs" else "layer_blocks"
            return f"fpn.{blocks}.{i}.{0 if part == 'conv' else 1}.{p}"
        m = re.fullmatch(r"roi_head\.bbox_head\.shared_convs\.(\d+)\.(conv|bn|gn)\.(\w+)", k)
        if m:
            return f"box_head.{m.group(1)}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
        m = re.fullmatch(r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.(weight|bias)", k)
        if m:
            j = int(m.group(1))
            return f"box_head.{n_convs + 1 + 2 * j}.{m.group(2)}" if n_convs else f"box_head.fc{6 + j}.{m.group(2)}"
        return None
    # detectron2
    for pat, tmpl in _RESNET_FROM_D2:
        m = re.fullmatch(pat, k)
        if m:
            g = m.groupdict()
            return tmpl.format(**g, s=int(g.get("S", 1)) - 1)
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(norm\.)?(\w+)", k)
    if m:
        kind, lvl, norm, p = m.groups()
        blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
        return f"fpn.{blocks}.{int(lvl) - first_level}.{1 if norm else 0}.{p}"
    m = re.fullmatch(r"backbone\.top_block\.p([67])\.(weight|bias)", k)
    if m:
        return f"fpn.extra_blocks.p{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"roi_heads\.box_head\.conv(\d+)\.(norm\.)?(\w+)", k)
    if m:
        return f"box_head.{int(m.group(1)) - 1}.{1 if m.group(2) else 0}.{m.group(3)}"
    m = re.fullmatch(r"roi_heads\.box_head\.fc(\d+)\.(weight|bias)", k)
    if m:
        j = int(m.group(1)) - 1
        return f"box_head.{n_convs + 1 + 2 * j}.{m.group(2)}" if n_convs else f"box_head.fc{6 + j}.{m.group(2)}"
    return None


# ------------------------------------------------------------------ files
def save_export(state: dict, framework: str, path: str | Path, *, meta: dict | None = None,
                allow_unmapped: bool = False) -> dict:
    """Write canonical ``state`` as ``framework``'s file at ``path``. Returns a report:
    ``{"framework", "path", "keys", "left_out", "config"}``."""
    from benchmark.common.fs import atomic_open
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
    d = store.run_dir(key)
    if stage == "pretrain":
        from methods.weights import read_state_dict
        return read_state_dict(d / "weights.pt"), cfg
    if stage == "finetune":
        obj = torch.load(d / "model_final.pt", map_location="cpu", weights_only=False)
        state = {}
        for k, v in obj["state_dict"].items():
            for a, b in _DETECTOR_TO_CANON:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            state[k] = v
        return state, cfg
    raise ExportError(f"--run: run {key} is a {stage!r} run; export takes a pretraining or fine-tuning run")


def export_run(store, key: str, framework: str, out: str | Path | None = None, *,
               allow_unmapped: bool = False) -> dict:
    """Export run ``key`` of ``store`` to ``framework`` (default path
    ``<results>/exports/<key>/<framework><suffix>``)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"--to: unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    state, cfg = run_state(store, key)
    if out is None:
        from benchmark.common.paths import results_root
        out = results_root() / "exports" / key / f"{framework}{SUFFIX[framework]}"
    meta = {"run": key, "stage": cfg.get("stage"), "method": (cfg.get("method") or {}).get("name"),
            "label": cfg.get("label", "")}
    return save_export(state, framework, out, meta=meta, allow_unmapped=allow_unmapped)
