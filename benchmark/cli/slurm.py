"""Following a table or grid on Slurm: `detbench status`, `collect`, `cancel`."""
from __future__ import annotations


def _slurm_cmd(fn_name: str):
    def run(args) -> int:
        import slurm.orchestrate as orchestrate
        if args.name and not args.name.endswith((".yaml", ".yml")):   # a spec path names its table
            from benchmark.experiments.tables import check_name
            check_name(args.name, "table")
        return getattr(orchestrate, fn_name)(args) or 0
    return run


def add_parsers(sub) -> None:
    for name, help_ in (("status", "per table/grid: pending, running, done, failed, ... with job ids"),
                        ("collect", "pull finished Slurm results into the tables"),
                        ("cancel", "cancel the Slurm jobs of a table/grid")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("name", nargs="?", default=None, help="table or grid (default: all submitted)")
        s.add_argument("--runs", default=None)
        s.set_defaults(fn=_slurm_cmd(f"cli_{name}"))
