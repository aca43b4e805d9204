"""The parser and the error handling of ``detbench`` (``benchmark.cli.main``): one module per
command group (``run``: pretrain, finetune, evaluate; ``tables``: reproduce, grid, render,
tables; ``store``: runs, export, data check; ``slurm``: status, collect, cancel). Each command
imports what it runs when it runs."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import benchmark.cli.run as run
import benchmark.cli.slurm as slurm
import benchmark.cli.store as store
import benchmark.cli.tables as tables
from methods.config import ConfigError

GROUPS = (run, store, tables, slurm)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detbench", description="detbench: self-supervised pretraining for detection")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def run_cli(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `detbench runs | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from benchmark.engine.loop import Stopped
    try:
        return args.fn(args)
    except Stopped:   # the loop saved and said "stopped at step N; the same command resumes"
        return 130
    except KeyboardInterrupt:
        print("detbench: interrupted (the same command resumes from the last checkpoint)", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"detbench: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from benchmark.common.fs import DiskFull, disk_full, no_space
        if no_space(e):   # one line naming the folder, wherever the write was
            full = e if isinstance(e, DiskFull) else disk_full(_full_folder(e))
            print(f"detbench: {full.strerror}", file=sys.stderr)
            return 28
        if not _named(e):   # a bug, or an error nobody named: the traceback is the report
            raise
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2


def _full_folder(e: BaseException) -> str:
    """The folder a "no space" error was writing into: its file's, else the fullest of the
    harness's roots."""
    from benchmark.common.fs import fullest
    from benchmark.common.paths import cache_root, results_root, runs_root
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            return str(Path(e.filename).parent)
        e = e.__cause__ or e.__context__
    return fullest([runs_root(), cache_root(), results_root()])


def _named(e: BaseException) -> bool:
    """The project's own errors (ConfigError, DataError, StoreError, ...: classes defined in
    its packages) carry a message meant for the user; everything else is shown in full."""
    return type(e).__module__.split(".")[0] in ("benchmark", "methods", "slurm")
