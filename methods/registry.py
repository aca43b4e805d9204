"""A decorator registry (in the style of timm's model registry), used for the pretraining
methods here and for the detectors (``benchmark.detectors.registry``). Entries register when
their module is imported: explicitly, one import line each."""
from __future__ import annotations

from typing import Callable

from methods.config import ConfigError


class UnknownName(KeyError, ConfigError):
    """A name that is not registered (a config error that names the field)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind              # "method", "detector": also the config field, <kind>.name
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._entries and self._entries[name] is not cls:
                raise KeyError(f"{self.kind} {name!r} registered twice ({self._entries[name].__name__}, "
                               f"{cls.__name__})")
            cls.name = name
            self._entries[name] = cls
            return cls
        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise UnknownName(f"{self.kind}.name: unknown {self.kind} {name!r} (available: {', '.join(self.names())})")
        return self._entries[name]


METHODS = Registry("method")
register_method, list_methods, get_method = METHODS.register, METHODS.names, METHODS.get


def build_method(name: str, **cfg):
    """Build a registered method from its config dict; unknown keys raise, naming the key."""
    cls = get_method(name)
    return cls(cls.Config.from_dict(cfg))
