"""Self-supervised pretraining methods for detection, one file each, behind one interface
(see ``methods.base.PretrainMethod``) and a decorator registry."""
from methods.registry import build_method, get_method, list_methods, register_method

__all__ = ["build_method", "get_method", "list_methods", "register_method"]
