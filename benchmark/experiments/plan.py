"""Planning: a table or an ablation grid -> the runs it needs (pretrain -> fine-tune ->
evaluate), deduplicated by run key and topologically ordered. Each column names its
detector and protocol, so one table can mix detectors (a row's fine-tuning runs are shared
by the columns that agree on detector, protocol and schedule). Identical pretraining runs
shared by several rows or tables get one key and so run once."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmark.experiments.config import UnsupportedDetector, evaluate_config, finetune_config, pretrain_config
from benchmark.runs.store import run_key
from benchmark.detectors import list_detectors
from benchmark.experiments.tables import Column, Row, TableSpec, load_spec
from methods import get_method, list_methods
from methods.base import ConfigError


@dataclass(frozen=True)
class Job:
    stage: str                        # "pretrain" | "finetune" | "evaluate"
    key: str                          # run key (hex)
    config: dict = field(hash=False, compare=False)
    parents: tuple = ()               # run keys that must finish first
    label: str = ""


@dataclass
class Cell:
    row: int
    col: int
    seed: int
    eval_key: str | None              # None: the row's method or the column's detector is missing
    chain: tuple = ()                 # keys from pretraining to evaluation
    missing: str = ""                 # why eval_key is None: "not implemented" | "needs detector" |
    #                                   "not supported" (by a box-domain row's method)


@dataclass
class Plan:
    spec: TableSpec
    scale: str
    seeds: tuple
    jobs: list[Job]
    cells: list[Cell]
    overrides: dict = field(default_factory=dict)   # the ``--set`` overrides it was planned with


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
    A detector the method does not pretrain reads "not supported"."""
    spec = name_or_spec if isinstance(name_or_spec, TableSpec) else load_spec(name_or_spec)
    ov = overrides or {}
    jobs: dict[str, Job] = {}
    cells: list[Cell] = []

    def add(stage, cfg, parents, label):
        key = run_key(cfg)
        if key not in jobs:
            jobs[key] = Job(stage, key, {**cfg, "label": label}, tuple(p for p in parents if p), label)
        return key

    for ri, row in enumerate(spec.rows):
        for seed in seeds:
            if not row_implemented(row):
                cells += [Cell(ri, ci, seed, None, missing="not implemented") for ci in range(len(spec.columns))]
                continue
            base = f"{spec.name}/{row.label}/seed{seed}"
            pkey, ppkey = None, None
            box = pretrains_detector(row)
            if box:   # the image-domain parent run, shared with a row that shows it alone
                par = _parent(spec, ri, row)
                ppcfg = pretrain_config(par.method, scale=scale, seed=seed, epochs=par.pretrain_epochs,
                                        method_overrides={**par.method_overrides, **ov.get("method", {})},
                                        recipe_overrides={**par.recipe_overrides, **ov.get("recipe", {})},
                                        data=data)
                ppkey = add("pretrain", ppcfg, (), f"{base}/parent-pretrain")
            elif row.parent is not None:
                raise ConfigError(f"{spec.path or spec.name}: rows[{ri}].parent: {row.method} pretrains no "
                                  f"detector; a parent run is for a method that does (e.g. aligndet)")
            elif row.method != "scratch":
                pcfg = pretrain_config(row.method, scale=scale, seed=seed, epochs=row.pretrain_epochs,
                                       method_overrides={**row.method_overrides, **ov.get("method", {})},
                                       recipe_overrides={**row.recipe_overrides, **ov.get("recipe", {})},
                                       data=data)
                pkey = add("pretrain", pcfg, (), f"{base}/pretrain")
            per_detector: dict[str, str] = {}      # a box-domain row: one pretraining run per detector
            per_finetune: dict[tuple, tuple[str, str]] = {}
            for ci, col in enumerate(spec.columns):
                if not column_implemented(col):
                    cells.append(Cell(ri, ci, seed, None, missing="needs detector"))
                    continue
                if box:
                    if col.detector not in per_detector:
                        try:
                            bcfg = pretrain_config(row.method, scale=scale, seed=seed, epochs=row.pretrain_epochs,
                                                   method_overrides={**row.method_overrides, "detector": col.detector},
                                                   recipe_overrides=row.recipe_overrides, data=data, parent=ppkey)
                        except UnsupportedDetector:
                            per_detector[col.detector] = "not supported"
                        else:
                            per_detector[col.detector] = add("pretrain", bcfg, (ppkey,),
                                                             f"{base}/pretrain-{bcfg['detector']['name']}")
                    pkey = per_detector[col.detector]
                    if pkey == "not supported":
                        cells.append(Cell(ri, ci, seed, None, missing=pkey))
                        continue
                ft = (col.detector, col.protocol, col.schedule)
                if ft not in per_finetune:
                    fcfg = finetune_config(scale=scale, seed=seed, schedule=col.schedule, parent=pkey,
                                           method=None if row.method == "scratch" else row.method,
                                           detector=col.detector, protocol=col.protocol,
                                           detector_overrides={**row.detector_overrides, **ov.get("detector", {})},
                                           recipe_overrides={**row.finetune_overrides, **ov.get("finetune", {})},
                                           data=data)
                    # Mask R-CNN on COCO keeps the labels of the tables made before other detectors
                    what = "" if ft[:2] == ("mask_rcnn", "coco") else f"{col.detector}-{col.protocol}-"
                    fkey = add("finetune", fcfg, (pkey,), f"{base}/finetune-{what}{col.schedule}")
                    protocol = "voc" if fcfg["data"].get("kind") == "voc" else col.protocol
                    ecfg = evaluate_config(parent=fkey, data=fcfg["data"], scale=scale, protocol=protocol)
                    ekey = add("evaluate", ecfg, (fkey,), f"{base}/evaluate-{what}{col.schedule}")
                    per_finetune[ft] = (fkey, ekey)
                fkey, ekey = per_finetune[ft]
                cells.append(Cell(ri, ci, seed, ekey, tuple(k for k in (ppkey, pkey, fkey, ekey) if k)))
    order = {"pretrain": 0, "finetune": 1, "evaluate": 2}
    ordered = sorted(jobs.values(), key=lambda j: order[j.stage])  # parents always come first
    return Plan(spec, scale, tuple(seeds), ordered, cells, dict(ov))
