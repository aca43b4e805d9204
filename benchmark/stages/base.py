"""The one shape of a stage. The runner (``benchmark.runner``) takes the lock, checks the
parents, makes the run folder, then calls ``stage.run(ctx)``; the stage does its work and
returns its metrics; the runner records them. A new stage is one ``Stage`` subclass, registered
with ``@register_stage`` and imported in ``benchmark/stages/__init__.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from methods.registry import Registry

STAGES = Registry("stage")
register_stage, get_stage = STAGES.register, STAGES.get


@dataclass
class StageContext:
    config: dict                  # the run's stored config
    run_dir: Path                 # its folder in the run store (exists)
    parent_dir: Path | None       # the parent run's folder (``config["parent"]``), if any
    device: str
    resume: bool = True
    stop_after: int | None = None  # stop after this many steps (tests, preemption drills)
    progress: bool = True
    runtime: dict = field(default_factory=dict)   # how it runs (workers, threads): never identity
    main: bool = True             # rank 0 of the run's processes


class Stage:
    """``output``: the file a child run reads from this one, and the metric that records its
    sha256 (checked before a child uses it)."""
    name: str
    output: tuple[str, str] | None = None

    def run(self, ctx: StageContext) -> tuple[dict, bool]:
        """Do the work; returns (metrics, complete). An incomplete run (``stop_after``) keeps its
        checkpoint and is resumed by the next call."""
        raise NotImplementedError
