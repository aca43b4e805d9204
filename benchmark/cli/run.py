"""One run at a time: `detbench pretrain`, `finetune`, `evaluate` (each resumable; a finished
run is returned from the store)."""
from __future__ import annotations

import argparse
import json

from benchmark.cli.args import common, data_arg, nproc_arg, number, overrides, run_key_arg, user_data
from benchmark.runs.identity import run_key
from benchmark.runs.store import RunStore
from methods.config import ConfigError


def run_one(job, args) -> dict:
    """One stage in this process, or in ``--nproc`` processes (as torchrun would start them)."""
    from benchmark.runner import run_job
    from slurm.local import run_processes
    if args.nproc > 1:
        status, err = run_processes(job, str(RunStore(args.runs).root), nproc=args.nproc, device=args.device)
        if status != "done":
            raise RuntimeError(f"{job.label}: {status}: {err} (see {RunStore(args.runs).run_dir(job.key)})")
        return RunStore(args.runs).metrics(job.key)
    return run_job(job, args.runs, resume=not getattr(args, "no_resume", False), device=args.device)


def check_data(configs) -> None:
    """The data of the runs about to start, checked before any starts (each dataset once):
    bad annotation files, missing or mis-sized images (``benchmark.data.user.preflight``)."""
    import json as _json

    from benchmark.data.user import preflight
    seen = set()
    for cfg in configs:
        data = cfg.get("data") or {}
        blob = _json.dumps(data, sort_keys=True, default=str)
        if blob not in seen:
            seen.add(blob)
            preflight(data)


def cmd_pretrain(args) -> int:
    from benchmark.experiments.config import check_inputs, pretrain_config
    from benchmark.runs.job import Job
    sets = overrides(args, "pretrain")
    data = user_data(args, "pretrain", ("pretrain",))
    check_inputs(args.scale, (args.method,), user_data=data is not None)
    cfg = pretrain_config(args.method, scale=args.scale, seed=args.seed, epochs=args.epochs,
                          method_overrides=sets.get("method"), recipe_overrides=sets.get("recipe"),
                          data=data)
    key = run_key(cfg)
    job = Job("pretrain", key, {**cfg, "label": f"pretrain/{args.method}/seed{args.seed}"}, (),
              f"pretrain/{args.method}")
    if RunStore(args.runs).status(key) != "done":
        check_data([cfg])
    m = run_one(job, args)
    print(json.dumps({"key": key, "run_dir": str(RunStore(args.runs).run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_finetune(args) -> int:
    from benchmark.experiments.config import check_inputs, finetune_config
    from benchmark.runs.job import Job
    sets = overrides(args, "finetune")
    store = RunStore(args.runs)
    parent = None if args.from_run == "scratch" else run_key_arg(args.from_run, "--from")
    method = None
    if parent:
        parent_cfg = store.config(parent)
        if parent_cfg is None or store.status(parent) != "done":
            raise ConfigError(f"--from: pretraining run {parent!r} is not finished in {store.root}")
        method = parent_cfg["method"]["name"]
    data = user_data(args, "finetune", ("train", "val"))
    check_inputs(args.scale, user_data=data is not None)
    cfg = finetune_config(scale=args.scale, seed=args.seed, schedule=args.schedule, parent=parent, method=method,
                          detector=args.detector, detector_overrides=sets.get("detector"),
                          recipe_overrides=sets.get("finetune"), data=data)
    key = run_key(cfg)
    label = f"finetune/{args.from_run}/{args.schedule}"
    job = Job("finetune", key, {**cfg, "label": label}, (parent,) if parent else (), label)
    if store.status(key) != "done":
        check_data([cfg])
    m = run_one(job, args)
    print(json.dumps({"key": key, "run_dir": str(store.run_dir(key)), **m}, indent=1, default=str))
    return 0


def cmd_evaluate(args) -> int:
    from benchmark.experiments.config import evaluate_config
    from benchmark.runs.job import Job
    store = RunStore(args.runs)
    parent_cfg = store.config(run_key_arg(args.from_run, "--from"))
    if parent_cfg is None or store.status(args.from_run) != "done" or parent_cfg.get("stage") != "finetune":
        raise ConfigError(f"--from: {args.from_run!r} is not a finished fine-tuning run in {store.root}")
    from benchmark.data.user import with_identity
    # the fine-tuning run's validation data (its content now: a fixed file is a new evaluation),
    # or another dataset given with --data
    data = user_data(args, "evaluate", ("val",)) or parent_cfg["data"]
    protocol = "voc" if data.get("kind") == "voc" else parent_cfg.get("protocol", "coco")   # VOC: stages/voc_eval.py
    cfg = evaluate_config(parent=args.from_run, data=with_identity(data), scale=parent_cfg["scale"], protocol=protocol)
    key = run_key(cfg)
    label = f"evaluate/{args.from_run}"
    if store.status(key) != "done":
        check_data([cfg])
    m = run_one(Job("evaluate", key, {**cfg, "label": label}, (args.from_run,), label), args)
    print(json.dumps({"key": key, **m}, indent=1, default=str))
    return 0


def _single_run(sub, name: str, help_: str, fn) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_)
    s.set_defaults(fn=fn)
    return s


def add_parsers(sub) -> None:
    s = _single_run(sub, "pretrain", "pretrain one method (resumable)", cmd_pretrain)
    s.add_argument("--method", required=True)
    s.add_argument("--epochs", type=number, default=None, help="paper epochs (scaled by the scale)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true")
    common(s)

    s = _single_run(sub, "finetune", "fine-tune a detector from a pretraining run (or scratch)", cmd_finetune)
    s.add_argument("--from", dest="from_run", required=True, help="pretraining run key, or 'scratch'")
    s.add_argument("--schedule", default="1x")
    s.add_argument("--detector", default="mask_rcnn", help="a registered detector (benchmark/detectors/)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true")
    common(s)

    s = _single_run(sub, "evaluate", "COCO evaluation of a fine-tuning run", cmd_evaluate)
    s.add_argument("--from", dest="from_run", required=True, help="fine-tuning run key")
    s.add_argument("--runs", default=None)
    s.add_argument("--device", default=None)
    data_arg(s)
    nproc_arg(s)
