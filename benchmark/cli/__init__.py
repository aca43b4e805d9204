"""The ``detbench`` command line (``benchmark.cli.commands``). This module imports nothing
heavy: a Ctrl-C while torch and the methods still load (seconds) is one line too."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from benchmark.cli.commands import run_cli
    except KeyboardInterrupt:
        print("detbench: interrupted", file=sys.stderr)
        return 130
    return run_cli(argv)

