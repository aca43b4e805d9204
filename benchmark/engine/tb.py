"""TensorBoard event files beside a run's ``log.jsonl``: every logged scalar (loss, lr, each
loss term) at its step, and a finished run's metrics as hparams, so ``tensorboard --logdir
results/runs`` shows every run. The events of a run go to ``<run dir>/tb/<its label>``
(``soco_table1/<row>/seed0/finetune``): TensorBoard names a run by that path, so its filter
box groups a table's runs by table, row and seed.

Optional: without the ``tensorboard`` package (``pip install -e '.[tensorboard]'``) the
writer says so once and writes nothing. A resumed run starts its writer with ``purge_step``,
so TensorBoard drops the events logged after the checkpoint, as ``JsonlLogger`` drops those
lines.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger(__name__)
TB_DIR = "tb"
_warned = False


def _summary_writer():
    """torch's ``SummaryWriter`` class, or None (one notice) without the tensorboard package."""
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # torch.utils.tensorboard imports tensorboard
        if not _warned:
            log.warning("TensorBoard logs off: the tensorboard package is not installed "
                        "(pip install -e '.[tensorboard]')")
            _warned = True
        return None
    return SummaryWriter


def run_label(run_dir: Path) -> str:
    """The run's label from its ``config.json`` (the run key where it has none)."""
    try:
        label = json.loads((Path(run_dir) / "config.json").read_text()).get("label") or ""
    except (OSError, ValueError):
        label = ""
    return label or Path(run_dir).name


def event_dir(run_dir: Path) -> Path:
    """``<run dir>/tb/<label>``: the label's parts as folders, each made safe for a path."""
    parts = [re.sub(r"[^\w.=+-]+", "_", p).strip("._") or "_" for p in run_label(run_dir).split("/") if p]
    return Path(run_dir, TB_DIR, *parts)


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class TBWriter:
    """Writes each logged record's scalars at its step; created on the first record (only the
    process that logs, rank 0, writes). ``resume_step``: the step the run resumed from (None: a
    fresh run, whose old event files are removed, as its old ``log.jsonl``)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.run_dir, self.resume_step = Path(run_dir), resume_step
        self._writer = None
        self._off = False

    def _open(self):
        cls = _summary_writer()
        if cls is None:
            self._off = True
            return None
        d = event_dir(self.run_dir)
        if self.resume_step is None and d.exists():
            for f in d.glob("events.out.tfevents.*"):
                f.unlink()
        kw = {"purge_step": self.resume_step + 1} if self.resume_step is not None else {}
        self._writer = cls(log_dir=str(d), **kw)
        return self._writer

    def log(self, record: dict) -> None:
        if self._off or "step" not in record or "event" in record:
            return
        w = self._writer or self._open()
        if w is None:
            return
        for k, v in _scalars(record).items():
            w.add_scalar(f"train/{k}", v, int(record["step"]))
        w.flush()   # a killed run keeps what it logged, as log.jsonl does

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_hparams(run_dir: Path, config: dict, metrics: dict) -> bool:
    """A finished run's hparams (its flattened config's scalars) with its final metrics, in the
    run's event folder (TensorBoard's HPARAMS tab). False without the tensorboard package."""
    cls = _summary_writer()
    if cls is None:
        return False
    from torch.utils.tensorboard.summary import hparams

    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            elif isinstance(v, (bool, int, float, str)):
                out[f"{pre}{k}"] = v
        return out

    hp = flat(config)
    final = {f"final/{k}": float(v) for k, v in flat(metrics).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    w = cls(log_dir=str(event_dir(run_dir)))
    try:
        for e in hparams(hp, final):
            w.file_writer.add_summary(e)
        for k, v in final.items():
            w.add_scalar(k, v, 0)
    finally:
        w.close()
    return True
