"""The method interface every pretraining method implements (see DESIGN.md)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np
import torch
from torch import nn


class ConfigError(ValueError):
    """A bad config value or key; the message names the key."""


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config: ``from_dict`` rejects unknown keys and wrong types."""

    @classmethod
    def from_dict(cls, d: dict | None, prefix: str = "method") -> "MethodConfig":
        d = dict(d or {})
        d.pop("name", None)
        return dataclass_from_dict(cls, d, prefix)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def dataclass_from_dict(cls, d: dict | None, prefix: str):
    """Build dataclass ``cls`` from a plain dict; unknown keys and badly typed values raise
    ``ConfigError`` naming ``<prefix>.<key>``. Lists become tuples for tuple fields."""
    d = dict(d or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            raise ConfigError(f"{prefix}.{k}: unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})


def _coerce(v: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args:  # Optional[X] / X | None
        if v is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = (v,)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        return tuple(_coerce(x, args[0] if args else Any, where) for x in v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true/false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is str and not isinstance(v, str):
        raise ConfigError(f"{where}: expected a string, got {v!r}")
    return v


class PretrainMethod(nn.Module):
    """One self-supervised method.

    - ``views(record, rng, source) -> sample`` builds the views of one image in a DataLoader
      worker. ``record`` = {"index", "image_id", "image" (HxWx3 uint8), optional "proposals",
      "labels"}; ``rng`` a numpy Generator fixed by (seed, epoch, index); ``source`` lets a
      method draw other images. Geometry goes through ``methods.geometry``.
    - ``collate(samples) -> batch``
    - ``forward(batch) -> {"loss": tensor, **scalar logs}``
    - ``momentum_update(progress)`` for methods with a target network (progress in [0, 1]).
    - ``export() -> state dict`` in the canonical key space: bare torchvision ResNet names
      for the backbone, ``fpn.*`` and ``box_head.*`` for the detector parts it pretrains.
    """

    name: str = "?"
    Config = MethodConfig
    # The paper's pretraining recipe (optimizer, lr per ``lr_batch`` images, batch size,
    # weight decay, schedule, warmup in epochs); overridable per scale and per run.
    recipe: dict = {"optimizer": "sgd", "base_lr": 0.03, "lr_batch": 256, "batch_size": 256,
                    "weight_decay": 1e-4, "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 0}
    # A scale is a set of overrides, never a fork: {"tiny": {"method": {...}, "recipe": {...}}}
    scales: dict = {}
    # Overrides of the fine-tuning recipe that belong to this method's rows (SoCo: wd 2.5e-5)
    finetune_overrides: dict = {}
    needs_labels = False      # the Supervised baseline reads image-level labels
    needs_proposals = False   # SoCo / AlignDet read cached selective-search boxes

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg

    def views(self, record: dict, rng: np.random.Generator, source: Any = None) -> dict:
        raise NotImplementedError

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
