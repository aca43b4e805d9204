"""The one place a device is chosen."""
from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: this process's GPU (``LOCAL_RANK`` of the visible ones) when there is
    CUDA, else the CPU; anything else as given."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")
