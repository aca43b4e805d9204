"""Cluster profiles: where and how big the Slurm jobs of a table or grid are.

A profile is a small YAML file (``configs/slurm/<name>.yaml``)::

    partition: gpu
    account: my-lab
    time_min: 4320          # Slurm time limit, minutes
    gpus_per_node: 8        # also the number of tasks per node (one process per GPU),
                            # unless tasks_per_node says otherwise (gloo on a CPU cluster)
    nodes: 2
    stage_overrides:        # per-stage changes, e.g. evaluation needs one node only
      evaluate: {nodes: 1, gpus_per_node: 1}

``load_profile(path_or_name, overrides)`` validates every key and type and reports bad
input as :class:`ProfileError` naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from benchmark.common.paths import configs_root

PROFILES_DIR = configs_root() / "slurm"
DEFAULT_MAX_ARRAY_SIZE = 1000  # Slurm's own default for MaxArraySize


class ProfileError(ValueError):
    """Bad profile input: ``str(err)`` reads ``"<file>: field '<field>': <message>"``."""

    def __init__(self, path: str, field: str, message: str):
        self.path, self.field, self.message = str(path), str(field), str(message)
        super().__init__(self.path, self.field, self.message)

    def __str__(self) -> str:
        return f"{self.path}: field '{self.field}': {self.message}"

    def __reduce__(self):
        return (type(self), (self.path, self.field, self.message))


@dataclass(frozen=True)
class SlurmProfile:
    name: str = "default"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # processes per node; None: one per GPU (1 without GPUs)
    nodes: int = 1
    cpus_per_task: int = 1
    mem_gb: float | None = None
    # None: ask the cluster (`scontrol show config`), DEFAULT_MAX_ARRAY_SIZE if that fails
    max_array_size: int | None = None
    array_parallelism: int = 64
    constraint: str | None = None
    extra_sbatch: dict = field(default_factory=dict)  # extra `#SBATCH --key=value` lines
    snapshot_dir: str | None = None  # None: <results>/slurm/snapshots
    stage_overrides: dict = field(default_factory=dict)  # {stage: {field: value}}
    source: str = "<defaults>"  # file the profile was read from (not a YAML key)

    def processes_per_node(self) -> int:
        """One torch.distributed process per GPU (one without GPUs) unless ``tasks_per_node``
        says otherwise (a CPU cluster running gloo with several processes per node)."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def for_stage(self, stage: str) -> "SlurmProfile":
        """The profile with ``stage_overrides[stage]`` applied (itself if none)."""
        changes = self.stage_overrides.get(stage)
        if not changes:
            return self
        return _apply(self, changes, f"{self.source} (stage_overrides.{stage})", prefix=f"stage_overrides.{stage}.")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "SlurmProfile":
        """The profile with ``overrides`` (``--slurm-set k=v``) applied, checked as the file's
        keys are (a ProfileError's path ends in "(overrides)")."""
        return _apply(self, overrides, f"{self.source} (overrides)")

    def resolved_max_array_size(self) -> int:
        if self.max_array_size is not None:
            return self.max_array_size
        return cluster_max_array_size()

    def executor_parameters(self) -> dict:
        """Keyword arguments for ``submitit.AutoExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "timeout_min": self.time_min,
            "nodes": self.nodes,
            "tasks_per_node": self.processes_per_node(),
            "cpus_per_task": self.cpus_per_task,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None:
                params[f"slurm_{key}"] = value
        if self.extra_sbatch:
            params["slurm_additional_parameters"] = dict(self.extra_sbatch)
        return params


# YAML key -> accepted Python types (bool is rejected where int is expected)
_TYPES: dict[str, tuple] = {
    "name": (str,),
    "partition": (str, type(None)),
    "account": (str, type(None)),
    "qos": (str, type(None)),
    "time_min": (int,),
    "gpus_per_node": (int,),
    "tasks_per_node": (int, type(None)),
    "nodes": (int,),
    "cpus_per_task": (int,),
    "mem_gb": (int, float, type(None)),
    "max_array_size": (int, type(None)),
    "array_parallelism": (int,),
    "constraint": (str, type(None)),
    "extra_sbatch": (dict,),
    "snapshot_dir": (str, type(None)),
    "stage_overrides": (dict,),
}
_MIN = {"time_min": 1, "gpus_per_node": 0, "tasks_per_node": 1, "nodes": 1, "cpus_per_task": 1, "mem_gb": 0,
        "max_array_size": 1, "array_parallelism": 1}
_STAGES = ("pretrain", "finetune", "evaluate")


def _type_names(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", dict: "mapping", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _coerce(key: str, value: Any, source: str, prefix: str = "") -> Any:
    """Check one value; strings from a command line ("120", "null") are converted."""
    types = _TYPES[key]
    where = prefix + key
    if isinstance(value, str) and str not in types:
        text = value.strip()
        if text.lower() in ("null", "none", "") and type(None) in types:
            value = None
        else:
            for t in (int, float):
                if t in types:
                    try:
                        value = t(text)
                        break
                    except ValueError:
                        continue
    if isinstance(value, bool) or not isinstance(value, types):
        raise ProfileError(source, where, f"expected {_type_names(types)}, got {type(value).__name__} {value!r}")
    if key in _MIN and value is not None and value < _MIN[key]:
        raise ProfileError(source, where, f"must be >= {_MIN[key]}, got {value!r}")
    if key == "extra_sbatch":
        for k, v in value.items():
            if not isinstance(k, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", k):
                raise ProfileError(source, f"{where}.{k}", "sbatch option names are lower-case words like 'exclusive' or 'mail-type'")
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                raise ProfileError(source, f"{where}.{k}", f"expected a scalar value, got {type(v).__name__}")
        value = dict(value)
    if key == "stage_overrides":
        checked = {}
        for stage, changes in value.items():
            if stage not in _STAGES:
                raise ProfileError(source, f"{where}.{stage}", f"unknown stage; expected one of {', '.join(_STAGES)}")
            if not isinstance(changes, dict):
                raise ProfileError(source, f"{where}.{stage}", f"expected a mapping, got {type(changes).__name__}")
            for k, v in changes.items():
                if k not in _TYPES or k in ("name", "stage_overrides", "snapshot_dir"):
                    raise ProfileError(source, f"{where}.{stage}.{k}", "not a per-stage setting")
                _coerce(k, v, source, prefix=f"{where}.{stage}.")
            checked[stage] = dict(changes)
        value = checked
    return value


def _apply(profile: SlurmProfile, changes: Mapping[str, Any], source: str, prefix: str = "") -> SlurmProfile:
    values = {}
    for key, value in changes.items():
        if key not in _TYPES:
            known = ", ".join(sorted(_TYPES))
            raise ProfileError(source, prefix + str(key), f"unknown key; known keys: {known}")
        values[key] = _coerce(key, value, source, prefix)
    return dataclasses.replace(profile, **values)


def profile_path(path_or_name: str | Path) -> Path:
    """A path to an existing file, or the name of a shipped profile (``local-ci``)."""
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return PROFILES_DIR / f"{path_or_name}.yaml"


def load_profile(path_or_name: str | Path, overrides: Mapping[str, Any] | None = None) -> SlurmProfile:
    """Read a profile file (or a shipped profile by name) and apply ``overrides``.

    Raises :class:`ProfileError` naming the file and the field for unknown keys, wrong
    types and out-of-range values.
    """
    path = profile_path(path_or_name)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ProfileError(str(path), "<file>", f"no such profile file (shipped profiles: {shipped})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ProfileError(str(path), "<file>", f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ProfileError(str(path), "<file>", f"expected a mapping at the top level, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    profile = _apply(SlurmProfile(source=str(path)), data, str(path))
    profile = dataclasses.replace(profile, source=str(path))
    return profile.with_overrides(overrides) if overrides else profile


def cluster_max_array_size(default: int = DEFAULT_MAX_ARRAY_SIZE) -> int:
    """MaxArraySize from ``scontrol show config``; ``default`` when Slurm cannot be asked."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return default
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.MULTILINE)
    return int(match.group(1)) if (out.returncode == 0 and match) else default
