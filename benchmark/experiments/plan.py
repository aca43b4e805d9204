"""Planning: a table or an ablation grid -> the runs it needs (pretrain -> fine-tune ->
evaluate), deduplicated by run key and topologically ordered. Each column names its
detector and protocol, so one table can mix detectors (a row's fine-tuning runs are shared
by the columns that agree on detector, protocol and schedule). Identical pretraining runs
shared by several rows or tables get one key and so run once."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from benchmark.experiments.config import UnsupportedDetector, evaluate_config, finetune_config, pretrain_config
from benchmark.runs.identity import run_key
from benchmark.detectors import list_detectors
from benchmark.experiments.tables import Column, ParentRun, Row, TableSpec, load_spec
from methods import get_method, list_methods
from methods.config import ConfigError
from benchmark.runs.job import Job


# Why a cell has no runs (``Cell.missing``; "" when it has them)
NOT_IMPLEMENTED = "not implemented"   # the row's method is not registered
NEEDS_DETECTOR = "needs detector"     # the column's detector is not registered
NOT_SUPPORTED = "not supported"       # the row's method does not pretrain the column's detector
MISSING_REASONS = (NOT_IMPLEMENTED, NEEDS_DETECTOR, NOT_SUPPORTED)
STAGE_ORDER = {"pretrain": 0, "finetune": 1, "evaluate": 2}


@dataclass
class Cell:
    row: int
    col: int
    seed: int
    eval_key: str | None              # None: the cell has no runs (``missing`` says why)
    chain: tuple = ()                 # keys from pretraining to evaluation
    missing: str = ""                 # "" or one of MISSING_REASONS

    def to_dict(self) -> dict:
        return {"row": self.row, "col": self.col, "seed": self.seed, "eval_key": self.eval_key,
                "chain": list(self.chain), "missing": self.missing}

    @classmethod
    def from_dict(cls, d: Mapping | Sequence) -> "Cell":
        """The inverse of :meth:`to_dict`; also reads a state file's ``[row, col, seed,
        eval_key, chain]`` list (its reason then reads "")."""
        if not isinstance(d, Mapping):
            d = dict(zip(("row", "col", "seed", "eval_key", "chain"), d, strict=True))
        missing = d.get("missing") or ""
        if missing and missing not in MISSING_REASONS:
            raise ValueError(f"cell ({d['row']}, {d['col']}): missing: {missing!r} is none of {MISSING_REASONS}")
        return cls(row=int(d["row"]), col=int(d["col"]), seed=int(d["seed"]), eval_key=d["eval_key"],
                   chain=tuple(d.get("chain", ())), missing=missing)


@dataclass
class Plan:
    spec: TableSpec
    scale: str
    seeds: tuple
    jobs: list[Job]
    cells: list[Cell]
    overrides: dict = field(default_factory=dict)   # the ``--set`` overrides it was planned with

    def to_dict(self, *, configs: bool = True) -> dict:
        """JSON-ready, without the spec (a caller records it by name or file);
        ``Plan.from_dict(plan.to_dict(), plan.spec) == plan``. ``configs=False``: jobs
        without their configs."""
        return {"scale": self.scale, "seeds": list(self.seeds), "overrides": dict(self.overrides),
                "jobs": [j.to_dict(config=configs) for j in self.jobs],
                "cells": [c.to_dict() for c in self.cells]}

    @classmethod
    def from_dict(cls, d: Mapping, spec: TableSpec) -> "Plan":
        """The inverse of :meth:`to_dict` over ``spec``; a ValueError when a cell lies outside it."""
        cells = [Cell.from_dict(c) for c in d["cells"]]
        outside = [c for c in cells if not (0 <= c.row < len(spec.rows) and 0 <= c.col < len(spec.columns))]
        if outside:
            raise ValueError(f"spec {spec.name} ({len(spec.rows)} rows, {len(spec.columns)} columns) has no "
                             f"cell ({outside[0].row}, {outside[0].col})")
        return cls(spec=spec, scale=d["scale"], seeds=tuple(d["seeds"]), jobs=[Job.from_dict(j) for j in d["jobs"]],
                   cells=cells, overrides=dict(d.get("overrides") or {}))


def row_implemented(row: Row) -> bool:
    return row.method == "scratch" or row.method in list_methods()


def column_implemented(col: Column) -> bool:
    """A column fine-tunes the detector it names; one not registered leaves its cells
    "needs detector"."""
    return col.detector in list_detectors()


def pretrains_detector(row: Row) -> bool:
    """The row's method pretrains a whole detector (AlignDet): each column's detector gets its
    own pretraining run, over the image-domain run ``row.parent``."""
    if row.method == "scratch":
        return False
    cls = get_method(row.method)
    return cls.pretrain_detector(cls.Config.from_dict(row.method_overrides).to_dict()) is not None


def _parent(spec: TableSpec, ri: int, row: Row):
    if row.parent is None:
        raise ConfigError(f"{spec.path or spec.name}: rows[{ri}].parent: missing: {row.method} pretrains each "
                          f"column's detector over an image-domain run, e.g. parent: {{method: moco_v2, "
                          f"pretrain_epochs: 200}}")
    if pretrains_detector(Row(label="", method=row.parent.method, method_overrides=row.parent.method_overrides)):
        raise ConfigError(f"{spec.path or spec.name}: rows[{ri}].parent.method: {row.parent.method} pretrains a "
                          f"detector itself; the parent must be an image-domain method")
    return row.parent


def plan_table(name_or_spec, *, scale: str = "tiny", seeds=(0,), overrides: dict | None = None,
               data: dict | None = None) -> Plan:
    """``overrides``: {"method": {...}, "recipe": {...}, "finetune": {...}, "detector": {...}}
    applied to every row (CLI ``--set``; ``detector``/``finetune`` reach every column's detector);
    ``data``: a dataset replacing the scale's (``--data``).

    A row whose method pretrains a whole detector (AlignDet) is a chain per column: its image-
    domain ``parent`` run (shared with a row that shows it alone) -> that method's run for the
    column's detector (``method.detector``) -> fine-tuning -> evaluation. ``--set method.*`` /
    ``recipe.*`` reach the parent run (so it stays the image-domain row's run), not the
    box-domain run, whose own values are the row's ``method_overrides``/``recipe_overrides``.
    A detector the method does not pretrain leaves its cell ``NOT_SUPPORTED``."""
    spec = name_or_spec if isinstance(name_or_spec, TableSpec) else load_spec(name_or_spec)
    planner = _Planner(spec, scale, dict(overrides or {}), data)
    cells = [cell for ri, row in enumerate(spec.rows) for seed in seeds for cell in planner.row_cells(ri, row, seed)]
    jobs = sorted(planner.jobs.values(), key=lambda j: STAGE_ORDER[j.stage])   # parents always come first
    return Plan(spec, scale, tuple(seeds), jobs, cells, dict(overrides or {}))


@dataclass(frozen=True)
class _RowSeed:
    """One row at one seed: where the chains of its columns start."""
    index: int
    row: Row
    seed: int
    label: str                        # "<table>/<row label>/seed<n>": its runs' labels start with it
    box: bool                         # the row's method pretrains each column's detector
    parent: str | None = None         # box: the image-domain parent run
    pretrain: str | None = None       # not box: the row's pretraining run (None: scratch)


class _Planner:
    """Runs by key (a run asked for twice, by rows, columns or seeds that share it, is one job)
    and the cells that point at them."""

    def __init__(self, spec: TableSpec, scale: str, overrides: dict, data: dict | None):
        self.spec, self.scale, self.overrides, self.data = spec, scale, overrides, data
        self.jobs: dict[str, Job] = {}
        # configs are built once per row, seed and detector (and protocol and schedule)
        self._box_runs: dict[tuple, str | None] = {}
        self._finetunes: dict[tuple, tuple[str, str]] = {}

    def add(self, stage: str, cfg: dict, parents: tuple, label: str) -> str:
        key = run_key(cfg)
        if key not in self.jobs:
            self.jobs[key] = Job(stage, key, {**cfg, "label": label}, tuple(p for p in parents if p), label)
        return key

    def row_cells(self, ri: int, row: Row, seed: int) -> list[Cell]:
        if not row_implemented(row):
            return [Cell(ri, ci, seed, None, missing=NOT_IMPLEMENTED) for ci in range(len(self.spec.columns))]
        rs = self._start(ri, row, seed)
        return [self._cell(rs, ci, col) for ci, col in enumerate(self.spec.columns)]

    def _start(self, ri: int, row: Row, seed: int) -> _RowSeed:
        """The runs a row starts its chains with at one seed: a box-domain row's image-domain
        parent (shared with a row that shows it alone), another row's own pretraining."""
        label = f"{self.spec.name}/{row.label}/seed{seed}"
        if pretrains_detector(row):
            parent = self.add("pretrain", self._image_config(_parent(self.spec, ri, row), seed), (),
                              f"{label}/parent-pretrain")
            return _RowSeed(ri, row, seed, label, box=True, parent=parent)
        if row.parent is not None:
            raise ConfigError(f"{self.spec.path or self.spec.name}: rows[{ri}].parent: {row.method} pretrains no "
                              f"detector; a parent run is for a method that does (e.g. aligndet)")
        if row.method == "scratch":
            return _RowSeed(ri, row, seed, label, box=False)
        pretrain = self.add("pretrain", self._image_config(row, seed), (), f"{label}/pretrain")
        return _RowSeed(ri, row, seed, label, box=False, pretrain=pretrain)

    def _image_config(self, run: Row | ParentRun, seed: int) -> dict:
        """An image-domain pretraining run (a row's own, or a box-domain row's parent): the
        ``--set method.*``/``recipe.*`` overrides reach it."""
        return pretrain_config(run.method, scale=self.scale, seed=seed, epochs=run.pretrain_epochs,
                               method_overrides={**run.method_overrides, **self.overrides.get("method", {})},
                               recipe_overrides={**run.recipe_overrides, **self.overrides.get("recipe", {})},
                               data=self.data)

    def _cell(self, rs: _RowSeed, ci: int, col: Column) -> Cell:
        if not column_implemented(col):
            return Cell(rs.index, ci, rs.seed, None, missing=NEEDS_DETECTOR)
        pretrain = rs.pretrain
        if rs.box:
            pretrain = self._box_run(rs, col)
            if pretrain is None:
                return Cell(rs.index, ci, rs.seed, None, missing=NOT_SUPPORTED)
        ft, ev = self._finetune_evaluate(rs, col, pretrain)
        return Cell(rs.index, ci, rs.seed, ev, tuple(k for k in (rs.parent, pretrain, ft, ev) if k))

    def _box_run(self, rs: _RowSeed, col: Column) -> str | None:
        """The box-domain row's pretraining run for the column's detector over its parent;
        None when the method does not pretrain that detector."""
        memo = (rs.index, rs.seed, col.detector)
        if memo not in self._box_runs:
            row = rs.row
            try:
                cfg = pretrain_config(row.method, scale=self.scale, seed=rs.seed, epochs=row.pretrain_epochs,
                                      method_overrides={**row.method_overrides, "detector": col.detector},
                                      recipe_overrides=row.recipe_overrides, data=self.data, parent=rs.parent)
            except UnsupportedDetector:
                self._box_runs[memo] = None
            else:
                self._box_runs[memo] = self.add("pretrain", cfg, (rs.parent,),
                                                f"{rs.label}/pretrain-{cfg['detector']['name']}")
        return self._box_runs[memo]

    def _finetune_evaluate(self, rs: _RowSeed, col: Column, pretrain: str | None) -> tuple[str, str]:
        """The column's fine-tuning of ``pretrain`` and its evaluation: shared by the row's
        columns that agree on detector, protocol and schedule."""
        memo = (rs.index, rs.seed, col.detector, col.protocol, col.schedule)
        if memo not in self._finetunes:
            row = rs.row
            fcfg = finetune_config(scale=self.scale, seed=rs.seed, schedule=col.schedule, parent=pretrain,
                                   method=None if row.method == "scratch" else row.method,
                                   detector=col.detector, protocol=col.protocol,
                                   detector_overrides={**row.detector_overrides, **self.overrides.get("detector", {})},
                                   recipe_overrides={**row.finetune_overrides, **self.overrides.get("finetune", {})},
                                   data=self.data)
            # Mask R-CNN on COCO: labels without the detector and protocol
            what = "" if (col.detector, col.protocol) == ("mask_rcnn", "coco") else f"{col.detector}-{col.protocol}-"
            ft = self.add("finetune", fcfg, (pretrain,), f"{rs.label}/finetune-{what}{col.schedule}")
            protocol = "voc" if fcfg["data"].get("kind") == "voc" else col.protocol
            ecfg = evaluate_config(parent=ft, data=fcfg["data"], scale=self.scale, protocol=protocol)
            ev = self.add("evaluate", ecfg, (ft,), f"{rs.label}/evaluate-{what}{col.schedule}")
            self._finetunes[memo] = (ft, ev)
        return self._finetunes[memo]
