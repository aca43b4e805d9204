"""Crash-safe checkpoints and the RNG state they carry."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from benchmark.common.fs import atomic_open


def previous_checkpoint(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".prev" + Path(path).suffix)


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill never leaves half a file.
    ``keep_previous``: the file being replaced becomes ``<name>.prev.pt`` only once the new one
    is complete, so there is always one whole checkpoint to fall back to; ``path`` itself is
    never missing (the previous one is linked under its second name, then ``path`` is replaced
    in one rename)."""
    if not keep_previous:
        with atomic_open(path) as f:
            torch.save(state, f)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    prev = previous_checkpoint(path)
    prev_tmp = prev.with_name(f".{prev.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)             # the current checkpoint under a second name, no copy
            except OSError:                         # a filesystem without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        prev_tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise RuntimeError(f"{path}: cannot read checkpoint ({e})") from e


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
