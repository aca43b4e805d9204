"""The ``detbench`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from benchmark.runs.store import STAGES, STATUSES
from methods.config import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="tiny", help="tiny (CPU, default) | small (one GPU) | paper (cluster)")
    p.add_argument("--runs", default=None, help="run store folder (default results/runs or $DETBENCH_RUNS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. method.queue_size=1024 (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    _data(p)
    _nproc(p)


def _allow_dirty(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-dirty", action="store_true",
                   help="write the table version even though the code has uncommitted changes (named <date>_<sha>-dirty; "
                        "refused by default in the repository's own results/; or DETBENCH_ALLOW_DIRTY=1)")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=[], metavar="SPLIT=ANN.json:IMAGES/ | DATASET",
                   help="your own dataset instead of the scale's: train=ann.json:images/ val=... [pretrain=images/] "
                        "(repeat), or one dataset.yaml, VOC folder or COCO-layout folder (README: Your own data)")


def _user_data(a, command: str, splits: tuple[str, ...]) -> dict | None:
    from benchmark.data.user import parse_data_args, require_splits
    data = parse_data_args(getattr(a, "data", None))
    if data is not None:
        require_splits(data, splits, command)
    return data


def _number(text: str) -> int | float:
    """``--epochs 200`` is the tables' ``200``, not ``200.0``: one run key, one run."""
    v = float(text)
    return int(v) if v.is_integer() else v


def _nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per run on this machine (torch.distributed: NCCL on GPU, gloo on CPU)")


# the --set sections each command reads; anything else is an error, never silently ignored
SECTIONS = {"pretrain": ("method", "recipe"), "finetune": ("detector", "finetune"),
            "reproduce": ("method", "recipe", "detector", "finetune")}


def _overrides(a, command: str) -> dict:
    import difflib

    from benchmark.experiments.config import parse_overrides
    ov = parse_overrides(a.overrides)
    allowed = SECTIONS[command]
    for section, value in ov.items():
        if section not in allowed:
            near = difflib.get_close_matches(section, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--set {section}.…: `detbench {command}` reads no section {section!r} "
                              f"(it reads: {', '.join(allowed)}){hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"--set {section}={value!r}: expected {section}.<key>=<value>")
    return ov


def _run(job, a) -> dict:
    """One stage in this process, or in ``--nproc`` processes (as torchrun would start them)."""
    from benchmark.runner import run_job
    from slurm.local import run_processes
    from benchmark.runs.store import RunStore
    if a.nproc > 1:
        status, err = run_processes(job, str(RunStore(a.runs).root), nproc=a.nproc, device=a.device)
        if status != "done":
            raise RuntimeError(f"{job.label}: {status}: {err} (see {RunStore(a.runs).run_dir(job.key)})")
        return RunStore(a.runs).metrics(job.key)
    return run_job(job, a.runs, resume=not getattr(a, "no_resume", False), device=a.device)


def _seeds(n: int, first: int) -> tuple[int, ...]:
    return tuple(range(first, first + n))


def cmd_pretrain(a) -> int:
    from benchmark.experiments.config import check_inputs, pretrain_config
    from benchmark.experiments.plan import Job
    from benchmark.runs.store import RunStore
    from benchmark.runs.identity import run_key
    ov = _overrides(a, "pretrain")
    data = _user_data(a, "pretrain", ("pretrain",))
    check_inputs(a.scale, (a.method,), user_data=data is not None)
    cfg = pretrain_config(a.method, scale=a.scale, seed=a.seed, epochs=a.epochs,
                          method_overrides=ov.get("method"), recipe_overrides=ov.get("recipe"),
                          data=data)
    key = run_key(cfg)
    job = Job("pretrain", key, {**cfg, "label": f"pretrain/{a.method}/seed{a.seed}"}, (), f"pretrain/{a.method}")
    m = _run(job, a)
    print(json.dumps({"key": key, "run_dir": str(RunStore(a.runs).run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_finetune(a) -> int:
    from benchmark.experiments.config import check_inputs, finetune_config
    from benchmark.experiments.plan import Job
    from benchmark.runs.store import RunStore
    from benchmark.runs.identity import run_key
    ov = _overrides(a, "finetune")
    store = RunStore(a.runs)
    parent = None if a.init == "scratch" else a.init
    method = None
    if parent:
        pc = store.config(parent)
        if pc is None or store.status(parent) != "done":
            raise ConfigError(f"--from: pretraining run {parent!r} is not finished in {store.root}")
        method = pc["method"]["name"]
    data = _user_data(a, "finetune", ("train", "val"))
    check_inputs(a.scale, user_data=data is not None)
    cfg = finetune_config(scale=a.scale, seed=a.seed, schedule=a.schedule, parent=parent, method=method,
                          detector=a.detector, detector_overrides=ov.get("detector"),
                          recipe_overrides=ov.get("finetune"), data=data)
    key = run_key(cfg)
    job = Job("finetune", key, {**cfg, "label": f"finetune/{a.init}/{a.schedule}"}, (parent,) if parent else (),
              f"finetune/{a.init}/{a.schedule}")
    m = _run(job, a)
    print(json.dumps({"key": key, "run_dir": str(store.run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_evaluate(a) -> int:
    from benchmark.experiments.config import evaluate_config
    from benchmark.experiments.plan import Job
    from benchmark.runs.store import RunStore
    from benchmark.runs.identity import run_key
    store = RunStore(a.runs)
    pc = store.config(a.init)
    if pc is None or store.status(a.init) != "done" or pc.get("stage") != "finetune":
        raise ConfigError(f"--from: {a.init!r} is not a finished fine-tuning run in {store.root}")
    from benchmark.data.user import with_identity
    # the fine-tuning run's validation data (its content now: a fixed file is a new evaluation),
    # or another dataset given with --data
    data = _user_data(a, "evaluate", ("val",)) or pc["data"]
    protocol = "voc" if data.get("kind") == "voc" else pc.get("protocol", "coco")   # VOC: benchmark.stages.voc_eval
    cfg = evaluate_config(parent=a.init, data=with_identity(data), scale=pc["scale"], protocol=protocol)
    key = run_key(cfg)
    m = _run(Job("evaluate", key, {**cfg, "label": f"evaluate/{a.init}"}, (a.init,), f"evaluate/{a.init}"), a)
    print(json.dumps({"key": key, **m}, indent=1, default=str))
    return 0


def _table_seeds(a, spec, df=None) -> tuple[tuple[int, ...], str]:
    """--seeds N; else the seeds the table was last built with (a 1-seed rerun never
    replaces a 3-seed table unasked); else the seeds the store has for it; else seed 0."""
    from benchmark.reporting.render import table_seeds
    if a.seeds is not None:
        return _seeds(a.seeds, a.first_seed), ""
    kept = table_seeds(spec.name, a.scale)
    if kept:
        return kept, "keeping the table's seeds; --seeds N to change"
    if df is not None:
        from benchmark.reporting.leaderboard import stored_seeds
        found = stored_seeds(spec, a.scale, df)
        if found:
            return found, "the seeds the run store has for it; --seeds N to change"
    return _seeds(1, a.first_seed), ""


def _fresh_store(a) -> str:
    """--fresh: a new, empty run store, so that nothing is reused."""
    from pathlib import Path

    from benchmark.common.paths import results_root
    root = Path(a.runs) if a.runs else results_root() / f"runs-fresh-{time.strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"--fresh: run store {root} is not empty (give an empty or new --runs folder)")
    return str(root)


def cmd_reproduce(a) -> int:
    from benchmark.experiments.config import check_inputs, parse_overrides
    from methods import list_methods
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.progress import failure_summary
    from benchmark.reporting.render import render
    from benchmark.reporting.results import describe_reuse, load_runs
    from slurm.local import run_plan_local
    from benchmark.runs.store import RunStore
    from benchmark.common.paths import runs_root
    from benchmark.experiments.tables import load_spec
    name = a.table or a.grid
    ov = _overrides(a, "reproduce")
    if a.fresh:
        a.runs = _fresh_store(a)
    data = _user_data(a, "reproduce", ("pretrain", "train", "val"))
    if not a.dry_run:
        check_inputs(a.scale, [r.method for r in load_spec(name).rows if r.method in list_methods()],
                     user_data=data is not None)
    store = RunStore(a.runs)
    df = load_runs(store.root)
    spec = load_spec(name)
    seeds, why = _table_seeds(a, spec, df)
    plan = plan_table(spec, scale=a.scale, seeds=seeds, overrides=ov, data=data)
    missing = [j for j in plan.jobs if store.status(j.key) != "done"]
    n_impl = len({c.row for c in plan.cells if c.eval_key})
    print(f"{plan.spec.name}: {len(plan.spec.rows)} rows ({n_impl} implemented), "
          f"{len(plan.jobs)} runs, {len(missing)} to run, scale {a.scale}, seeds {list(plan.seeds)}"
          + (f" ({why})" if why else ""))
    if len(missing) < len(plan.jobs):
        print(f"  reused from {store.root}: {describe_reuse(df, [j.key for j in plan.jobs])}"
              + ("; nothing to train" if not missing else "")
              + ". To recompute from scratch: --fresh (a new, empty run store).")
    elif a.fresh:
        print(f"  --fresh: nothing reused; runs go to {store.root} (generated data and proposals stay cached "
              f"in .cache/detbench: delete it to rebuild them too)")
    if a.dry_run:
        for j in plan.jobs:
            print(f"  {store.status(j.key):8s} {j.stage:9s} {j.key} {j.label}")
        return 0
    if a.executor == "slurm":
        from slurm.orchestrate import submit_plan
        submit_plan(plan, store, profile=a.profile, overrides=parse_overrides(a.slurm_set))
        return 0
    t0 = time.time()
    from benchmark.experiments.config import load_scale
    jobs = a.jobs or int(load_scale(a.scale).get("runtime", {}).get("local_jobs", 1))
    if a.executor == "submitit-local":
        jobs = a.jobs or 1
    run_plan_local(plan, a.runs, device=a.device, jobs=jobs, nproc=a.nproc, executor=a.executor)
    df = load_runs(store.root)
    n_failed, filled, failures = failure_summary(plan, df)
    if n_failed and not filled:
        print(failures, file=sys.stderr)
        return 1
    before = _current_version(spec.name, a.scale)
    vdir = render(plan, store, runs=df, allow_dirty=a.allow_dirty)
    if store.root.resolve() == runs_root().resolve():
        from benchmark.reporting.leaderboard import write_readme
        from benchmark.common.paths import results_root
        write_readme(df, results_root(), store.root)
    what = "unchanged, " if vdir.name == before else ""
    print(f"finished in {time.time() - t0:.0f} s; table: {vdir.parent / 'table.md'} ({what}version {vdir.name})")
    if n_failed:
        print(failures, file=sys.stderr)
        return 1
    return 0


def _current_version(name: str, scale: str) -> str | None:
    from benchmark.reporting.render import read_version, table_dir_name
    from benchmark.common.paths import results_root
    v = read_version(results_root() / "tables" / table_dir_name(name, scale))
    return v.get("version") if v else None


def cmd_render(a) -> int:
    from benchmark.experiments.plan import plan_table
    from benchmark.reporting.render import render
    from benchmark.reporting.results import load_runs
    from benchmark.runs.store import RunStore
    from benchmark.experiments.tables import load_spec
    if a.all:
        from benchmark.reporting.leaderboard import render_all
        vdirs, readme = render_all(a.runs, allow_dirty=a.allow_dirty)
        for v in vdirs:
            print(f"{v.parent / 'table.md'} (version {v.name})")
        print(readme)
        return 0
    if not a.table:
        raise ConfigError("render: give --table NAME, or --all for every table and the leaderboards")
    store = RunStore(a.runs)
    df = load_runs(store.root)
    spec = load_spec(a.table)
    seeds, why = _table_seeds(a, spec, df)
    plan = plan_table(spec, scale=a.scale, seeds=seeds, overrides=_overrides(a, "reproduce"),
                      data=_user_data(a, "render", ("pretrain", "train", "val")))
    vdir = render(plan, store, runs=df, allow_dirty=a.allow_dirty)
    print(f"{vdir.parent / 'table.md'} (version {vdir.name}{'; ' + why if why else ''})")
    return 0


def cmd_runs(a) -> int:
    import pandas as pd

    from benchmark.reporting.results import load_runs
    from benchmark.runs.store import RunStore
    df = load_runs(a.runs)
    for col in ("stage", "status", "scale"):
        if getattr(a, col):
            df = df[df[col] == getattr(a, col)]
    if a.format == "csv":
        sys.stdout.write(df.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S"))
        return 0
    if a.format == "json":
        recs = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        sys.stdout.write(json.dumps(recs, indent=1, default=str) + "\n")
        return 0
    for _, r in df.iterrows():
        made = "unknown date    " if pd.isna(r["created"]) else f"{r['created']:%Y-%m-%d %H:%M}"
        print(f"{r['key']}  {r['status']:9s} {r['stage'] or '?':9s} {r['scale'] or '?':10s} {made}  {r['label']}")
    print(f"{len(df)} runs in {RunStore(a.runs).root} (date: when the run started, from its env.json)")
    return 0


def cmd_tables(a) -> int:
    from benchmark.experiments.tables import available_tables, load_spec
    from methods import list_methods
    for name in available_tables():
        s = load_spec(name)
        impl = sum(r.method == "scratch" or r.method in list_methods() for r in s.rows)
        print(f"{name:14s} {s.kind:5s} {len(s.rows):3d} rows ({impl} implemented)  {s.title}")
    print("methods:", ", ".join(list_methods()))
    return 0


def cmd_export(a) -> int:
    from benchmark.stages.export import export_run
    from benchmark.runs.store import RunStore
    report = export_run(RunStore(a.runs), a.run, a.to, a.out, allow_unmapped=a.allow_unmapped)
    print(json.dumps(report, indent=1))
    return 0


def cmd_data_check(a) -> int:
    from benchmark.data.user import check_dataset, parse_data_args
    data = parse_data_args(a.path)
    r = check_dataset(data, decode=not a.no_decode)
    bad = 0
    print(f"dataset: {data.get('kind')}")
    for name, e in r["splits"].items():
        print(f"{name}: {e['images']} images in {e['image_root']}" + (f" ({e['ann_file']})" if "ann_file" in e else ""))
        if "boxes" in e:
            b = e["boxes_per_image"]
            print(f"  boxes: {e['boxes']} ({b['mean']} per image, {b['min']}..{b['max']}); "
                  f"{e['images_without_boxes']} images without boxes; {e['crowd_regions']} crowd regions")
            if e["boxes_clipped"] or e["boxes_dropped"]:
                print(f"  {e['boxes_clipped']} boxes clipped to their image, {e['boxes_dropped']} empty boxes dropped")
            per = sorted(e["boxes_per_class"].items(), key=lambda kv: -kv[1])
            empty = [k for k, v in per if not v]
            print(f"  classes: {e['classes']}; most boxes: " + ", ".join(f"{k} {v}" for k, v in per[:8] if v)
                  + (f"; {len(empty)} without boxes" if empty else ""))
            sz = e["image_size"]
            print(f"  image size (w x h): min {sz['min'][0]}x{sz['min'][1]}, median {sz['median'][0]}x"
                  f"{sz['median'][1]}, max {sz['max'][0]}x{sz['max'][1]}")
        for what in ("missing_files", "unreadable_files"):
            for f in e[what]:
                print(f"  {what.split('_')[0]}: {f}")
            bad += len(e[what])
        if not e["missing_files"] and not e["unreadable_files"]:
            print("  every image file " + ("decodes" if not a.no_decode else "exists"))
    if a.json:
        print(json.dumps(r, indent=1))
    print("ok" if not bad else f"{bad} image file(s) missing or unreadable: a run skips unreadable images "
                               f"(recorded in the run) and stops above 1% of a split (DETBENCH_MAX_UNREADABLE)")
    return 0 if not bad else 1


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
    s.add_argument("--epochs", type=_number, default=None, help="paper epochs (scaled by the scale)")
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
    _data(s)
    _nproc(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("data", help="your own data: `detbench data check PATH` validates it before a long run")
    dsub = s.add_subparsers(dest="data_cmd", required=True)
    c = dsub.add_parser("check", help="validate a dataset and print its statistics (images, boxes per image, "
                                      "classes, sizes, unreadable files)")
    c.add_argument("path", nargs="+", help="as --data: split=ANN.json:IMAGES/ ..., or a dataset.yaml, VOC folder "
                                           "or COCO-layout folder")
    c.add_argument("--no-decode", action="store_true", help="check that image files exist, without decoding them")
    c.add_argument("--json", action="store_true", help="also print the statistics as JSON")
    c.set_defaults(fn=cmd_data_check)

    for name, arg in (("reproduce", "--table"), ("grid", "--grid")):
        s = sub.add_parser(name, help=f"plan and run every run a {arg[2:]} needs, then write it")
        s.add_argument(arg, dest=arg[2:], required=True)
        s.set_defaults(**{"table" if arg == "--grid" else "grid": None})
        s.add_argument("--seeds", type=int, default=None,
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
        _allow_dirty(s)
        _common(s)
        s.set_defaults(fn=cmd_reproduce)

    s = sub.add_parser("render", help="rebuild a table (or --all: every table and results/README.md's "
                                      "leaderboards) from the run store, no training")
    s.add_argument("--table", default=None)
    s.add_argument("--all", action="store_true", help="every table and grid at every scale in the store, "
                                                      "then the leaderboards in results/README.md")
    s.add_argument("--seeds", type=int, default=None, help="default: the seeds the table was built with")
    s.add_argument("--first-seed", type=int, default=0)
    _allow_dirty(s)
    _common(s)
    s.set_defaults(fn=cmd_render)

    s = sub.add_parser("runs", help="list the run store (--format csv|json: every column of load_runs())")
    s.add_argument("--runs", default=None)
    s.add_argument("--stage", default=None, choices=STAGES)
    s.add_argument("--status", default=None, choices=STATUSES)
    s.add_argument("--scale", default=None, help="only runs of this scale (tiny, tiny_long, ...)")
    s.add_argument("--format", default="table", choices=["table", "csv", "json"])
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("export", help="write a run's weights for detectron2, mmdet or torchvision")
    s.add_argument("--run", required=True, help="pretraining (weights.pt) or fine-tuning run key")
    s.add_argument("--to", required=True, choices=["detectron2", "mmdet", "torchvision"])
    s.add_argument("--out", default=None, help="file to write (default results/exports/<run>/<framework>.pkl|.pth)")
    s.add_argument("--allow-unmapped", action="store_true",
                   help="leave out keys the framework has no name for (listed in the output) instead of failing")
    s.add_argument("--runs", default=None)
    s.set_defaults(fn=cmd_export)

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
    from benchmark.engine.loop import Stopped
    try:
        return a.fn(a)
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


if __name__ == "__main__":
    sys.exit(main())
