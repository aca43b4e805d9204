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

import json
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
        # MoCo detection/train_net.py Res5ROIHeadsExtraNorm: ``self.res5.add_module("norm", ...)``
        ("box_head.norm.{bn}", "res5.norm.{bn}"),
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
        # mmselfsup ResLayerExtraNorm (MoCo's extra norm as an mmdet shared head): ``norm`` after layer4
        ("box_head.norm.{bn}", "roi_head.shared_head.norm.{bn}"),
    ],
    "torchvision": [   # models/detection/backbone_utils.py BackboneWithFPN, faster_rcnn.py
        *((ours, "backbone.body." + ours) for ours in _RESNET),
        ("fpn.{rest}", "backbone.fpn.{rest}"),
        ("box_head.{rest}", "roi_heads.box_head.{rest}"),
        ("rpn.{rest}", "rpn.{rest}"),
        ("roi_heads.{rest}", "roi_heads.{rest}"),
        ("head.{rest}", "head.{rest}"),            # RetinaNet / FCOS heads: torchvision's own names
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


_C4_MMDET = ("backbone.layer4.", "roi_head.shared_head.layer4.")   # mmdet C4: res5 is the shared head


def to_framework(state: dict, framework: str, *, ratios: int = 3) -> tuple[dict, list[str]]:
    """Canonical ``state`` -> (``{target key: value}``, canonical keys with no place). The heads
    of a fine-tuned detector are renamed and converted (``_HEAD_RULES``)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"--to: unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    kind = detector_kind(state)
    heads = {k: v for k, v in state.items() if kind != "pretrain" and k.startswith(HEAD_PREFIXES)}
    body = {k: v for k, v in state.items() if k not in heads}
    key_map = _MAPS[framework]
    out, missing = _rename(body, key_map.export, {f: _EXPORT_FACTS[f](body) for f in key_map.facts}, unique=True)
    if kind == "c4" and framework == "mmdet":
        a, b = _C4_MMDET
        out = {(b + k[len(a):] if k.startswith(a) else k): v for k, v in out.items()}
    if kind == "c4" and framework == "torchvision":   # no torchvision C4 model: its res5 norm has no place
        missing += [k for k in list(out) if k.startswith("roi_heads.box_head.norm.")]
        out = {k: v for k, v in out.items() if not k.startswith("roi_heads.box_head.norm.")}
        missing = [("box_head.norm." + k[len("roi_heads.box_head.norm."):]) if k.startswith("roi_heads.") else k
                   for k in missing]
    mapped, left = _heads_to(heads, framework, kind, ratios)
    return {**out, **mapped}, missing + left


def from_framework(state: dict, framework: str, *, kind: str | None = None, ratios: int = 3) -> dict:
    """A framework's state (as ``to_framework`` writes it) -> canonical keys. Keys it does not
    know raise ``ExportError`` naming them. ``kind``: the detector whose heads the file holds
    (``detector_kind``; the file's metadata records it)."""
    if framework not in FRAMEWORKS:
        raise ExportError(f"unknown framework {framework!r} ({' | '.join(FRAMEWORKS)})")
    heads = {}
    if kind and kind != "pretrain" and framework != "torchvision":
        heads, state = _heads_from(state, framework, kind, ratios)
        if kind == "c4" and framework == "mmdet":
            b, a = _C4_MMDET
            state = {(b + k[len(a):] if k.startswith(a) else k): v for k, v in state.items()}
    key_map = _MAPS[framework]
    out, unknown = _rename(state, key_map.imports, {f: _IMPORT_FACTS[f](state) for f in key_map.facts}, unique=False)
    out.update(heads)
    if unknown:
        raise ExportError(f"{len(unknown)} {framework} keys have no canonical name: {unknown[:10]}")
    return out


# ------------------------------------------------------------------ heads of a fine-tuned detector
# The heads keep torchvision's names in the canonical space (``rpn.*``, ``roi_heads.*``,
# ``head.*``). To detectron2 and mmdet they are renamed *and converted*, where the layouts
# differ (facts of the frameworks' code, not copied):
# - box classifier: torchvision's class 0 is the background; detectron2's
#   ``FastRCNNOutputLayers.cls_score`` and mmdet's ``fc_cls`` put it last (index K).
# - class-specific box deltas: torchvision has K+1 groups of 4 (the background's, never used:
#   ``postprocess_detections`` drops them); detectron2's ``bbox_pred`` and mmdet's ``fc_reg``
#   have K. The mask logits: torchvision K+1 (background unused), both others K.
# - RetinaNet's sigmoid classifier counts our background slot 0 (never a positive); detectron2's
#   ``cls_score`` and mmdet's ``retina_cls`` have K classes per anchor (anchor-major in all three).
# - anchors at one location: torchvision's ``AnchorGenerator`` orders them ratio-major
#   (``w_ratios[:, None] * scales[None, :]``), as mmdet's (``scale_major=True`` computes the same
#   product); detectron2's ``DefaultAnchorGenerator.generate_cell_anchors`` size-major (``for
#   size ... for aspect_ratio``). Equal for one size per level (the FPN R-CNNs); the C4 RPN (5
#   sizes x 3 ratios) and RetinaNet (3 octave scales x 3 ratios) are permuted for detectron2.
# A value dropped (a background slot) reads back as zeros: the rest round-trips bit-exact.
_HEAD_RULES = {   # kind -> framework -> [(canonical pattern, framework pattern, conversion)]
    "rcnn": {
        "detectron2": [
            ("rpn.head.conv.0.0.{wb}", "proposal_generator.rpn_head.conv.{wb}", None),   # rpn.py StandardRPNHead
            ("rpn.head.cls_logits.{wb}", "proposal_generator.rpn_head.objectness_logits.{wb}", "anchors1"),
            ("rpn.head.bbox_pred.{wb}", "proposal_generator.rpn_head.anchor_deltas.{wb}", "anchors4"),
            ("roi_heads.box_predictor.cls_score.{wb}", "roi_heads.box_predictor.cls_score.{wb}", "bg_last"),
            ("roi_heads.box_predictor.bbox_pred.{wb}", "roi_heads.box_predictor.bbox_pred.{wb}", "drop_bg4"),
            # mask_head.py MaskRCNNConvUpsampleHead: mask_fcn1.., deconv, predictor
            ("roi_heads.mask_head.{i}.0.{wb}", "roi_heads.mask_head.mask_fcn{i+1}.{wb}", None),
            ("roi_heads.mask_head.{i}.1.{bn}", "roi_heads.mask_head.mask_fcn{i+1}.norm.{bn}", None),
            ("roi_heads.mask_predictor.conv5_mask.{wb}", "roi_heads.mask_head.deconv.{wb}", None),
            ("roi_heads.mask_predictor.mask_fcn_logits.{wb}", "roi_heads.mask_head.predictor.{wb}", "drop_bg1"),
        ],
        "mmdet": [
            ("rpn.head.conv.0.0.{wb}", "rpn_head.rpn_conv.{wb}", None),     # dense_heads/rpn_head.py
            ("rpn.head.cls_logits.{wb}", "rpn_head.rpn_cls.{wb}", None),
            ("rpn.head.bbox_pred.{wb}", "rpn_head.rpn_reg.{wb}", None),
            ("roi_heads.box_predictor.cls_score.{wb}", "roi_head.bbox_head.fc_cls.{wb}", "bg_last"),
            ("roi_heads.box_predictor.bbox_pred.{wb}", "roi_head.bbox_head.fc_reg.{wb}", "drop_bg4"),
            # mask_heads/fcn_mask_head.py FCNMaskHead: convs (ConvModules), upsample, conv_logits
            ("roi_heads.mask_head.{i}.0.{wb}", "roi_head.mask_head.convs.{i}.conv.{wb}", None),
            ("roi_heads.mask_head.{i}.1.{bn}", "roi_head.mask_head.convs.{i}.{norm}.{bn}", None),
            ("roi_heads.mask_predictor.conv5_mask.{wb}", "roi_head.mask_head.upsample.{wb}", None),
            ("roi_heads.mask_predictor.mask_fcn_logits.{wb}", "roi_head.mask_head.conv_logits.{wb}", "drop_bg1"),
        ],
    },
    "retinanet": {
        "detectron2": [   # meta_arch/retinanet.py RetinaNetHead: cls_subnet / bbox_subnet (conv, ReLU)*4
            ("head.classification_head.conv.{i}.0.{wb}", "head.cls_subnet.{2*i}.{wb}", None),
            ("head.classification_head.cls_logits.{wb}", "head.cls_score.{wb}", "retina_cls_d2"),
            ("head.regression_head.conv.{i}.0.{wb}", "head.bbox_subnet.{2*i}.{wb}", None),
            ("head.regression_head.bbox_reg.{wb}", "head.bbox_pred.{wb}", "anchors4"),
        ],
        "mmdet": [        # dense_heads/retina_head.py: cls_convs / reg_convs (ConvModules), retina_cls/reg
            ("head.classification_head.conv.{i}.0.{wb}", "bbox_head.cls_convs.{i}.conv.{wb}", None),
            ("head.classification_head.cls_logits.{wb}", "bbox_head.retina_cls.{wb}", "retina_cls"),
            ("head.regression_head.conv.{i}.0.{wb}", "bbox_head.reg_convs.{i}.conv.{wb}", None),
            ("head.regression_head.bbox_reg.{wb}", "bbox_head.retina_reg.{wb}", None),
        ],
    },
}
_HEAD_RULES["c4"] = _HEAD_RULES["rcnn"]   # Res5ROIHeads' mask head: deconv + predictor, no convs
# why a head has no place, where it has none
_NO_HEAD_PLACE = {
    "fcos": "torchvision's FCOSHead (GroupNorm convs, centerness on the regression branch) is not mapped to "
            "detectron2's or mmdet's FCOS heads: their layouts were not checked against those modules",
    "detr": "DETR's transformer keys are HuggingFace transformers' names, which neither framework uses",
    "c4-torchvision": "torchvision has no C4 R-CNN (its detection builders are FPN): the RPN on C4, res5 as the "
                      "RoI head and its extra norm have no torchvision module",
}
HEAD_PREFIXES = ("rpn.", "roi_heads.", "head.")


def detector_kind(state: dict) -> str:
    """What a canonical state holds: ``pretrain`` (no detector heads), ``rcnn`` (FPN R-CNN),
    ``c4`` (R-CNN on C4, res5 as the RoI head), ``retinanet``, ``fcos`` or ``detr``."""
    if any(k.startswith(("transformer.", "model.", "class_embed.", "bbox_embed.", "query_", "input_proj"))
           for k in state):
        return "detr"
    if "head.regression_head.bbox_ctrness.weight" in state:
        return "fcos"
    if "head.classification_head.cls_logits.weight" in state:
        return "retinanet"
    if any(k.startswith("rpn.") for k in state):
        return "rcnn" if any(k.startswith("fpn.") for k in state) else "c4"
    return "pretrain"


def _anchor_perm(a: int, ratios: int) -> torch.Tensor | None:
    """Index into torchvision's anchors (ratio-major) of each detectron2 anchor (size-major);
    None when they agree (one size)."""
    if a % ratios:
        raise ExportError(f"{a} anchors per location are not a multiple of {ratios} aspect ratios")
    sizes = a // ratios
    if sizes == 1:
        return None
    return torch.tensor([r * sizes + s for s in range(sizes) for r in range(ratios)])


def _convert(v: torch.Tensor, how: str | None, facts: dict, inverse: bool) -> torch.Tensor:
    """A head tensor in the target layout (``inverse``: back to torchvision's)."""
    if how is None:
        return v
    if how == "bg_last":   # [bg, c1..cK] <-> [c1..cK, bg]
        return torch.roll(v, 1 if inverse else -1, dims=0)
    if how in ("drop_bg4", "drop_bg1"):
        n = 4 if how == "drop_bg4" else 1
        return torch.cat([v.new_zeros((n, *v.shape[1:])), v]) if inverse else v[n:]
    a = facts["anchors"]
    if how.startswith("anchors"):
        perm = _anchor_perm(a, facts["ratios"])
        if perm is None:
            return v
        g = v.shape[0] // a
        if inverse:
            perm = torch.argsort(perm)
        return v.reshape(a, g, *v.shape[1:])[perm].reshape(v.shape)
    # retina_cls(_d2): [A x (K+1)] <-> [A x K], anchor-major
    perm = _anchor_perm(a, facts["ratios"]) if how == "retina_cls_d2" else None
    if inverse:
        per = v.reshape(a, v.shape[0] // a, *v.shape[1:])
        if perm is not None:
            per = per[torch.argsort(perm)]
        per = torch.cat([per.new_zeros((a, 1, *v.shape[1:])), per], 1)
    else:
        per = v.reshape(a, v.shape[0] // a, *v.shape[1:])[:, 1:]
        if perm is not None:
            per = per[perm]
    return per.reshape(-1, *v.shape[1:])


def _head_maps(kind: str, framework: str) -> list:
    return [(_Pattern(o), _Pattern(t), how) for o, t, how in _HEAD_RULES.get(kind, {}).get(framework, [])]


def _head_facts(state: dict, kind: str, ratios: int, *, canonical: bool) -> dict:
    """Anchors per location: the RPN's objectness channels, RetinaNet's box deltas / 4."""
    per = ({"rpn.head.cls_logits.weight": 1, "head.regression_head.bbox_reg.weight": 4} if canonical else
           {"proposal_generator.rpn_head.objectness_logits.weight": 1, "head.bbox_pred.weight": 4,
            "rpn_head.rpn_cls.weight": 1, "bbox_head.retina_reg.weight": 4})
    k = next((k for k in per if k in state), None)
    return {"anchors": int(state[k].shape[0]) // per[k] if k else 1, "ratios": ratios}


def _heads_to(heads: dict, framework: str, kind: str, ratios: int) -> tuple[dict, list[str]]:
    """The fine-tuned heads (canonical = torchvision names) in ``framework``'s names and layouts."""
    if framework == "torchvision":
        return ({}, list(heads)) if kind == "c4" else (dict(heads), [])
    rules = _head_maps(kind, framework)
    facts = _head_facts(heads, kind, ratios, canonical=True)
    out, left = {}, []
    for k, v in heads.items():
        for src, dst, how in rules:
            fields = src.match(k, {})
            if fields is not None:
                fields = {**fields, **{f: _norm_name(heads, k.rsplit(".", 1)[0]) for f in dst.fields - fields.keys()}}
                out[dst.format(fields, {})] = _convert(v, how, facts, inverse=False)
                break
        else:
            left.append(k)
    return out, left


def _heads_from(state: dict, framework: str, kind: str, ratios: int) -> tuple[dict, dict]:
    """(framework head keys read back to canonical, the rest of ``state``)."""
    rules = _head_maps(kind, framework)
    facts = _head_facts(state, kind, ratios, canonical=False)
    heads, rest = {}, {}
    for k, v in state.items():
        for src, dst, how in rules:
            fields = dst.match(k, {})
            if fields is not None:
                heads[src.format(fields, {})] = _convert(v, how, facts, inverse=True)
                break
        else:
            rest[k] = v
    return heads, rest


# ------------------------------------------------------------------ config fragments
_MEAN, _STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]   # torchvision's, in 0-255 RGB
_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def describe(state: dict) -> dict:
    """What an export holds, read from its canonical keys and shapes: ResNet depth, FPN levels,
    widths and norm, box head layout, detector heads."""
    blocks = tuple(len(_distinct(state, rf"layer{s}\.(\d+)\.conv1\.weight")) for s in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = 50 if bottleneck and blocks == (3, 4, 6, 3) else _DEPTHS.get(blocks) if not bottleneck or blocks != (2, 2, 2, 2) else None
    if bottleneck and blocks in ((3, 4, 23, 3), (3, 8, 36, 3)):
        depth = _DEPTHS[blocks]
    d: dict = {"kind": detector_kind(state), "depth": depth if any(blocks) else None,
               "stage_channels": _stage_channels(state)}
    if "fpn.inner_blocks.0.0.weight" in state:
        n = len(_distinct(state, _INNER))
        start = _fpn_start_stage(state)
        norm = ("bn" if "fpn.inner_blocks.0.1.running_mean" in state else
                "gn" if "fpn.inner_blocks.0.1.weight" in state else None)
        p6 = state.get("fpn.extra_blocks.p6.weight")
        d["fpn"] = {"levels": list(range(start + 1, start + 1 + n)), "channels": int(state["fpn.inner_blocks.0.0.weight"].shape[0]),
                    "in_channels": [int(state[f"fpn.inner_blocks.{i}.0.weight"].shape[1]) for i in range(n)],
                    "norm": norm, "p6p7_in": int(p6.shape[1]) if p6 is not None else None}
    convs = sorted(int(i) for i in _distinct(state, r"box_head\.(\d+)\.0\.weight"))
    if convs:
        fc = state[f"box_head.{len(convs) + 1}.weight"]
        d["box_head"] = {"type": "4conv1fc" if len(convs) == 4 else f"{len(convs)}conv1fc", "num_conv": len(convs),
                         "conv_dim": int(state["box_head.0.0.weight"].shape[0]), "fc_dim": int(fc.shape[0]),
                         "norm": "bn" if "box_head.0.1.running_mean" in state else "gn" if "box_head.0.1.weight" in state else None,
                         "extra_norm": "box_head.extra_norm.weight" in state}
    elif "box_head.fc6.weight" in state:
        d["box_head"] = {"type": "2mlp", "num_conv": 0, "fc_dim": int(state["box_head.fc6.weight"].shape[0]),
                         "norm": None, "extra_norm": False}
    if "box_head.norm.weight" in state:
        d["res5_norm"] = True
    if "roi_heads.box_predictor.cls_score.weight" in state:
        d["num_classes"] = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1   # less background
    if d["kind"] == "retinanet":
        a = int(state["head.regression_head.bbox_reg.weight"].shape[0]) // 4
        d["num_classes"] = int(state["head.classification_head.cls_logits.weight"].shape[0]) // a - 1
        d["head_norm"] = "head.classification_head.conv.0.1.weight" in state
    if d["kind"] == "fcos":   # torchvision's FCOSHead: one anchor per location, cls_logits = classes + background
        d["num_classes"] = int(state["head.classification_head.cls_logits.weight"].shape[0]) - 1
    if d["kind"] in ("rcnn", "c4"):
        d["mask"] = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
        d["mask_convs"] = len(_distinct(state, r"roi_heads\.mask_head\.(\d+)\.0\.weight"))
        d["mask_norm"] = "roi_heads.mask_head.0.1.running_mean" in state
        m = state.get("roi_heads.mask_predictor.conv5_mask.weight")
        d["mask_dim"] = int(m.shape[1]) if m is not None else 256
        d["rpn_convs"] = len(_distinct(state, r"rpn\.head\.conv\.(\d+)\.0\.weight"))
    return d


def _yaml(tree: dict, indent: int = 0) -> list[str]:
    lines = []
    for k, v in tree.items():
        if isinstance(v, dict):
            lines += [" " * indent + f"{k}:"] + _yaml(v, indent + 2)
        else:
            text = (("True" if v else "False") if isinstance(v, bool) else json.dumps(v) if isinstance(v, (str, list))
                    else str(v))
            lines.append(" " * indent + f"{k}: {text}")
    return lines


def detectron2_config(d: dict, weights: str) -> tuple[dict, list[str]]:
    """The detectron2 config keys (``MODEL.*``, ``INPUT.*``; names of detectron2's
    ``config/defaults.py``) under which the export loads whole, and what has no place."""
    unplaced: list[str] = []
    norm = "SyncBN"     # trainable BN with statistics in the file (MoCo's Base-RCNN-*-BN.yaml: SyncBN)
    resnets = {"DEPTH": d["depth"], "STRIDE_IN_1X1": False, "NORM": norm}
    if d["depth"] in (18, 34):
        resnets["RES2_OUT_CHANNELS"] = 64       # detectron2 requires 64 for basic-block ResNets
    model: dict = {"WEIGHTS": weights, "PIXEL_MEAN": _MEAN, "PIXEL_STD": _STD,
                   "BACKBONE": {"FREEZE_AT": 0}, "RESNETS": resnets}
    fpn = d.get("fpn")
    kind = d["kind"]
    if kind == "retinanet" or (fpn and fpn["levels"][0] == 3):
        model["META_ARCHITECTURE"] = "RetinaNet"
        model["BACKBONE"]["NAME"] = "build_retinanet_resnet_fpn_backbone"
        resnets["OUT_FEATURES"] = ["res3", "res4", "res5"]
        model["FPN"] = {"IN_FEATURES": ["res3", "res4", "res5"]}
        if d.get("num_classes"):
            model["RETINANET"] = {"NUM_CLASSES": d["num_classes"]}
    elif kind == "c4":
        model["META_ARCHITECTURE"] = "GeneralizedRCNN"
        model["ROI_HEADS"] = {"NAME": "Res5ROIHeadsExtraNorm" if d.get("res5_norm") else "Res5ROIHeads"}
        if d.get("num_classes"):
            model["ROI_HEADS"]["NUM_CLASSES"] = d["num_classes"]
        model["MASK_ON"] = bool(d.get("mask"))
    else:
        model["META_ARCHITECTURE"] = "GeneralizedRCNN"
        model["BACKBONE"]["NAME"] = "build_resnet_fpn_backbone"
        resnets["OUT_FEATURES"] = ["res2", "res3", "res4", "res5"]
        model["FPN"] = {}
        model["ROI_HEADS"] = {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]}
        if d.get("num_classes"):
            model["ROI_HEADS"]["NUM_CLASSES"] = d["num_classes"]
        if kind == "rcnn":
            model["MASK_ON"] = bool(d.get("mask"))
            if d.get("mask"):
                model["ROI_MASK_HEAD"] = {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": d["mask_convs"],
                                          "CONV_DIM": d["mask_dim"],
                                          "NORM": norm if d["mask_norm"] else ""}
            if d.get("rpn_convs", 1) != 1:
                unplaced.append(f"rpn.head.conv.1..: {d['rpn_convs']} RPN convs (detectron2's StandardRPNHead: one)")
    if fpn:
        model["FPN"].update({"OUT_CHANNELS": fpn["channels"], "NORM": {"bn": norm, "gn": "GN"}.get(fpn["norm"], "")})
    bh = d.get("box_head")
    if bh:
        model["ROI_BOX_HEAD"] = {"NAME": "FastRCNNConvFCHead", "NUM_CONV": bh["num_conv"],
                                 "NUM_FC": 2 if bh["type"] == "2mlp" else 1, "FC_DIM": bh["fc_dim"],
                                 "NORM": {"bn": norm, "gn": "GN"}.get(bh["norm"], "")}
        if bh["num_conv"]:
            model["ROI_BOX_HEAD"]["CONV_DIM"] = bh["conv_dim"]
        if bh["extra_norm"]:
            unplaced.append("box_head.extra_norm.*: InsLoc's FastRCNNConvFCHeadExtraNorm (official "
                            "transfer/detection/train_net.py) is not a detectron2 module")
    if kind in ("fcos", "detr"):
        unplaced.append(f"{kind} heads: {_NO_HEAD_PLACE[kind]}")
    return {"MODEL": model, "INPUT": {"FORMAT": "RGB"}}, unplaced


def _py(v) -> str:
    if isinstance(v, dict):
        return "dict(" + ", ".join(f"{k}={_py(x)}" for k, x in v.items()) + ")"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_py(x) for x in v)
        return f"({inner},)" if isinstance(v, tuple) and len(v) == 1 else f"({inner})" if isinstance(v, tuple) else f"[{inner}]"
    return repr(v)


def mmdet_config(d: dict, weights: str) -> tuple[dict, list[str]]:
    """An mmdet 3.x config dict (``model``, ``load_from``) under which the export loads whole."""
    unplaced: list[str] = []
    norm = dict(type="SyncBN", requires_grad=True)
    kind, fpn, bh = d["kind"], d.get("fpn"), d.get("box_head")
    stages = 3 if kind == "c4" else 4
    backbone = dict(type="ResNet", depth=d["depth"], num_stages=stages,
                    out_indices=(2,) if kind == "c4" else (0, 1, 2, 3), frozen_stages=-1, norm_cfg=norm,
                    norm_eval=False, style="pytorch")
    model: dict = dict(data_preprocessor=dict(type="DetDataPreprocessor", mean=_MEAN, std=_STD, bgr_to_rgb=True),
                       backbone=backbone)
    c = d["stage_channels"]
    if fpn:
        neck = dict(type="FPN", in_channels=[c[s] for s in (1, 2, 3, 4)], out_channels=fpn["channels"])
        if fpn["levels"][0] == 3 or kind == "retinanet":
            # RetinaNet: P3-P5 + P6/P7 from C5, ReLU before P7 (torchvision LastLevelP6P7, detectron2's too);
            # mmdet's default relu_before_extra_convs=False gives another P7
            neck.update(start_level=1, add_extra_convs="on_input", relu_before_extra_convs=True, num_outs=5)
        else:
            neck.update(num_outs=5)
        if fpn["norm"]:
            neck["norm_cfg"] = norm if fpn["norm"] == "bn" else dict(type="GN", num_groups=32, requires_grad=True)
            if fpn["p6p7_in"]:
                unplaced.append("fpn.extra_blocks.p6/p7: mmdet's FPN puts norm_cfg on its extra convs too "
                                "(ConvModule, no bias); these P6/P7 have a bias and no norm")
        model["neck"] = neck
    if kind == "retinanet":
        model["bbox_head"] = dict(type="RetinaHead", num_classes=d["num_classes"], in_channels=fpn["channels"],
                                  stacked_convs=4, feat_channels=fpn["channels"])
    elif kind in ("rcnn", "c4", "pretrain") and (kind != "pretrain" or bh or (fpn and fpn["levels"][0] == 2)):
        roi = {}
        # the widths the heads take (mmdet's defaults are R50's: 256 for FPN, C4 1024 / res5 2048):
        # the RPN and RoI extractor take the FPN's (C4: C4's) channels, the box head the RoI features
        # (C4: res5's output)
        feat = fpn["channels"] if fpn else c[3]
        roi_in = fpn["channels"] if fpn else c[4]
        model["rpn_head"] = dict(in_channels=feat, feat_channels=feat)
        roi["bbox_roi_extractor"] = dict(out_channels=feat)
        if kind == "c4":
            roi["shared_head"] = dict(type="ResLayerExtraNorm" if d.get("res5_norm") else "ResLayer",
                                      depth=d["depth"], stage=3, stride=2, style="pytorch", norm_cfg=norm, norm_eval=False)
        if bh:
            kw = dict(num_shared_convs=bh["num_conv"], num_shared_fcs=1 if bh["num_conv"] else 2,
                      conv_out_channels=bh.get("conv_dim", 256), fc_out_channels=bh["fc_dim"])
            t = {(4, 1): "Shared4Conv1FCBBoxHead", (0, 2): "Shared2FCBBoxHead"}.get((kw["num_shared_convs"], kw["num_shared_fcs"]))
            head = dict(type=t) if t else dict(type="ConvFCBBoxHead", **kw)
            if t:
                head.update({k: v for k, v in kw.items() if k in ("conv_out_channels", "fc_out_channels")})
            head["in_channels"] = roi_in
            if bh["norm"]:
                head["norm_cfg"] = norm if bh["norm"] == "bn" else dict(type="GN", num_groups=32, requires_grad=True)
            if d.get("num_classes"):
                head["num_classes"] = d["num_classes"]
            roi["bbox_head"] = head
            if bh["extra_norm"]:
                unplaced.append("box_head.extra_norm.*: InsLoc's extra norm after fc1 is not an mmdet module")
        elif d.get("num_classes"):
            roi["bbox_head"] = dict(in_channels=roi_in, num_classes=d["num_classes"])
        if d.get("mask"):
            if fpn:
                roi["mask_roi_extractor"] = dict(out_channels=feat)
            roi["mask_head"] = dict(type="FCNMaskHead", num_convs=d["mask_convs"], in_channels=roi_in,
                                    conv_out_channels=d["mask_dim"], num_classes=d["num_classes"])
            if d["mask_norm"]:
                roi["mask_head"]["norm_cfg"] = norm
        if roi:
            model["roi_head"] = roi
    if kind in ("fcos", "detr"):
        unplaced.append(f"{kind} heads: {_NO_HEAD_PLACE[kind]}")
    return {"model": model, "load_from": weights}, unplaced


def torchvision_code(d: dict, weights: str) -> tuple[str, list[str]]:
    """Python that builds the torchvision model the export loads into whole (``model``) and
    loads it; a stock builder where one has exactly these modules, else the model from parts."""
    kind, fpn, bh = d["kind"], d.get("fpn"), d.get("box_head")
    if kind in ("c4", "detr"):
        return "", [f"{kind}: {_NO_HEAD_PLACE['c4-torchvision' if kind == 'c4' else kind]}"]
    k = d.get("num_classes")
    nc = f"{k + 1}" if k else "NUM_CLASSES"
    preamble = "" if k else "NUM_CLASSES = 91   # your classes + the background\n"
    load = ("state = torch.load(%r, weights_only=True)\n"
            "missing, unexpected = model.load_state_dict(state, strict=False)\n"
            "assert not unexpected, unexpected\n" % weights)
    v2_fpn = fpn and fpn["norm"] == "bn" and fpn["channels"] == 256 and not fpn["p6p7_in"]
    v2_box = bh and bh["type"] == "4conv1fc" and bh["norm"] == "bn" and bh["conv_dim"] == 256 and bh["fc_dim"] == 1024
    v1_box = bh and bh["type"] == "2mlp" and bh["fc_dim"] == 1024
    if d["depth"] == 50 and kind == "pretrain" and (not fpn or fpn["levels"][0] == 2) and not (bh and bh["extra_norm"]):
        if (not fpn or v2_fpn) and (not bh or v2_box):       # SoCo / InsLoc R50 heads; any backbone-only export
            return ("import torch\nfrom torchvision.models.detection import maskrcnn_resnet50_fpn_v2\n" + preamble +
                    f"model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes={nc})\n" + load), []
        if fpn and not fpn["norm"] and fpn["channels"] == 256 and (not bh or v1_box):
            return ("import torch\nfrom torchvision.models.detection import maskrcnn_resnet50_fpn\n" + preamble +
                    f"model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes={nc})\n" + load), []
    # from parts: torchvision's own modules with the export's widths and norms
    c = d["stage_channels"]
    ch = fpn["channels"] if fpn else 256
    bn = "nn.BatchNorm2d"
    gn = "lambda c: nn.GroupNorm(32, c)"
    lines = ["import torch", "from torch import nn", f"from torchvision.models import resnet{d['depth']}",
             "from torchvision.models.detection import MaskRCNN, RetinaNet, FCOS",
             "from torchvision.models.detection.backbone_utils import BackboneWithFPN",
             "from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead",
             "from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor",
             "from torchvision.models.detection.rpn import RPNHead",
             "from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7", "", preamble]
    one_stage = kind in ("retinanet", "fcos") or (fpn and fpn["levels"][0] == 3)
    stages = (2, 3, 4) if one_stage else (1, 2, 3, 4)
    fnorm = {"bn": bn, "gn": gn}.get(fpn["norm"]) if fpn else None
    extra = (f"LastLevelP6P7({fpn['p6p7_in']}, {ch})" if fpn and fpn["p6p7_in"] else
             f"LastLevelP6P7({c[4]}, {ch})" if one_stage else "LastLevelMaxPool()")
    returns = {f"layer{s}": str(i) for i, s in enumerate(stages)}
    lines.append(f"backbone = BackboneWithFPN(resnet{d['depth']}(weights=None), {returns!r}, {[c[s] for s in stages]}, "
                 f"{ch}, extra_blocks={extra}, norm_layer={fnorm})")
    if kind == "retinanet":
        a = "9"
        lines.append(f"model = RetinaNet(backbone, num_classes={nc})   # {a} anchors per location (3 scales x 3 ratios)")
    elif kind == "fcos":
        lines.append(f"model = FCOS(backbone, num_classes={nc})")
    elif one_stage:
        lines.append(f"model = RetinaNet(backbone, num_classes={nc})")
    else:
        if bh and bh["type"] != "2mlp":
            hn = {"bn": bn, "gn": gn}.get(bh["norm"])
            lines.append(f"box_head = FastRCNNConvFCHead(({ch}, 7, 7), [{bh['conv_dim']}] * {bh['num_conv']}, "
                         f"[{bh['fc_dim']}], norm_layer={hn})")
            if bh["extra_norm"]:
                lines.append(f"box_head.add_module('extra_norm', nn.BatchNorm1d({bh['fc_dim']}))   # InsLoc's head")
        else:
            lines.append(f"box_head = TwoMLPHead({ch} * 7 * 7, {bh['fc_dim'] if bh else 1024})")
        fc = bh["fc_dim"] if bh else 1024
        mconv = d.get("mask_convs") or 4
        mdim = d.get("mask_dim", 256)
        lines += [f"num_classes = {nc}",
                  f"model = MaskRCNN(backbone, num_classes=None, rpn_head=RPNHead({ch}, 3, conv_depth={d.get('rpn_convs') or 1}), "
                  f"box_head=box_head, box_predictor=FastRCNNPredictor({fc}, num_classes),",
                  f"                 mask_head=MaskRCNNHeads({ch}, [{mdim}] * {mconv}, 1, "
                  f"norm_layer={bn if d.get('mask_norm') else None}), mask_predictor=MaskRCNNPredictor({mdim}, {mdim}, num_classes))"]
    return "\n".join(lines) + "\n" + load, []


FRAGMENT_SUFFIX = {"detectron2": ".yaml", "mmdet": "_config.py", "torchvision": "_model.py"}


def config_fragment(state: dict, framework: str, weights: str) -> tuple[str, list[str]]:
    """(the text that loads the export whole in ``framework``, what the target has no place for)."""
    d = describe(state)
    if d["depth"] is None:
        return "", ["no ResNet-18/34/50/101/152 backbone: no config can be derived"]
    head = (f"# {framework} config for {weights}: derived from its contents "
            f"(ResNet-{d['depth']}{', FPN ' + '/'.join(f'C{l}' for l in d['fpn']['levels']) if d.get('fpn') else ''}"
            f"{', box head ' + d['box_head']['type'] if d.get('box_head') else ''}; {d['kind']})\n")
    if framework == "detectron2":
        cfg, unplaced = detectron2_config(d, weights)
        mean_std = ("# MODEL.PIXEL_MEAN / PIXEL_STD: torchvision's, RGB (MoCo's *_moco.yaml); FREEZE_AT 0 and "
                    "SyncBN: the file's BN statistics train (MoCo Sec. 4.2)\n")
        text = head + mean_std + "\n".join(_yaml(cfg)) + "\n"
    elif framework == "mmdet":
        cfg, unplaced = mmdet_config(d, weights)
        text = head + "".join(f"{k} = {_py(v)}\n" for k, v in cfg.items())
    else:
        code, unplaced = torchvision_code(d, weights)
        text = head + code
    if unplaced:
        text += "".join(f"# NO PLACE in {framework}: {u}\n" for u in unplaced)
    return text, unplaced


def fragment_path(path: Path, framework: str) -> Path:
    return path.with_name(path.stem + FRAGMENT_SUFFIX[framework])


# ------------------------------------------------------------------ files
class _OldNumpyPickler(pickle.Pickler):
    """Arrays as ``numpy.ndarray(shape, dtype, buffer=bytearray)``: readable by any numpy >= 1.20
    (numpy 2's own reduction names ``numpy._core.multiarray._reconstruct``, which numpy < 2 lacks)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes(order="C")))
        if isinstance(obj, np.generic):   # a numpy scalar: its Python value
            return type(obj.item()), (obj.item(),)
        return NotImplemented


D2_PICKLE_PROTOCOL = 4     # the model zoo's files are protocol 2-4


def save_export(state: dict, framework: str, path: str | Path, *, meta: dict | None = None,
                allow_unmapped: bool = False, ratios: int = 3) -> dict:
    """Write canonical ``state`` as ``framework``'s file at ``path`` and beside it the config
    fragment that loads it whole. Returns a report: ``{"framework", "path", "keys", "left_out",
    "config", "config_path", "no_place"}``. ``ratios``: aspect ratios per anchor location (the
    detector's; orders RetinaNet's and the C4 RPN's anchors for detectron2)."""
    mapped, unmapped = to_framework(state, framework, ratios=ratios)
    if unmapped and not allow_unmapped:
        kind = detector_kind(state)
        why = _NO_HEAD_PLACE.get("c4-torchvision" if (kind, framework) == ("c4", "torchvision") else kind, "")
        raise ExportError(f"{len(unmapped)} keys have no {framework} name: {unmapped[:10]}"
                          f"{' ...' if len(unmapped) > 10 else ''}{f' ({why})' if why else ''} "
                          f"(--allow-unmapped leaves them out and lists them)")
    if not mapped:
        raise ExportError(f"no key maps to {framework} (first keys: {list(state)[:3]})")
    path = Path(path)
    kept = {k: v for k, v in state.items() if k not in set(unmapped)}
    fragment, no_place = config_fragment(kept, framework, str(path))
    if unmapped and fragment:   # never dropped silently: the fragment says what the file lacks
        groups = sorted({k.rsplit(".", 1)[0] for k in unmapped})
        fragment += f"# LEFT OUT (no {framework} name, --allow-unmapped): {len(unmapped)} keys of {', '.join(groups)}\n"
    meta = {**(meta or {}), "left_out": unmapped, "kind": detector_kind(state), "ratios": ratios}
    with atomic_open(path) as f:
        if framework == "detectron2":
            _OldNumpyPickler(f, protocol=D2_PICKLE_PROTOCOL).dump(
                {"model": {k: v.detach().cpu().numpy() for k, v in mapped.items()},
                 "__author__": "detbench", "matching_heuristics": True, "detbench": meta})
        elif framework == "mmdet":
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in mapped.items()}, "meta": {"detbench": meta}}, f)
        else:
            torch.save({k: v.detach().cpu() for k, v in mapped.items()}, f)
    cfg_path = fragment_path(path, framework)
    if fragment:
        with atomic_open(cfg_path) as f:
            f.write(fragment.encode())
    return {"framework": framework, "path": str(path), "keys": len(mapped), "left_out": unmapped,
            "config": fragment, "config_path": str(cfg_path) if fragment else None, "no_place": no_place}


def load_export(path: str | Path, framework: str) -> dict:
    """Read a file written by ``save_export`` back to canonical tensors."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: exported weights not found")
    meta = {}
    if framework == "detectron2":
        with open(path, "rb") as f:
            obj = pickle.load(f)
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
            raise ExportError(f"{path}: field 'model': missing (not a detectron2 .pkl)")
        state = {k: torch.from_numpy(np.array(v)) for k, v in obj["model"].items()}
        meta = obj.get("detbench") or {}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"] if framework == "mmdet" else obj
        meta = (obj.get("meta") or {}).get("detbench", {}) if framework == "mmdet" else {}
    return from_framework(state, framework, kind=meta.get("kind"), ratios=meta.get("ratios", 3))


# ------------------------------------------------------------------ runs
_DETECTOR_TO_CANON = (("backbone.body.", ""), ("backbone.fpn.", "fpn."), ("roi_heads.box_head.", "box_head."))
# an R-CNN C4 (faster_rcnn_c4.py): the ResNet to C4 is ``backbone.*`` (no ``body``), res5 the box
# head's ``res5``, MoCo's extra norm the box head's ``norm``
_C4_TO_CANON = (("roi_heads.box_head.res5.", "layer4."), ("roi_heads.box_head.norm.", "box_head.norm."),
                ("backbone.", ""))


def detector_to_canonical(model_state: dict) -> dict:
    """A fine-tuned detector's state dict (torchvision names) in the canonical space: backbone,
    FPN and box head renamed, the heads keep torchvision's names."""
    rules = _C4_TO_CANON if any(k.startswith("roi_heads.box_head.res5.") for k in model_state) else _DETECTOR_TO_CANON
    state = {}
    for k, v in model_state.items():
        for a, b in rules:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        state[k] = v
    return state


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
        return detector_to_canonical(_read_output(store, key, stage)), cfg
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
    ratios = len((cfg.get("detector") or {}).get("aspect_ratios") or (0.5, 1.0, 2.0))
    return save_export(state, framework, out, meta=meta, allow_unmapped=allow_unmapped, ratios=ratios)
