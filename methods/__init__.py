"""Self-supervised pretraining methods for detection, one file each, behind one interface
(see ``methods.base.PretrainMethod``) and a decorator registry. A new method is one file
plus one import line here."""
from methods.registry import build_method, get_method, list_methods, register_method

from methods import aligndet, byol, densecl, detcon, infomin, insloc, moco, moco_v1, pixpro, resim, soco, supervised, swav  # noqa: E402,F401  (register the methods)

__all__ = ["build_method", "get_method", "list_methods", "register_method"]
