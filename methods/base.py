"""The method interface every pretraining method implements (docs/design.md, "Interfaces")."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn
from methods.config import ConfigError, dataclass_from_dict
from methods.dist import groups_per_process


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config: ``from_dict`` rejects unknown keys and wrong types."""

    @classmethod
    def from_dict(cls, d: dict | None, prefix: str = "method") -> "MethodConfig":
        d = dict(d or {})
        d.pop("name", None)
        cfg = dataclass_from_dict(cls, d, prefix)
        for field, ok, want in cfg.ranges():
            if not ok:
                raise ConfigError(f"{prefix}.{field}: expected {want}, got {getattr(cfg, field)!r}")
        return cfg

    def ranges(self) -> list[tuple[str, bool, str]]:
        """``[(field, holds, what is expected)]``: a method's value ranges, checked with the
        types before anything runs."""
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclasses.dataclass
class PretrainRecipe:
    """A method's pretraining recipe: the paper's values, overridable per scale and per run
    (``recipe.*``). The lr is ``base_lr`` per ``lr_batch`` images (linear scaling rule,
    Goyal et al. 2017); ``warmup_epochs`` and ``epochs`` count paper epochs; a scale may fix
    ``steps_per_epoch`` (tiny: a few steps per paper epoch), else an epoch is ceil(N / B)."""
    optimizer: str = "sgd"
    base_lr: float = 0.03
    lr_batch: int = 256
    batch_size: int = 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0
    epochs: float = 100
    steps_per_epoch: float | None = None
    loader: str = "cpu"      # cpu | cpu_draft | device | dali (methods.augment.LOADERS): where pixels are made
    # multistep: the lr drops (x 0.1 each) as fractions of the run; None: the schedule's own
    # (none). Gradient clipping at this max norm; None: none.
    milestones: tuple[float, ...] | None = None
    grad_clip: float | None = None
    nesterov: bool = False   # Nesterov momentum (SGD only; InsLoc)
    # Schedule details of the official codes (benchmark.engine.optim.Schedule). The warm-up
    # starts at warmup_start_factor x lr (SoCo/PixPro contrast/lr_scheduler.py: lr /
    # warmup_multiplier 100 -> 0.01); the cosine ends at min_lr, an absolute lr (their eta_min
    # 1e-6; mmcv's min_lr); cosine_per_epoch holds the cosine's lr for a whole epoch (mmcv
    # CosineAnnealing by_epoch=True: InsLoc) instead of moving it every step; lars_eps is added
    # to the trust ratio's denominator (SoCo/PixPro contrast/lars.py: eps 1e-8).
    warmup_start_factor: float = 0.0
    min_lr: float = 0.0
    cosine_per_epoch: bool = False
    lars_eps: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None, prefix: str = "recipe") -> "PretrainRecipe":
        r = dataclass_from_dict(cls, d, prefix)
        checks = [("optimizer", r.optimizer in OPTIMIZERS, " | ".join(OPTIMIZERS)),
                  ("schedule", r.schedule in SCHEDULES, " | ".join(SCHEDULES)),
                  ("base_lr", r.base_lr > 0, "> 0"), ("lr_batch", r.lr_batch > 0, "> 0"),
                  ("batch_size", r.batch_size > 0, "> 0"), ("weight_decay", r.weight_decay >= 0, ">= 0"),
                  ("momentum", 0 <= r.momentum < 1, "in [0, 1)"), ("epochs", r.epochs > 0, "> 0"),
                  ("warmup_epochs", 0 <= r.warmup_epochs <= r.epochs, "in [0, epochs]"),
                  ("steps_per_epoch", r.steps_per_epoch is None or r.steps_per_epoch > 0, "> 0 or null"),
                  ("milestones", r.milestones is None or (all(0 < m < 1 for m in r.milestones)
                                                          and list(r.milestones) == sorted(r.milestones)),
                   "increasing fractions of the run in (0, 1), or null"),
                  ("grad_clip", r.grad_clip is None or r.grad_clip > 0, "> 0 or null"),
                  ("nesterov", not r.nesterov or (r.optimizer == "sgd" and r.momentum > 0),
                   f"false with optimizer {r.optimizer!r} and momentum {r.momentum} (Nesterov momentum "
                   f"needs optimizer sgd and momentum > 0)"),
                  ("warmup_start_factor", 0 <= r.warmup_start_factor <= 1, "in [0, 1]"),
                  ("min_lr", r.min_lr >= 0, ">= 0"),
                  ("cosine_per_epoch", not r.cosine_per_epoch or r.schedule == "cosine",
                   f"false with schedule {r.schedule!r} (a per-epoch cosine needs schedule cosine)"),
                  ("lars_eps", r.lars_eps >= 0 and (r.lars_eps == 0 or r.optimizer == "lars"),
                   f">= 0, and 0 with optimizer {r.optimizer!r} (a LARS option: set recipe.lars_eps=0)")]
        for field, ok, want in checks:
            if not ok:
                raise ConfigError(f"{prefix}.{field}: expected {want}, got {getattr(r, field)!r}")
        return r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PretrainMethod(nn.Module):
    """One self-supervised method.

    - ``views(record, rng, source) -> sample`` builds the views of one image in a DataLoader
      worker. ``record`` = {"index", "image_id", "image" (HxWx3 uint8), optional "proposals",
      "masks", "labels"}; ``rng`` a numpy Generator fixed by (seed, epoch, index); ``source`` lets a
      method draw other images. Geometry goes through ``methods.geometry``.
    - ``collate(samples) -> batch``
    - ``forward(batch) -> {"loss": tensor, **scalar logs}``
    - ``momentum_update(progress)`` for methods with a target network (progress in [0, 1]);
      ``methods.ema`` has the update and the cosine schedule.
    - ``export() -> state dict`` in the canonical key space: bare torchvision ResNet names
      for the backbone, ``fpn.*`` and ``box_head.*`` for the detector parts it pretrains.
    """

    name: str = "?"
    Config = MethodConfig
    recipe = PretrainRecipe()
    # A scale is a set of overrides, never a fork: {"tiny": {"method": {...}, "recipe": {...}}}
    scales: dict = {}
    # Overrides of the fine-tuning recipe that belong to this method's rows (SoCo: wd 2.5e-5)
    finetune_overrides: dict = {}
    # Factors on the fine-tuning recipe's values, whatever the detector (AlignDet: lr x 1.5)
    finetune_factors: dict = {}
    # Fields of the fine-tuning detector's model config for this method's rows, set on every
    # detector whose config has the field, below a table's own detector overrides (InsLoc:
    # the ExtraNorm box head of its R-CNN FPN fine-tuning)
    finetune_detector: dict = {}
    # What the pretraining stage hands to ``views`` besides the image:
    needs_labels = False      # record["labels"]: multi-hot image labels (Supervised at tiny)
    needs_source = False      # ``source``: the dataset, to draw other images (InsLoc's backgrounds)
    # Which images of the scale's data it pretrains on: "pretrain" (ImageNet at the paper scale)
    # or "train", the detection training images with their labels unread (AlignDet: COCO train2017)
    pretrain_images = "pretrain"
    # BatchNorm over the global batch when distributed (BYOL/SoCo/PixPro: SyncBN; on CPU
    # methods.sync_bn). MoCo-style Shuffle-BN needs per-process BN (methods.shuffle_bn): False.
    sync_bn = True
    # where pixels may be made (``recipe.loader``): "cpu" in workers; "cpu_draft" decodes JPEGs
    # at reduced size when every view shrinks them anyway; "device" decodes and colour-jitters
    # batched on the training device
    loaders: tuple[str, ...] = ("cpu",)

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        raise NotImplementedError

    def proposal_params(self) -> dict | None:
        """Selective-search settings (``mode``, ``max_side``, optional ``filter_kwargs`` over
        ``methods.proposals.DEFAULT_FILTER``) of the proposal cache whose boxes this run reads
        as ``record["proposals"]``; None: it reads none (the default)."""
        return None

    def mask_params(self) -> dict | None:
        """Felzenszwalb-Huttenlocher settings (``scale``, ``sigma``, ``min_size``, optional
        ``max_side``) of the segmentation-mask cache (``benchmark.data.mask_cache``) whose id
        map of each image this run reads as ``record["masks"]`` (DetCon); None: it reads none
        (the default)."""
        return None

    def pseudo_class_params(self) -> dict | None:
        """``{"k", "pca_dim"}`` of the k-means pseudo-classes of the proposals
        (``methods.pseudo_classes``: AlignDet's DETR) that this run reads as
        ``record["pseudo_classes"]``, computed by the harness with ``proposal_features`` on the
        parent run's backbone and the run's seed; None: it reads none (the default)."""
        return None

    @classmethod
    def pretrain_detector(cls, method_cfg: dict) -> str | None:
        """The registry name of the detector a run with config ``method_cfg`` pretrains as a
        whole (AlignDet: ``method.detector``); None (the default): none. When not None the run
        is box-domain pretraining over the backbone of an image-domain run, its parent: the
        harness records that detector's config and the parent in the run's identity, and
        ``recipe_for(detector)`` gives the recipe."""
        return None

    def detector_spec(self) -> dict | None:
        """The detector this method pretrains as a whole (AlignDet), as ``{"name": <detector
        registry name>, **builder overrides}``; None (the default): the method builds its own
        networks. When not None the harness builds that detector with the fine-tuning builder,
        loads the parent run's backbone into it and hands it to ``attach_detector`` before it
        calls ``param_groups``, ``to(device)`` or ``forward``."""
        return None

    def attach_detector(self, detector: nn.Module) -> None:
        """Receive the detector declared by ``detector_spec`` (a torchvision-style module:
        ``.backbone`` (``.body`` + ``.fpn``) and ``.rpn``/``.roi_heads`` or ``.head``; DETR:
        transformers' ``DetrForObjectDetection``). The method owns it from then on."""
        raise NotImplementedError(f"{self.name}: detector_spec() is None, no detector to attach")

    def given_weights(self) -> dict[str, torch.Tensor] | None:
        """A canonical state to export instead of training (Supervised at paper scale: the
        user's ImageNet weights); None: train (the default)."""
        return None

    # Config fields that count groups of the global batch (MoCo v2's BatchNorm groups): each
    # must be a multiple of the process count (``methods.dist.groups_per_process``)
    group_fields: tuple[str, ...] = ()

    def check_split(self, batch_per_process: int) -> None:
        """Before the first step, in each process: a ConfigError naming the field when what
        the method computes over groups of the global batch (``group_fields``; AlignDet: its
        loss pools) cannot be split over the processes."""
        for field in self.group_fields:
            groups_per_process(getattr(self.cfg, field), field)

    def collate(self, samples: list[dict]) -> dict:
        return default_collate(samples)

    def momentum_update(self, progress: float) -> None:
        pass

    def export(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer (override to exclude target networks etc.)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


def default_collate(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if torch.is_tensor(vals[0]) and all(v.shape == vals[0].shape for v in vals):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out
