"""Table specs: rows = method x pretraining length (or an ablation setting), columns =
metric x schedule x detector (x protocol), reference values read from the paper's published table (a copy kept in
``reference/`` with its source). A table is a view over runs: rendering reads the run store,
never trains."""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from methods.config import ConfigError, dataclass_from_dict
from benchmark.common.paths import configs_root

SPECS = configs_root() / "tables"
REFERENCE = SPECS / "reference"
# a table's (or scale's) name names folders and files: a plain name, never a path ("@" joins
# a table to its scale in results/tables/<name>@<scale>)
NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*")


def check_name(value, what: str) -> str:
    """``value`` when it is a plain name (``NAME``); else a ConfigError naming ``what``."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{what}: {value!r} is not a name (lower-case letters, digits, '_', '.', '-'; "
                          f"no path separators, no leading dot)")
    return value


@dataclass
class Column:
    label: str
    schedule: str
    metric: str                       # path into evaluate metrics, e.g. "bbox.AP"
    ref_column: str | None = None
    ref_match: dict = field(default_factory=dict)
    detector: str = "mask_rcnn"       # a registered detector (benchmark.detectors)
    protocol: str = "coco"            # "coco" | "voc"


@dataclass
class ParentRun:
    """The image-domain pretraining run under a method that pretrains a whole detector
    (AlignDet): ``parent: {method: moco_v2, pretrain_epochs: 200}``."""
    method: str
    pretrain_epochs: int | float | None = None
    method_overrides: dict = field(default_factory=dict)
    recipe_overrides: dict = field(default_factory=dict)


@dataclass
class Row:
    label: str
    method: str                       # registered method, or "scratch"
    pretrain_epochs: int | float | None = None   # kept as written: it enters the run key
    method_overrides: dict = field(default_factory=dict)
    recipe_overrides: dict = field(default_factory=dict)
    finetune_overrides: dict = field(default_factory=dict)
    detector_overrides: dict = field(default_factory=dict)
    ref_match: dict = field(default_factory=dict)
    parent: ParentRun | None = None   # required by, and only by, a method that pretrains a detector


@dataclass
class Gain:
    """A derived row: ``row`` minus ``over`` in every column, beside the paper's gain (the
    reference's ``ref_column`` where the column's ``ref_match`` matches), for papers that
    publish gains rather than APs (AlignDet's abstract)."""
    label: str
    row: str
    over: str
    ref_column: str


@dataclass
class TableSpec:
    name: str
    title: str
    source: str
    reference: str | None
    columns: list[Column]
    rows: list[Row]
    kind: str = "table"               # "table" | "grid" (an ablation grid)
    # also draw convergence.png: each column group of one detector and metric (several
    # schedules) as the metric against the fine-tuning steps, one line per row
    convergence: bool = False
    gain: Gain | None = None
    path: Path | None = None

    def gain_reference(self, col: Column) -> float | None:
        """The paper's gain for a column (``gain.ref_column`` of the reference row matching
        the column's ``ref_match``)."""
        if self.gain is None or not col.ref_match:
            return None
        return self.reference_value(Row(label="", method="", ref_match=dict(col.ref_match)),
                                    Column(label=col.label, schedule=col.schedule, metric=col.metric,
                                           ref_column=self.gain.ref_column))

    def reference_rows(self) -> list[dict]:
        if not self.reference:
            return []
        p = REFERENCE / self.reference
        if not p.exists():
            raise ConfigError(f"{self.path}: reference: file {p} does not exist")
        with open(p, newline="") as f:
            return list(csv.DictReader(f))

    def reference_value(self, row: Row, col: Column) -> float | None:
        """The paper's number for a cell: the reference row matching row.ref_match and
        col.ref_match, its ``col.ref_column``. NaN (diverged in the paper) stays NaN."""
        if not col.ref_column or not row.ref_match:
            return None
        want = {**row.ref_match, **col.ref_match}
        hits = [r for r in self.reference_rows()
                if all(str(r.get(k, "")).strip() == str(v) for k, v in want.items())]
        if not hits:
            return None
        v = hits[0].get(col.ref_column, "")
        if v in ("", None):
            return None
        return float(v)


def available_tables() -> list[str]:
    return sorted(p.stem for p in SPECS.glob("*.yaml"))


def load_spec(name_or_path: str) -> TableSpec:
    p = Path(name_or_path)
    if not p.suffix:   # a name, in configs/tables/; a spec elsewhere is given by its .yaml path
        p = SPECS / f"{check_name(name_or_path, 'table')}.yaml"
    if not p.exists():
        raise ConfigError(f"table: unknown {name_or_path!r} (available: {', '.join(available_tables())})")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    for k in ("name", "columns", "rows"):
        if k not in d:
            raise ConfigError(f"{p}: field '{k}' is missing")
    check_name(d["name"], f"{p}: name")   # it names the table's folder under results/tables
    cols = [dataclass_from_dict(Column, c, f"{p}: columns[{i}]") for i, c in enumerate(d.pop("columns"))]
    rows = []
    for i, r in enumerate(d.pop("rows")):
        if "label" not in r or "method" not in r:
            raise ConfigError(f"{p}: rows[{i}]: 'label' and 'method' are required")
        row = dataclass_from_dict(Row, r, f"{p}: rows[{i}]")
        if row.parent is not None:
            if not isinstance(row.parent, dict) or "method" not in row.parent:
                raise ConfigError(f"{p}: rows[{i}].parent: expected a mapping with 'method' "
                                  f"(and pretrain_epochs, method_overrides, recipe_overrides), got {row.parent!r}")
            row.parent = dataclass_from_dict(ParentRun, row.parent, f"{p}: rows[{i}].parent")
        rows.append(row)
    gain = d.pop("gain", None)
    if gain is not None:
        gain = dataclass_from_dict(Gain, gain, f"{p}: gain")
        for k in ("row", "over"):
            if getattr(gain, k) not in [r.label for r in rows]:
                raise ConfigError(f"{p}: gain.{k}: no row labelled {getattr(gain, k)!r}")
    spec = dataclass_from_dict(TableSpec, {"title": d.get("name"), "source": "", "reference": None, **d,
                              "columns": cols, "rows": rows, "gain": gain}, str(p))
    spec.path = p
    return spec


def get_metric(metrics: dict, path: str) -> float | None:
    node = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s
