"""Tables and grids: `detbench reproduce`, `grid`, `render`, `tables`."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmark.cli.args import allow_dirty_arg, common, overrides, seed_range, user_data
from benchmark.common.paths import results_root, runs_root
from benchmark.runs.store import RunStore
from methods.config import ConfigError


def table_seeds_for(args, spec, df=None) -> tuple[tuple[int, ...], str]:
    """--seeds N; else the seeds the table was last built with (a 1-seed rerun never
    replaces a 3-seed table unasked); else the seeds the store has for it; else seed 0."""
    from benchmark.reporting.render import table_seeds
    if args.num_seeds is not None:
        return seed_range(args.num_seeds, args.first_seed), ""
    kept = table_seeds(spec.name, args.scale)
    if kept:
        return kept, "keeping the table's seeds; --seeds N to change"
    if df is not None:
        from benchmark.reporting.leaderboard import stored_seeds
        found = stored_seeds(spec, args.scale, df)
        if found:
            return found, "the seeds the run store has for it; --seeds N to change"
    return seed_range(1, args.first_seed), ""


def fresh_store(args) -> str:
    """--fresh: a new, empty run store, so that nothing is reused."""
    root = Path(args.runs) if args.runs else results_root() / f"runs-fresh-{time.strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"--fresh: run store {root} is not empty (give an empty or new --runs folder)")
    return str(root)


def cmd_reproduce(args) -> int:
    from benchmark.experiments.config import check_inputs, parse_overrides
    from methods import list_methods
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.progress import failure_summary
    from benchmark.reporting.render import render, writable_table_dir
    from benchmark.reporting.results import describe_reuse, load_runs
    from slurm.local import run_plan_local
    from benchmark.experiments.tables import load_spec
    name = args.table or args.grid
    sets = overrides(args, "reproduce")
    if args.fresh:
        args.runs = fresh_store(args)
    data = user_data(args, "reproduce", ("pretrain", "train", "val"))
    if not args.dry_run:
        check_inputs(args.scale, [r.method for r in load_spec(name).rows if r.method in list_methods()],
                     user_data=data is not None)
    store = RunStore(args.runs)
    df = load_runs(store.root)
    spec = load_spec(name)
    if not args.dry_run:   # before any run, not after every run is done
        writable_table_dir(spec.name, args.scale, create=False)
    seeds, why = table_seeds_for(args, spec, df)
    plan = plan_table(spec, scale=args.scale, seeds=seeds, overrides=sets, data=data)
    missing, diverged = _to_run(plan, store)
    n_impl = len({c.row for c in plan.cells if c.eval_key})
    print(f"{plan.spec.name}: {len(plan.spec.rows)} rows ({n_impl} implemented), "
          f"{len(plan.jobs)} runs, {len(missing)} to run, scale {args.scale}, seeds {list(plan.seeds)}"
          + (f" ({why})" if why else ""))
    if diverged:
        print(f"  {len(diverged)} stored run(s) diverged: a result, kept (their cells read 'diverged'; "
              f"delete a run's folder or use --fresh to recompute): {', '.join(diverged[:4])}"
              + (" ..." if len(diverged) > 4 else ""))
    if len(missing) < len(plan.jobs):
        print(f"  reused from {store.root}: {describe_reuse(df, [j.key for j in plan.jobs])}"
              + ("; nothing to train" if not missing else "")
              + ". To recompute from scratch: --fresh (a new, empty run store).")
    elif args.fresh:
        print(f"  --fresh: nothing reused; runs go to {store.root} (generated data and proposals stay cached "
              f"in .cache/detbench: delete it to rebuild them too)")
    if not args.dry_run:   # bad annotations, missing or mis-sized images: before any run starts
        from benchmark.cli.run import check_data
        check_data([j.config for j in missing])
    if args.dry_run:
        for j in plan.jobs:
            print(f"  {store.status(j.key):8s} {j.stage:9s} {j.key} {j.label}")
        return 0
    if args.executor == "slurm":
        from slurm.orchestrate import submit_plan
        submit_plan(plan, store, profile=args.profile, overrides=parse_overrides(args.slurm_set))
        return 0
    t0 = time.time()
    from benchmark.experiments.config import load_scale
    jobs = args.jobs or int(load_scale(args.scale).get("runtime", {}).get("local_jobs", 1))
    if args.executor == "submitit-local":
        jobs = args.jobs or 1
    run_plan_local(plan, args.runs, device=args.device, jobs=jobs, nproc=args.nproc, executor=args.executor)
    df = load_runs(store.root)
    n_failed, filled, failures = failure_summary(plan, df)
    if not filled:   # failed or diverged throughout: a table with no value is not written
        print(failures, file=sys.stderr)
        return 1
    before = _current_version(spec.name, args.scale)
    vdir = render(plan, store, runs=df, allow_dirty=args.allow_dirty)
    if store.root.resolve() == runs_root().resolve():
        from benchmark.reporting.leaderboard import write_readme
        write_readme(df, results_root(), store.root)
    what = "unchanged, " if vdir.name == before else ""
    print(f"finished in {time.time() - t0:.0f} s; table: {vdir.parent / 'table.md'} ({what}version {vdir.name})")
    if n_failed:
        print(failures, file=sys.stderr)
        return 1
    return 0


def _to_run(plan, store: RunStore) -> tuple[list, list[str]]:
    """(the plan's jobs to run, the keys of its stored diverged runs). A diverged run is a
    result (running it again diverges again); its descendants are not run either."""
    from benchmark.runs.store import RESULTS
    status = {j.key: store.status(j.key) for j in plan.jobs}
    blocked = {k for k, s in status.items() if s == "diverged"}
    for j in plan.jobs:   # parents first
        if any(p in blocked for p in j.parents):
            blocked.add(j.key)
    todo = [j for j in plan.jobs if status[j.key] not in RESULTS and j.key not in blocked]
    return todo, [k for k, s in status.items() if s == "diverged"]


def _current_version(name: str, scale: str) -> str | None:
    from benchmark.reporting.render import read_version, table_dir_name
    v = read_version(results_root() / "tables" / table_dir_name(name, scale))
    return v.get("version") if v else None


def cmd_render(args) -> int:
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.render import render
    from benchmark.reporting.results import load_runs
    from benchmark.experiments.tables import load_spec
    if args.all:
        from benchmark.reporting.leaderboard import render_all
        vdirs, readme = render_all(args.runs, allow_dirty=args.allow_dirty)
        for v in vdirs:
            print(f"{v.parent / 'table.md'} (version {v.name})")
        print(readme)
        return 0
    if not args.table:
        raise ConfigError("render: give --table NAME, or --all for every table and the leaderboards")
    store = RunStore(args.runs)
    df = load_runs(store.root)
    spec = load_spec(args.table)
    seeds, why = table_seeds_for(args, spec, df)
    plan = plan_table(spec, scale=args.scale, seeds=seeds, overrides=overrides(args, "reproduce"),
                      data=user_data(args, "render", ("pretrain", "train", "val")))
    vdir = render(plan, store, runs=df, allow_dirty=args.allow_dirty)
    print(f"{vdir.parent / 'table.md'} (version {vdir.name}{'; ' + why if why else ''})")
    return 0


def cmd_tables(args) -> int:
    from benchmark.experiments.tables import available_tables, load_spec
    from methods import list_methods
    for name in available_tables():
        s = load_spec(name)
        impl = sum(r.method == "scratch" or r.method in list_methods() for r in s.rows)
        print(f"{name:14s} {s.kind:5s} {len(s.rows):3d} rows ({impl} implemented)  {s.title}")
    print("methods:", ", ".join(list_methods()))
    return 0


def add_parsers(sub) -> None:
    for name, arg in (("reproduce", "--table"), ("grid", "--grid")):
        s = sub.add_parser(name, help=f"plan and run every run a {arg[2:]} needs, then write it")
        s.add_argument(arg, dest=arg[2:], required=True)
        s.set_defaults(**{"table" if arg == "--grid" else "grid": None})
        s.add_argument("--seeds", dest="num_seeds", type=int, default=None,
                       help="number of seeds (0, 1, ...); default: the seeds the table was last built with, else 1")
        s.add_argument("--fresh", action="store_true",
                       help="recompute from scratch: a new, empty run store (results/runs-fresh-<time>, "
                            "or an empty --runs folder); nothing is reused")
        s.add_argument("--first-seed", type=int, default=0)
        s.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"])
        s.add_argument("--profile", default="local-ci", help="Slurm cluster profile (configs/slurm/)")
        s.add_argument("--slurm-set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile field, e.g. partition=gpu")
        s.add_argument("--dry-run", action="store_true", help="print the plan and stop")
        s.add_argument("--jobs", type=int, default=0,
                       help="local executor: runs at once (default: the scale's local_jobs; tiny 2)")
        allow_dirty_arg(s)
        common(s)
        s.set_defaults(fn=cmd_reproduce)

    s = sub.add_parser("render", help="rebuild a table (or --all: every table and results/README.md's "
                                      "leaderboards) from the run store, no training")
    s.add_argument("--table", default=None)
    s.add_argument("--all", action="store_true", help="every table and grid at every scale in the store, "
                                                      "then the leaderboards in results/README.md")
    s.add_argument("--seeds", dest="num_seeds", type=int, default=None,
                   help="number of seeds; default: the seeds the table was built with")
    s.add_argument("--first-seed", type=int, default=0)
    allow_dirty_arg(s)
    common(s)
    s.set_defaults(fn=cmd_render)

    s = sub.add_parser("tables", help="list tables, grids and methods")
    s.set_defaults(fn=cmd_tables)
