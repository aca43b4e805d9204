"""What every detector shares: the ``Detector`` interface, the fine-tuning recipes, the
torchvision ResNet body, the resize transform, and loading a method's export.

A detector is one class (registered by name in ``benchmark.detectors``) with
- ``Config``: its architecture dataclass, the paper's values as defaults;
- ``Recipe`` and ``recipes``: its fine-tuning recipe per schedule name ("1x", "2x", ...);
- ``build(cfg, num_classes)``: the ``nn.Module`` (torchvision's detection interface:
  ``model(images, targets) -> losses`` in training, ``model(images) -> [{"boxes", "scores",
  "labels"[, "masks"]}]`` in eval; ``num_classes`` counts a background slot 0);
- ``optimizer(model, recipe)`` and ``schedule(recipe)``;
- ``key_map``: where the canonical keys of a method's export go (docs/design.md, "The canonical
  key space"), one ``(canonical prefix, detector prefix, group)`` per line; groups are
  ``backbone`` (always), ``fpn`` and ``box_head`` (where the detector has them); a line whose
  canonical prefix is None only names the group of detector keys no export has.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmark.common.fs import atomic_write_json
from benchmark.engine.optim import Schedule
from benchmark.runs.identity import config_dict
from methods.config import ConfigError, dataclass_from_dict
from methods.dist import distributed
from methods.sync_bn import convert_sync_batchnorm

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
NORMS = ("bn", "frozen_bn")
GROUPS = ("backbone", "fpn", "box_head", "other")
DROPPABLE = ("fpn", "box_head")      # the backbone always loads; "other" (fc.*) never does
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- configs
@dataclass
class DetectorConfig:
    """Base of every detector's config: typed, unknown keys rejected (``detector.<key>``).
    ``name`` is the registered detector and is checked, not stored. ``to_dict`` is the config
    as it enters a run's (``benchmark.runs.identity.config_dict``)."""

    @classmethod
    def from_dict(cls, d: dict | None, name: str = "") -> "DetectorConfig":
        d = dict(d or {})
        given = d.pop("name", name)
        if name and given != name:
            raise ConfigError(f"detector.name: {given!r} given to the config of {name!r}")
        cfg = dataclass_from_dict(cls, d, "detector")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return config_dict(self)

    def validate(self) -> None:
        pass

    def choice(self, key: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, key) not in allowed:
            raise ConfigError(f"detector.{key}: unknown {getattr(self, key)!r} ({' | '.join(allowed)})")


@dataclass
class FinetuneRecipe:
    """What every fine-tuning recipe has. Defaults: detectron2's 1x as used by MoCo v2 /
    PixPro / SoCo fine-tuning (90k iterations at 16 images, lr 0.02, drops at 60k and 80k,
    1k warmup iterations)."""
    steps: int = 90_000
    batch_size: int = 16                    # global, over all processes
    lr: float = 0.02
    milestones: tuple[float, ...] = (2 / 3, 8 / 9)   # fractions of steps: 60k, 80k of 90k
    gamma: float = 0.1
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    weight_decay: float = 1e-4              # SoCo's fine-tuning rows use 2.5e-5
    hflip_prob: float = 0.5
    grad_clip: float | None = None          # detectron2 default: no clipping
    ckpt_every: int = 5000
    log_every: int = 20
    num_workers: int = 4
    amp: bool = True                        # CUDA only
    # detectron2 TEST.PRECISE_BN: before the final model is saved, BN statistics are recomputed
    # over this many training batches (0: off). MoCo's and SoCo's detectron2 configs enable it
    # at detectron2's NUM_ITER default, 200.
    precise_bn_iters: int = 0
    # groups of the pretrained weights not to load (fpn, box_head); any other group in the
    # file that does not load into the detector is an error (benchmark.detectors.load_pretrained)
    drop_groups: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict | None, prefix: str = "recipe") -> "FinetuneRecipe":
        """``prefix``: the recipe's name where the user wrote it (``finetune`` for ``--set
        finetune.*`` and a row's fine-tuning overrides), so an error names that field. Steps,
        batch, lr, warm-up (not longer than ``steps``), flip probability, precise-BN iterations
        ... are checked by ``methods.config.RULES``; the milestones and dropped groups here."""
        r = dataclass_from_dict(cls, d, prefix)
        if any(not 0 < m <= 1 for m in r.milestones):
            raise ConfigError(f"{prefix}.milestones: expected fractions of steps in (0, 1], got {list(r.milestones)}")
        bad = [g for g in r.drop_groups if g not in DROPPABLE]
        if bad:
            raise ConfigError(f"{prefix}.drop_groups: unknown group {bad[0]!r} ({' | '.join(DROPPABLE)})")
        return r

    def to_dict(self) -> dict:
        return config_dict(self)

    def milestone_steps(self) -> tuple[int, ...]:
        return tuple(int(round(m * self.steps)) for m in self.milestones)


@dataclass
class SGDRecipe(FinetuneRecipe):
    """SGD with momentum, linear warm-up and step decay (detectron2 / mmdetection)."""
    momentum: float = 0.9
    weight_decay_norm: float = 0.0          # detectron2 SOLVER.WEIGHT_DECAY_NORM


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Trainable parameters, norm layers' apart (their own weight decay)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm, other = [], []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(m, norm_types) else other).append(p)
    groups = [{"params": other, "weight_decay": weight_decay}]
    if norm:
        groups.append({"params": norm, "weight_decay": weight_decay_norm})
    return groups


# --------------------------------------------------------------------------- the interface
class Detector:
    """One fine-tuning detector (see the module docstring)."""
    name: str = "?"
    title: str = "?"          # the display name in tables ("Mask R-CNN")
    feature: str = ""         # what the heads read ("FPN", "C4", "C5")
    Config: type[DetectorConfig] = DetectorConfig
    Recipe: type[FinetuneRecipe] = SGDRecipe
    recipes: dict[str, FinetuneRecipe] = {}
    key_map: tuple[tuple[str | None, str, str], ...] = ()
    with_masks: bool = False          # trains on instance masks and returns them (segm AP)
    # a method's fine-tuning overrides (SoCo: weight decay 2.5e-5) are for its SGD R-CNN rows
    takes_method_overrides: bool = True
    # groups of an export this detector loads as far as they fit, the rest reported, not an error
    loads_in_part: tuple[str, ...] = ()

    @classmethod
    def build(cls, cfg: DetectorConfig, num_classes: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def optimizer(cls, model: nn.Module, recipe: SGDRecipe) -> torch.optim.Optimizer:
        return torch.optim.SGD(param_groups(model, recipe.weight_decay, recipe.weight_decay_norm),
                               lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    @classmethod
    def schedule(cls, recipe: FinetuneRecipe) -> Schedule:
        return Schedule(recipe.lr, recipe.steps, recipe.warmup_steps, kind="multistep",
                        milestones=recipe.milestone_steps(), gamma=recipe.gamma,
                        warmup_factor=recipe.warmup_factor)

    # -- key spaces
    @classmethod
    def detector_key(cls, key: str) -> str | None:
        """Canonical key -> this detector's key; None where it has no place."""
        for canon, det, _ in cls.key_map:
            if canon is not None and key.startswith(canon) and not _is_other_group(key, canon):
                return det + key[len(canon):]
        return None

    @classmethod
    def takes(cls, group: str) -> bool:
        """Whether an export's ``group`` has a place in this detector (the backbone always)."""
        return group == "backbone" or any(canon is not None and g == group for canon, _, g in cls.key_map)

    @classmethod
    def key_group(cls, detector_key: str) -> str:
        best = ("", "other")
        for _, det, group in cls.key_map:
            if detector_key.startswith(det) and len(det) > len(best[0]):
                best = (det, group)
        return best[1]


def canonical_group(key: str) -> str:
    """The group of a canonical key: ``fpn.*``, ``box_head.*``, ``fc.*`` (other), else backbone."""
    if key.startswith("fpn."):
        return "fpn"
    if key.startswith("box_head."):
        return "box_head"
    if key.startswith("fc."):
        return "other"
    return "backbone"


def _is_other_group(key: str, canon_prefix: str) -> bool:
    # the catch-all "" prefix (bare ResNet names) must not swallow fpn.*, box_head.*, fc.*
    return canon_prefix == "" and canonical_group(key) != "backbone"


# --------------------------------------------------------------------------- shared parts
def norm_layer(kind: str):
    return FrozenBatchNorm2d if kind == "frozen_bn" else nn.BatchNorm2d


def resnet_body(backbone: str, norm: str, trainable_layers: int) -> nn.Module:
    """A torchvision ResNet (weights=None) whose first ``5 - trainable_layers`` stages are frozen
    (5: everything trains, as in MoCo / SoCo fine-tuning)."""
    body = getattr(tv_resnet, backbone)(weights=None, norm_layer=norm_layer(norm))
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for n, p in body.named_parameters():
        if not any(n.startswith(t) for t in train):
            p.requires_grad_(False)
    return body


def check_backbone(cfg) -> None:
    cfg.choice("backbone", BACKBONES)
    cfg.choice("norm", NORMS)
    if not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"detector.trainable_layers: expected 0..5, got {cfg.trainable_layers}")
    if not cfg.min_size:
        raise ConfigError("detector.min_size: expected at least one size")


class Transform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise + batch, with a separate test size (training draws
    the short side from ``min_size``)."""

    def __init__(self, min_size, max_size, test_min_size: int, **kw):
        super().__init__(min_size, max_size, IMAGE_MEAN, IMAGE_STD, **kw)
        self.test_min_size = test_min_size

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        train_sizes, self.min_size = self.min_size, (self.test_min_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = train_sizes


def maybe_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm over the global batch when distributed (the SyncBN recipe of MoCo/SoCo
    fine-tuning): torch's SyncBatchNorm on GPUs, ``methods.sync_bn.CpuSyncBatchNorm`` on CPU."""
    return convert_sync_batchnorm(model) if distributed() else model


# --------------------------------------------------------------------------- loading
@dataclass
class GroupReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # "key: file (shape) vs model (shape)"
    dropped: list[str] = field(default_factory=list)      # file keys of a group the recipe drops


@dataclass
class LoadReport:
    groups: dict[str, GroupReport] = field(default_factory=lambda: {g: GroupReport() for g in GROUPS})
    source: str = ""
    detector: str = ""
    # group of the file -> why some of its keys did not load (dropped, no place, loaded in part)
    not_loaded: dict[str, str] = field(default_factory=dict)
    first_key: str = "<empty>"      # of the file, for the error message of a wrong key space

    def to_dict(self) -> dict:
        return {"source": self.source, "detector": self.detector,
                "groups": {g: dataclasses.asdict(r) for g, r in self.groups.items()},
                "not_loaded": dict(self.not_loaded), "summary": self.summary()}

    def summary(self) -> str:
        return "; ".join(f"{g}: {len(r.loaded)} loaded, {len(r.missing)} missing, "
                         f"{len(r.unexpected)} unexpected, {len(r.mismatched)} shape-mismatched"
                         + (f", {len(r.dropped)} dropped" if r.dropped else "")
                         for g, r in self.groups.items())

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    def problems(self, detector: type[Detector], require: tuple[str, ...] = ("backbone",),
                 drop: tuple[str, ...] = ()) -> list[str]:
        """Why these weights must not be used (empty: they may), one line per group:
        - a group in ``require`` that got no key, or misses a key, or has a shape mismatch;
        - a group of the file that the detector takes (``Detector.takes``) and that does not
          load whole (a file key with no place or the wrong shape, a detector key the file
          lacks), unless it is in ``drop`` or in ``detector.loads_in_part``.
        A group the detector has no place for (C4 and DETR have no FPN) and "other" (fc.*, a
        classifier) are not errors: they are recorded in ``not_loaded``."""
        out = []
        for g in require:
            if g not in self.groups:
                raise ValueError(f"load_pretrained: unknown group {g!r} in require ({', '.join(GROUPS)})")
        for g, r in self.groups.items():
            in_file = r.loaded or r.unexpected or r.mismatched
            if g in require and not r.loaded:
                out.append(f"{g}: no key loaded (first key in file: {self.first_key!r}; expected the canonical "
                           f"key space, e.g. 'conv1.weight', 'fpn.inner_blocks.0.0.weight', "
                           f"'box_head.0.0.weight')")
            elif g in require and (r.missing or r.mismatched):
                out.append(f"{g}: {len(r.missing)} missing (e.g. {r.missing[:3]}), "
                           f"{len(r.mismatched)} shape-mismatched (e.g. {r.mismatched[:3]})")
            elif (in_file and g not in drop and g != "other" and g not in detector.loads_in_part
                  and (detector.takes(g) or r.loaded) and (r.missing or r.unexpected or r.mismatched)):
                out.append(f"{g}: the weights file has this group but it does not load whole into "
                           f"{detector.name}: {len(r.unexpected)} file keys with no place (e.g. {r.unexpected[:3]}), "
                           f"{len(r.mismatched)} shape-mismatched (e.g. {r.mismatched[:3]}), {len(r.missing)} "
                           f"detector keys missing (e.g. {r.missing[:3]}); to fine-tune without it, drop it: "
                           f"--set finetune.drop_groups=[{g}] (the recipe's drop_groups)")
        return out


class PretrainedLoadError(RuntimeError):
    """Pretrained weights did not fit the detector (wrong key space, missing keys)."""


def _ignorable(k: str) -> bool:
    return k.endswith("num_batches_tracked")


def own_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, each shared tensor once (under its first name)."""
    sd = model.state_dict(keep_vars=True)
    seen, out = set(), {}
    for k, v in sd.items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v
    return out


def load_pretrained(model: nn.Module, state: dict, detector: type[Detector], *,
                    require: tuple[str, ...] = ("backbone",), drop: tuple[str, ...] = (),
                    source: str = "<state dict>") -> LoadReport:
    """Load canonical-key weights into ``model`` (a ``detector``) and report per group.

    Keys already in the detector's own key space (a ``model_final.pt``, AlignDet's export)
    pass unchanged. The groups in ``drop`` (``recipe.drop_groups``) are not loaded. Raises
    ``PretrainedLoadError`` (and loads nothing) for the problems of ``LoadReport.problems``:
    a required group that does not load whole, or a group of the file that the detector takes
    and that does not load whole. What of the file did not load is in ``report.not_loaded``.
    """
    target = model.module if hasattr(model, "module") else model
    own = own_state(target)
    top = {n for n, _ in target.named_children()}
    mapped: dict[str, torch.Tensor] = {}
    report = LoadReport(source=source, detector=detector.name, first_key=next(iter(state), "<empty>"))
    for k, v in state.items():
        dk = k if k.split(".", 1)[0] in top else detector.detector_key(k)
        if dk is None:
            if not _ignorable(k):
                report.groups[canonical_group(k)].unexpected.append(k)
            continue
        mapped[dk] = v
    to_load = {}
    for dk, v in mapped.items():
        g = report.groups[detector.key_group(dk)]
        if dk not in own:
            if not _ignorable(dk):
                g.unexpected.append(dk)
        elif detector.key_group(dk) in drop:
            g.dropped.append(dk)
        elif not torch.is_tensor(v):
            g.mismatched.append(f"{dk}: file has {type(v).__name__}, model expects a tensor")
        elif tuple(v.shape) != tuple(own[dk].shape):
            g.mismatched.append(f"{dk}: file {tuple(v.shape)} vs model {tuple(own[dk].shape)}")
        else:
            to_load[dk] = v
            g.loaded.append(dk)
    for dk in own:
        if dk not in mapped and not _ignorable(dk):
            report.groups[detector.key_group(dk)].missing.append(dk)
    for g, r in report.groups.items():
        if r.dropped:
            report.not_loaded[g] = "dropped (recipe.drop_groups)"
        elif r.unexpected or r.mismatched:
            report.not_loaded[g] = (f"loaded in part ({len(r.loaded)} of "
                                    f"{len(r.loaded) + len(r.unexpected) + len(r.mismatched)} keys)"
                                    if r.loaded else f"no place in {detector.name}")
    log.info("pretrained weights %s -> %s: %s", source, detector.name, report.summary())
    problems = report.problems(detector, require, drop)
    if problems:
        raise PretrainedLoadError(f"{source}: pretrained weights do not fit the {detector.name} detector: "
                                  + "; ".join(problems))
    target.load_state_dict(to_load, strict=False)   # only after the checks: a refusal changes nothing
    return report


