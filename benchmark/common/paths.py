"""Where things live. Every root has an environment override, so tests and a second store
never touch the repository's ``results/``."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def configs_root() -> Path:
    """The user-edited configs (``configs/``: scales, tables, Slurm profiles)."""
    return Path(os.environ.get("DETBENCH_CONFIGS", REPO / "configs"))


def results_root() -> Path:
    return Path(os.environ.get("DETBENCH_RESULTS", Path.cwd() / "results"))


def runs_root() -> Path:
    """The default run store."""
    return Path(os.environ.get("DETBENCH_RUNS", Path.cwd() / "results" / "runs"))


def cache_root() -> Path:
    """Generated datasets, proposals, pseudo-classes (safe to delete)."""
    return Path(os.environ.get("DETBENCH_CACHE", Path.cwd() / ".cache" / "detbench"))
