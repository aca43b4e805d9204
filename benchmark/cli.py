"""The ``detbench`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from methods.base import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="tiny", help="tiny (CPU, default) | small (one GPU) | paper (cluster)")
    p.add_argument("--runs", default=None, help="run store folder (default results/runs or $DETBENCH_RUNS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. method.queue_size=1024 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def _seeds(n: int, first: int) -> tuple[int, ...]:
    return tuple(range(first, first + n))


def cmd_pretrain(a) -> int:
    from benchmark.config import parse_overrides, pretrain_config
    from benchmark.plan import Job
    from benchmark.stages import run_job
    from benchmark.store import RunStore, run_key
    ov = parse_overrides(a.overrides)
    cfg = pretrain_config(a.method, scale=a.scale, seed=a.seed, epochs=a.epochs,
                          method_overrides=ov.get("method"), recipe_overrides=ov.get("recipe"))
    key = run_key(cfg)
    job = Job("pretrain", key, {**cfg, "label": f"pretrain/{a.method}/seed{a.seed}"}, (), f"pretrain/{a.method}")
    m = run_job(job, a.runs, resume=not a.no_resume, device=a.device)
    print(json.dumps({"key": key, "run_dir": str(RunStore(a.runs).run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_finetune(a) -> int:
    from benchmark.config import finetune_config, parse_overrides
    from benchmark.plan import Job
    from benchmark.stages import run_job
    from benchmark.store import RunStore, run_key
    ov = parse_overrides(a.overrides)
    store = RunStore(a.runs)
    parent = None if a.init == "scratch" else a.init
    method = None
    if parent:
        pc = store.config(parent)
        if pc is None or store.status(parent) != "done":
            raise ConfigError(f"--from: pretraining run {parent!r} is not finished in {store.root}")
        method = pc["method"]["name"]
    cfg = finetune_config(scale=a.scale, seed=a.seed, schedule=a.schedule, parent=parent, method=method,
                          detector=a.detector, detector_overrides=ov.get("detector"),
                          recipe_overrides=ov.get("finetune"))
    key = run_key(cfg)
    job = Job("finetune", key, {**cfg, "label": f"finetune/{a.init}/{a.schedule}"}, (parent,) if parent else (),
              f"finetune/{a.init}/{a.schedule}")
    m = run_job(job, a.runs, resume=not a.no_resume, device=a.device)
    print(json.dumps({"key": key, "run_dir": str(store.run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_evaluate(a) -> int:
    from benchmark.config import evaluate_config
    from benchmark.plan import Job
    from benchmark.stages import run_job
    from benchmark.store import RunStore, run_key
    store = RunStore(a.runs)
    pc = store.config(a.init)
    if pc is None or store.status(a.init) != "done" or pc.get("stage") != "finetune":
        raise ConfigError(f"--from: {a.init!r} is not a finished fine-tuning run in {store.root}")
    cfg = evaluate_config(parent=a.init, data=pc["data"], scale=pc["scale"], protocol=pc.get("protocol", "coco"))
    key = run_key(cfg)
    m = run_job(Job("evaluate", key, {**cfg, "label": f"evaluate/{a.init}"}, (a.init,), f"evaluate/{a.init}"),
                a.runs, device=a.device)
    print(json.dumps({"key": key, **m}, indent=1, default=str))
    return 0


def cmd_reproduce(a) -> int:
    from benchmark.config import parse_overrides
    from benchmark.plan import plan_table
    from benchmark.report import render
    from benchmark.stages import run_plan_local
    from benchmark.store import RunStore
    name = a.table or a.grid
    ov = parse_overrides(a.overrides)
    plan = plan_table(name, scale=a.scale, seeds=_seeds(a.seeds, a.first_seed), overrides=ov)
    store = RunStore(a.runs)
    missing = [j for j in plan.jobs if store.status(j.key) != "done"]
    n_impl = len({c.row for c in plan.cells if c.eval_key})
    print(f"{plan.spec.name}: {len(plan.spec.rows)} rows ({n_impl} implemented), "
          f"{len(plan.jobs)} runs, {len(missing)} to run, scale {a.scale}, seeds {list(plan.seeds)}")
    if a.dry_run:
        for j in plan.jobs:
            print(f"  {store.status(j.key):8s} {j.stage:9s} {j.key} {j.label}")
        return 0
    if a.executor == "slurm":
        from slurm.orchestrate import submit_plan
        submit_plan(plan, store, profile=a.profile, overrides=parse_overrides(a.slurm_set), plan_overrides=ov)
        return 0
    t0 = time.time()
    if a.executor == "submitit-local":
        from slurm.orchestrate import run_plan_submitit_local
        run_plan_submitit_local(plan, store)
    else:
        from benchmark.config import load_scale
        jobs = a.jobs or int(load_scale(a.scale).get("runtime", {}).get("local_jobs", 1))
        run_plan_local(plan, a.runs, device=a.device, jobs=jobs)
    vdir = render(plan, store)
    print(f"done in {time.time() - t0:.0f} s; table: {vdir.parent / 'table.md'} (version {vdir.name})")
    return 0


def cmd_render(a) -> int:
    from benchmark.config import parse_overrides
    from benchmark.plan import plan_table
    from benchmark.report import render
    from benchmark.store import RunStore
    plan = plan_table(a.table, scale=a.scale, seeds=_seeds(a.seeds, a.first_seed),
                      overrides=parse_overrides(a.overrides))
    vdir = render(plan, RunStore(a.runs))
    print(vdir.parent / "table.md")
    return 0


def cmd_runs(a) -> int:
    from benchmark.store import RunStore
    rows = RunStore(a.runs).list()
    if a.stage:
        rows = [r for r in rows if r["stage"] == a.stage]
    if a.status:
        rows = [r for r in rows if r["status"] == a.status]
    rows.sort(key=lambda r: r["mtime"])
    for r in rows:
        print(f"{r['key']}  {r['status']:9s} {r['stage'] or '?':9s} "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['mtime']))}  {r['label']}")
    print(f"{len(rows)} runs in {RunStore(a.runs).root}")
    return 0


def cmd_tables(a) -> int:
    from benchmark.tables import available_tables, load_spec
    from methods import list_methods
    for name in available_tables():
        s = load_spec(name)
        impl = sum(r.method == "scratch" or r.method in list_methods() for r in s.rows)
        print(f"{name:14s} {s.kind:5s} {len(s.rows):3d} rows ({impl} implemented)  {s.title}")
    print("methods:", ", ".join(list_methods()))
    return 0


def _slurm_cmd(fn_name):
    def run(a) -> int:
        import slurm.orchestrate as o
        return getattr(o, fn_name)(a) or 0
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detbench", description=__doc__ or "detbench")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("pretrain", help="pretrain one method (resumable)")
    s.add_argument("--method", required=True)
    s.add_argument("--epochs", type=float, default=None, help="paper epochs (scaled by the scale)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true")
    _common(s)
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune a detector from a pretraining run (or scratch)")
    s.add_argument("--from", dest="init", required=True, help="pretraining run key, or 'scratch'")
    s.add_argument("--schedule", default="1x")
    s.add_argument("--detector", default="mask_rcnn", help="a registered detector (benchmark/detectors/)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true")
    _common(s)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("evaluate", help="COCO evaluation of a fine-tuning run")
    s.add_argument("--from", dest="init", required=True, help="fine-tuning run key")
    s.add_argument("--runs", default=None)
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_evaluate)

    for name, arg in (("reproduce", "--table"), ("grid", "--grid")):
        s = sub.add_parser(name, help=f"plan and run every run a {arg[2:]} needs, then write it")
        s.add_argument(arg, dest=arg[2:], required=True)
        s.set_defaults(**{"table" if arg == "--grid" else "grid": None})
        s.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
        s.add_argument("--first-seed", type=int, default=0)
        s.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"])
        s.add_argument("--profile", default="local-ci", help="Slurm cluster profile (slurm/profiles/)")
        s.add_argument("--slurm-set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile field, e.g. partition=gpu")
        s.add_argument("--dry-run", action="store_true", help="print the plan and stop")
        s.add_argument("--jobs", type=int, default=0,
                       help="local executor: runs at once (default: the scale's local_jobs; tiny 2)")
        _common(s)
        s.set_defaults(fn=cmd_reproduce)

    s = sub.add_parser("render", help="rebuild a table from the run store (no training)")
    s.add_argument("--table", required=True)
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--first-seed", type=int, default=0)
    _common(s)
    s.set_defaults(fn=cmd_render)

    s = sub.add_parser("runs", help="list the run store")
    s.add_argument("--runs", default=None)
    s.add_argument("--stage", default=None)
    s.add_argument("--status", default=None)
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("tables", help="list tables, grids and methods")
    s.set_defaults(fn=cmd_tables)

    for name, help_ in (("status", "per table/grid: pending, running, done, failed, ... with job ids"),
                        ("collect", "pull finished Slurm results into the tables"),
                        ("cancel", "cancel the Slurm jobs of a table/grid")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("name", nargs="?", default=None, help="table or grid (default: all submitted)")
        s.add_argument("--runs", default=None)
        s.set_defaults(fn=_slurm_cmd(f"cli_{name}"))
    return p


def main(argv: list[str] | None = None) -> int:
    import signal
    if hasattr(signal, "SIGPIPE"):  # `detbench runs | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"detbench: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"detbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
