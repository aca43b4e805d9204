"""A decorator registry of pretraining methods (in the style of timm's model registry).
Methods register when ``methods/__init__.py`` imports their module: explicitly, one line each."""
from __future__ import annotations

from typing import Callable

_METHODS: dict[str, type] = {}


class UnknownMethod(KeyError, ValueError):
    """A method name that is not registered (a config error that names the field)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise KeyError(f"method {name!r} registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type:
    if name not in _METHODS:
        raise UnknownMethod(f"method.name: unknown method {name!r} (available: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def build_method(name: str, **cfg):
    """Build a registered method from its config dict; unknown keys raise, naming the key."""
    cls = get_method(name)
    return cls(cls.Config.from_dict(cfg))
