"""The typed-config parser every config of the project uses (methods, recipes, detectors,
scales): a dataclass from a plain dict, unknown keys and bad types raised as ``ConfigError``
naming ``<prefix>.<key>``."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config value or key; the message names the key."""


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
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})


EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce(v: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args:  # Optional[X] / X | None
        if v is None:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) > 1:   # int | float | None: a value of any of them is kept as it is
            if any(isinstance(v, a) and not (isinstance(v, bool) and a is not bool) for a in others):
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
        return float(v)
    if tp is str and not isinstance(v, str):
        raise ConfigError(f"{where}: expected a string, got {v!r}")
    return v
