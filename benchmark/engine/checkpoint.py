"""Crash-safe checkpoints and the RNG state they carry."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from benchmark.common.fs import atomic_open, raise_if_full
from benchmark.engine.signals import deferred
from methods.weights import read_weights_file


def previous_checkpoint(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".prev" + Path(path).suffix)


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill never leaves half a file.
    ``keep_previous``: the file being replaced becomes ``<name>.prev.pt`` only once the new one
    is complete, so there is always one whole checkpoint to fall back to; ``path`` itself is
    never missing (the previous one is linked under its second name, then ``path`` is replaced
    in one rename). A Ctrl-C during the write is delivered once the file is whole."""
    with deferred():
        _save(Path(path), state, keep_previous)


def _save(path: Path, state: dict, keep_previous: bool) -> None:
    if not keep_previous:
        with atomic_open(path) as f:
            torch.save(state, f)
        return
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        prev_tmp.unlink(missing_ok=True)
        raise_if_full(e, path)
        raise


def load_checkpoint(path: Path) -> dict:
    """A checkpoint holds tensors and plain values only (``rng_state`` keeps numpy's state as
    a tensor), so it is read as weights are: a planted pickle in a shared run store is
    refused, never run."""
    try:
        return read_weights_file(path, what="checkpoint")
    except (FileNotFoundError, ValueError) as e:
        raise RuntimeError(str(e)) from e


def rng_state() -> dict:
    """Every RNG a step touches, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
