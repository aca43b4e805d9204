"""The one reader of weight and checkpoint files (pretrained backbones, a user's ImageNet checkpoint,
model_final.pt, resumable checkpoints): tensors and plain values only (``weights_only=True``: a file
can never run code), errors that name the file."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


def read_weights_file(path: str | Path, what: str = "weights"):
    """The object in a file of tensors and plain values (numbers, strings, lists, dicts); a
    file that holds anything else is refused before any of it runs. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        parts = [s.strip() for s in str(e).split("\n\n") if s.strip()]   # torch's advice paragraphs left out
        why = " ".join(s for s in parts[1:] if not s.startswith(("Check the documentation", "Please file"))) or parts[0]
        raise ValueError(f"{path}: cannot read {what} (not tensors and plain values, refused: {why})") from e
    except Exception as e:  # truncated or foreign
        raise ValueError(f"{path}: cannot read {what} ({type(e).__name__}: {' '.join(str(e).split())})") from e


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
