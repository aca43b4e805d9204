"""The one reader of weight files (pretrained backbones, a user's ImageNet checkpoint): plain
tensors only (``weights_only=True``: a file can never run code), errors that name the file."""
from __future__ import annotations

from pathlib import Path

import torch


def read_weights_file(path: str | Path):
    """The object in a weights file (tensors, numbers, strings, lists and dicts only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A non-empty ``{name: tensor}`` from ``path``: a bare state dict, or one under a
    ``state_dict`` or ``model`` key (our ``weights.pt``; torchvision/timm checkpoints).
    Raises FileNotFoundError or ValueError naming the file and the field."""
    obj = read_weights_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: field 'state_dict': expected a non-empty dict of tensors, "
                         f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{path}: field 'state_dict': entries that are not name -> tensor, e.g. {bad[:3]}")
    return obj
