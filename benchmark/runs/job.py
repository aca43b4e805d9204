"""A job: one run to compute (its stage, key, resolved config and parent keys), as planned from
a table and handed to an executor."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Job:
    stage: str                        # "pretrain" | "finetune" | "evaluate"
    key: str                          # run key (hex)
    config: dict = field(hash=False, compare=False)
    parents: tuple = ()               # run keys that must finish first
    label: str = ""

    def to_dict(self, *, config: bool = True) -> dict:
        """JSON-ready; ``config=False`` leaves the config out (each run keeps it in its store)."""
        out = {"key": self.key, "stage": self.stage, "label": self.label, "parents": list(self.parents)}
        if config:
            out["config"] = dict(self.config)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Job":
        """The inverse of :meth:`to_dict`; without a config, ``config`` is ``{}``."""
        return cls(stage=d["stage"], key=d["key"], config=dict(d.get("config") or {}),
                   parents=tuple(d.get("parents", ())), label=d.get("label", ""))
