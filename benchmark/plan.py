"""Planning: a table or an ablation grid -> the runs it needs (pretrain -> fine-tune ->
evaluate), deduplicated by run key and topologically ordered. Identical pretraining runs
shared by several rows or tables get one key and so run once."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmark.config import evaluate_config, finetune_config, pretrain_config
from benchmark.store import run_key
from benchmark.detectors import IMPLEMENTED as IMPLEMENTED_DETECTORS
from benchmark.tables import Column, Row, TableSpec, load_spec
from methods import list_methods


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
    missing: str = ""                 # why eval_key is None: "not implemented" | "needs detector"


@dataclass
class Plan:
    spec: TableSpec
    scale: str
    seeds: tuple
    jobs: list[Job]
    cells: list[Cell]

    def job(self, key: str) -> Job:
        return next(j for j in self.jobs if j.key == key)


def row_implemented(row: Row) -> bool:
    return row.method == "scratch" or row.method in list_methods()


def column_implemented(col: Column) -> bool:
    """A column fine-tunes the detector it names; one not built yet (Mask R-CNN C4 of the
    InsLoc model zoo) leaves its cells "needs detector"."""
    return col.detector in IMPLEMENTED_DETECTORS


def plan_table(name_or_spec, *, scale: str = "tiny", seeds=(0,), overrides: dict | None = None) -> Plan:
    """``overrides``: {"method": {...}, "recipe": {...}, "finetune": {...}, "detector": {...}}
    applied to every row (CLI ``--set``)."""
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
            pkey = None
            if row.method != "scratch":
                pcfg = pretrain_config(row.method, scale=scale, seed=seed, epochs=row.pretrain_epochs,
                                       method_overrides={**row.method_overrides, **ov.get("method", {})},
                                       recipe_overrides={**row.recipe_overrides, **ov.get("recipe", {})})
                pkey = add("pretrain", pcfg, (), f"{base}/pretrain")
            per_schedule: dict[str, tuple[str, str]] = {}
            for ci, col in enumerate(spec.columns):
                if not column_implemented(col):
                    cells.append(Cell(ri, ci, seed, None, missing="needs detector"))
                    continue
                if col.schedule not in per_schedule:
                    fcfg = finetune_config(scale=scale, seed=seed, schedule=col.schedule, parent=pkey,
                                           method=None if row.method == "scratch" else row.method,
                                           detector_overrides={**row.detector_overrides, **ov.get("detector", {})},
                                           recipe_overrides={**row.finetune_overrides, **ov.get("finetune", {})})
                    fkey = add("finetune", fcfg, (pkey,), f"{base}/finetune-{col.schedule}")
                    ecfg = evaluate_config(parent=fkey, data=fcfg["data"], scale=scale)
                    ekey = add("evaluate", ecfg, (fkey,), f"{base}/evaluate-{col.schedule}")
                    per_schedule[col.schedule] = (fkey, ekey)
                fkey, ekey = per_schedule[col.schedule]
                cells.append(Cell(ri, ci, seed, ekey, tuple(k for k in (pkey, fkey, ekey) if k)))
    order = {"pretrain": 0, "finetune": 1, "evaluate": 2}
    ordered = sorted(jobs.values(), key=lambda j: order[j.stage])  # parents always come first
    return Plan(spec, scale, tuple(seeds), ordered, cells)
