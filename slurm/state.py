"""The Slurm state file of one table or grid: ``<results>/slurm/<name>.json``.

For every run key it records what was submitted last (stage, label, Slurm job id, array
task id, submission time, log paths, code snapshot) and keeps earlier submissions of the
same run under ``history``.  Writes are atomic (temporary file + ``os.replace``) and merge
with what is on disk under an exclusive lock, so entries written by an earlier shell, or
by another submission running at the same time, are never lost.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from benchmark.common.fs import atomic_write_bytes, file_lock

VERSION = 1


class StateError(ValueError):
    def __init__(self, path: str, message: str):
        self.path, self.message = str(path), message
        super().__init__(self.path, message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def state_path(results_dir: str | os.PathLike, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"state name must be a plain file name, got {name!r}")
    return Path(results_dir) / "slurm" / f"{name}.json"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SlurmState:
    """``SlurmState(path)``; ``runs`` reads, ``record``/``record_many`` merge and write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_name(cls, results_dir: str | os.PathLike, name: str) -> "SlurmState":
        return cls(state_path(results_dir, name))

    # ---------------------------------------------------------------- reading
    def load(self) -> dict:
        """The whole document (empty skeleton when the file does not exist yet)."""
        if not self.path.exists():
            return {"version": VERSION, "name": self.path.stem, "runs": {}, "submissions": []}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise StateError(str(self.path), f"not valid JSON ({err}); fix or move it away") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise StateError(str(self.path), "expected an object with a 'runs' mapping")
        data.setdefault("submissions", [])
        return data

    @property
    def runs(self) -> dict[str, dict]:
        return self.load()["runs"]

    def get(self, key: str) -> dict | None:
        return self.runs.get(key)

    # ---------------------------------------------------------------- writing
    def _locked(self):
        return file_lock(self.path.with_name(self.path.name + ".lock"))

    def _write(self, data: dict) -> None:
        atomic_write_bytes(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())

    def record_many(self, entries: Mapping[str, Mapping[str, Any]], submission: Mapping[str, Any] | None = None) -> dict:
        """Merge ``{run_key: entry}`` into the file; a replaced entry moves to ``history``."""
        with self._locked():
            data = self.load()
            runs = data["runs"]
            for key, entry in entries.items():
                new = dict(entry)
                old = runs.get(key)
                if old is not None:
                    history = list(old.get("history", []))
                    previous = {k: v for k, v in old.items() if k != "history"}
                    if "job_id" in new and previous.get("job_id") != new["job_id"]:
                        history.append(previous)
                    new = {**previous, **new}
                    new["history"] = history
                else:
                    new.setdefault("history", [])
                runs[key] = new
            if submission is not None:
                data["submissions"].append(dict(submission))
            self._write(data)
            return data

    def record(self, key: str, **entry: Any) -> dict:
        return self.record_many({key: entry})

    def set_fields(self, **fields: Any) -> dict:
        """Set top-level fields (e.g. ``plan``: what ``collect`` needs to rebuild the plan).

        ``version``, ``name``, ``runs`` and ``submissions`` are managed by this class.
        """
        reserved = {"version", "name", "runs", "submissions"} & set(fields)
        if reserved:
            raise ValueError(f"{self.path}: field(s) {sorted(reserved)} are managed by SlurmState")
        with self._locked():
            data = self.load()
            data.update(fields)
            self._write(data)
            return data
