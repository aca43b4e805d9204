"""``python -m benchmark.cli`` (e.g. under torchrun) is ``detbench``."""
import sys

from benchmark.cli import main

sys.exit(main())
