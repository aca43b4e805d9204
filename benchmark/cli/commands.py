"""The parser and the error handling of ``detbench`` (``benchmark.cli.main``): one module per
command group (``run``: pretrain, finetune, evaluate; ``tables``: reproduce, grid, render,
tables; ``store``: runs, export, data check; ``slurm``: status, collect, cancel). Each command
imports what it runs when it runs."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

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
        if not _named(e):   # a bug, or an error nobody named: the traceback is the report
            raise
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2


def _named(e: BaseException) -> bool:
    """The project's own errors (ConfigError, DataError, StoreError, ...: classes defined in
    its packages) carry a message meant for the user; everything else is shown in full."""
    return type(e).__module__.split(".")[0] in ("benchmark", "methods", "slurm")
