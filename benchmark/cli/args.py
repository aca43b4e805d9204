"""The arguments several commands share, and the helpers that read them."""
from __future__ import annotations

import argparse
import difflib

from benchmark.runs.identity import is_run_key
from methods.config import ConfigError, check_field


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="tiny", help="tiny (CPU, default) | small (one GPU) | paper (cluster)")
    p.add_argument("--runs", default=None, help="run store folder (default results/runs or $DETBENCH_RUNS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. method.queue_size=1024 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    data_arg(p)
    nproc_arg(p)


def allow_dirty_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-dirty", action="store_true",
                   help="write the table version even though the code has uncommitted changes (named <date>_<sha>-dirty; "
                        "refused by default in the repository's own results/; or DETBENCH_ALLOW_DIRTY=1)")


def data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=[], metavar="SPLIT=ANN.json:IMAGES/ | DATASET",
                   help="your own dataset instead of the scale's: train=ann.json:images/ val=... [pretrain=images/] "
                        "(repeat), or one dataset.yaml, VOC folder or COCO-layout folder (README: Your own data)")


def nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per run on this machine (torch.distributed: NCCL on GPU, gloo on CPU)")


def number(text: str) -> int | float:
    """``--epochs 200`` is the tables' ``200``, not ``200.0``: one run key, one run."""
    v = float(text)
    return int(v) if v.is_integer() else v


# the --set sections each command reads; anything else is an error, never silently ignored
SECTIONS = {"pretrain": ("method", "recipe"), "finetune": ("detector", "finetune"),
            "reproduce": ("method", "recipe", "detector", "finetune")}


def overrides(args, command: str) -> dict:
    from benchmark.experiments.config import parse_overrides
    sets = parse_overrides(args.overrides)
    allowed = SECTIONS[command]
    for section, value in sets.items():
        if section not in allowed:
            near = difflib.get_close_matches(section, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--set {section}.…: `detbench {command}` reads no section {section!r} "
                              f"(it reads: {', '.join(allowed)}){hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"--set {section}={value!r}: expected {section}.<key>=<value>")
    return sets


def user_data(args, command: str, splits: tuple[str, ...]) -> dict | None:
    from benchmark.data.user import parse_data_args, require_splits
    data = parse_data_args(getattr(args, "data", None))
    if data is not None:
        require_splits(data, splits, command)
    return data


def run_key_arg(value: str, flag: str) -> str:
    """A run key given on the command line (``--from``, ``--run``): 16 hex digits, never a path."""
    if not is_run_key(value):
        raise ConfigError(f"{flag} {value!r}: not a run key (16 hex digits, as `detbench runs` lists them)")
    return value


def seed_range(n: int, first: int) -> tuple[int, ...]:
    """``--seeds N --first-seed S``: seeds S..S+N-1; N >= 1 (no seed plans no run and no cell)
    and S >= 0 (``methods.config.RULES``), named as the user wrote them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--seeds: expected a number of seeds >= 1, got {n!r}")
    check_field("seed", first, "--first-seed")
    return tuple(range(first, first + n))
