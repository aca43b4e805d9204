"""A run's identity, in one place: its key is the sha256 of its canonical config, and this
module holds every rule for what enters that config.

| rule | where it applies |
| --- | --- |
| ``NON_IDENTITY`` keys never enter the key (how a run executes, not what it computes; or a record that follows from what does) | every config |
| ``LEFT_OUT_AT_DEFAULT``: a field added after runs were stored is left out at its default | typed configs, by class |
| a dataset given by path enters by its content (``benchmark.data.user.with_identity``) | ``data`` |
| a child names its parent's key (``parent``), so the key covers the whole chain | fine-tune, evaluate |
| the process count never enters: training does not depend on it | ``runtime`` |
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

# ``classes``: the training classes a fine-tuning run records in its config.json when it starts
# (``benchmark.stages.finetune.record_classes``; evaluation maps the model's labels to a val
# json's categories by these names). They follow from the training data, whose content identity
# is already in the key (generator parameters, or ``data.identity``), so they add nothing to it;
# keeping them out lets a stored config that gained them still hash to its key (``RunStore.begin``
# on resume) and leaves every committed key as it was.
NON_IDENTITY = ("runtime", "label", "cache_dir", "key", "classes")

# Fields added after the first committed runs. At these values, their defaults (which build
# what those runs built), they are left out of a run's config, so those runs keep their keys.
# Keyed by config class name (a method's nested ``Config`` by its qualified name); a class
# takes the entries of its bases too.
LEFT_OUT_AT_DEFAULT: dict[str, dict] = {
    "PretrainRecipe": {"loader": "cpu", "milestones": None, "grad_clip": None, "nesterov": False,
                       "warmup_start_factor": 0.0, "min_lr": 0.0, "cosine_per_epoch": False, "lars_eps": 0.0},
    "FinetuneRecipe": {"precise_bn_iters": 0, "drop_groups": ()},
    "RCNNConfig": {"roi_align_aligned": False, "box_reg_loss": "smooth_l1"},
    "MaskRCNNConfig": {"roi_sampling_ratio": 2, "box_head_extra_norm": False},
    "MoCoV2.Config": {"bn_groups": 1},
    "InsLoc.Config": {"bn_groups": 1},
}


def left_out(cls: type) -> dict:
    """The fields of config class ``cls`` left out at their defaults (its bases' included)."""
    out: dict = {}
    for c in reversed(cls.__mro__):
        out.update(LEFT_OUT_AT_DEFAULT.get(c.__name__, {}))
        out.update(LEFT_OUT_AT_DEFAULT.get(c.__qualname__, {}) if c.__qualname__ != c.__name__ else {})
    return out


def strip_defaults(cls: type, fields: dict) -> dict:
    """``fields`` of a ``cls`` config as they enter a run's config."""
    later = left_out(cls)
    return {k: v for k, v in fields.items() if not (k in later and v == later[k])}


def config_dict(obj) -> dict:
    """A config dataclass as it enters a run's config: a plain dict (tuples as lists), the
    later fields at their defaults left out."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in strip_defaults(type(obj), dataclasses.asdict(obj)).items()}


def canonical(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NON_IDENTITY}


KEY = re.compile(r"[0-9a-f]{16}")   # what run_key returns: a run folder's name


def is_run_key(value) -> bool:
    return isinstance(value, str) and KEY.fullmatch(value) is not None


def run_key(config: dict) -> str:
    """sha256 of the canonical JSON of the config (which names its parent's key)."""
    blob = json.dumps(canonical(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
