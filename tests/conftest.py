import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private run store, dataset cache and results folder."""
    monkeypatch.setenv("DETBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path


MICRO_DATA = {"kind": "synthetic", "image_size": 64, "num_pretrain": 16, "num_train": 8, "num_val": 4, "seed": 0}

# the real COCO excerpt: ../shared/data/tiny_coco beside the checkout (CI and sessions)
TINY_COCO = Path(os.environ.get("DETBENCH_TINY_COCO",
                                Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"))
