"""Faults injected by hand: concurrent commands, kills mid-write, truncated files,
interrupts, unwritable folders, bad scale files, stale parents; and nothing silent."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from benchmark.engine.checkpoint import previous_checkpoint
from benchmark.engine.loop import JsonlLogger, LoopConfig, ResumeError, Stopped, TrainLoop
from benchmark.cli import main
from benchmark.cli.commands import build_parser
from benchmark.experiments.config import pretrain_config
from benchmark.runs.job import Job
from benchmark.experiments.plan import plan_table
from benchmark.runner import run_job
from benchmark.runs.store import RunStore, StoreError
from benchmark.runs.identity import run_key


def _micro_pretrain():
    cfg = pretrain_config("moco_v2", scale="micro")
    return Job("pretrain", run_key(cfg), {**cfg, "label": "micro/moco"})


def _loop(tmp_path, total=10):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainLoop(model, opt, lambda s: 0.1, LoopConfig(total_steps=total, ckpt_every=2, log_every=1),
                       tmp_path)


def _step(loop):
    return lambda b: {"loss": loop.model(torch.ones(1, 2)).sum()}


# ------------------------------------------------------------------ config errors leave nothing
@pytest.mark.parametrize("args, msg", [
    (["pretrain", "--method", "moco_v2", "--set", "recipe.epochs=-5"], "recipe.epochs: expected > 0"),
    (["pretrain", "--method", "moco_v2", "--set", "recipe.base_lr=abc"], "recipe.base_lr: expected a number"),
    (["pretrain", "--method", "moco_v2", "--set", "method.queue_size=-3"], "method.queue_size: expected > 0"),
    (["finetune", "--from", "scratch", "--set", "finetune.steps=-1"], "finetune.steps: expected > 0"),
    (["finetune", "--from", "scratch", "--set", "detector.trainable_layers=9"], "detector.trainable_layers"),
])
def test_a_config_error_is_one_line_and_leaves_no_run(isolated, capsys, args, msg):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    runs = isolated / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_unnamed_errors_show_their_traceback(isolated, monkeypatch):
    import benchmark.cli.store as cli

    def boom(a):
        raise KeyError("a bug, not a user error")
    monkeypatch.setattr(cli, "cmd_runs", boom)
    with pytest.raises(KeyError, match="a bug"):
        main(["runs"])


# ------------------------------------------------------------------ README commands reuse table runs
def test_readme_epochs_command_reuses_the_tables_run():
    a = build_parser().parse_args(["pretrain", "--method", "moco_v2", "--epochs", "200"])
    assert a.epochs == 200 and isinstance(a.epochs, int)
    assert build_parser().parse_args(["pretrain", "--method", "moco_v2", "--epochs", "0.5"]).epochs == 0.5
    key = run_key(pretrain_config("moco_v2", scale="tiny", seed=0, epochs=a.epochs))
    plan = plan_table("soco_table1", scale="tiny")
    assert key in {j.key for j in plan.jobs if j.stage == "pretrain"}


# ------------------------------------------------------------------ one run, one process
def test_a_second_identical_command_waits_for_the_first_and_reuses_its_result(isolated, capsys):
    job = _micro_pretrain()
    store = RunStore()
    held, release = threading.Event(), threading.Event()

    def first():   # holds the run's lock and finishes it meanwhile
        with store.lock(job.key):
            held.set()
            release.wait(10)
            store.begin(job.key, job.config)
            store.finish(job.key, {"steps": 4, "total_steps": 4, "by": "first"})
    t = threading.Thread(target=first)
    t.start()
    held.wait(10)
    with pytest.raises(StoreError, match=rf"run {job.key} is being computed by pid {os.getpid()}"):
        with store.lock(job.key, wait=False):
            pass
    threading.Timer(0.5, release.set).start()
    m = run_job(job, progress=False)          # waits, then finds the run done: no second computation
    t.join()
    assert m["by"] == "first"
    assert f"run {job.key} is being computed by pid" in capsys.readouterr().err


def test_stale_temporaries_are_removed_when_a_run_starts_and_ends(isolated):
    job = _micro_pretrain()
    d = RunStore().run_dir(job.key)
    d.mkdir(parents=True)
    (d / ".checkpoint.pt.tmp999999").write_bytes(b"x" * 1000)      # a kill -9 during a checkpoint write
    (d / ".log.jsonl.tmp42").write_text("{")
    run_job(job, progress=False, stop_after=1)
    assert not list(d.glob(".*.tmp*"))


# ------------------------------------------------------------------ checkpoints and logs
class _Planted:
    """A pickle that runs code when it is loaded (here: makes a folder)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path):
    loop = _loop(tmp_path)
    loop.run(iter([None] * 10), _step(loop), None, stop_after=2, progress=False)
    marker = tmp_path / "planted-code-ran"
    for ck in (tmp_path / "checkpoint.pt", previous_checkpoint(tmp_path / "checkpoint.pt")):
        torch.save({"step": 1, "x": _Planted(marker)}, ck)
    with pytest.raises(ResumeError, match="cannot resume"):
        _loop(tmp_path).try_resume()
    assert not marker.exists()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    loop = _loop(tmp_path)
    loop.run(iter([None] * 10), _step(loop), None, stop_after=5, progress=False)
    # saved at 2, 4 and the stop at 5: checkpoint.pt is step 5, checkpoint.prev.pt step 4
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    again = _loop(tmp_path)
    assert again.try_resume() == 4
    assert "resumed from" in capsys.readouterr().err and again.resumed_from.name == "checkpoint.prev.pt"
    previous_checkpoint(ck).write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="checkpoint.prev.pt.*--no-resume"):
        _loop(tmp_path).try_resume()


def test_a_torn_last_log_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    JsonlLogger(log, resume_step=2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ResumeError, match=r"log.jsonl: line 2 is not JSON.*--no-resume"):
        JsonlLogger(log, resume_step=2)


def test_sigint_saves_at_the_end_of_the_step_and_the_same_command_resumes(tmp_path, capsys):
    loop = _loop(tmp_path, total=10)
    logger = JsonlLogger(tmp_path / "log.jsonl")
    before = signal.getsignal(signal.SIGINT)     # SIG_IGN when started in the background (nohup, CI)

    def step(b):
        if loop.step == 3:
            os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C during step 4
        return {"loss": loop.model(torch.ones(1, 2)).sum()}
    with pytest.raises(Stopped):
        loop.run(iter([None] * 10), step, logger, progress=False)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped at step 4; the same command resumes"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before        # handlers restored
    again = _loop(tmp_path, total=10)
    start = again.try_resume()
    assert start == 4 and "resumed from" in capsys.readouterr().err
    again.run(iter([None] * 6), _step(again), JsonlLogger(tmp_path / "log.jsonl", resume_step=start),
              progress=False)
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step": 4, "event": "resumed", "from": "checkpoint.pt"} in recs and recs[-1]["step"] == 10


def test_ctrl_c_through_the_cli_is_one_line_and_no_failed_run(isolated, capsys, monkeypatch):
    real = TrainLoop.run

    def interrupted(self, batches, step_fn, *a, **k):
        def step(b):
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return step_fn(b)
        return real(self, batches, step, *a, **k)
    monkeypatch.setattr(TrainLoop, "run", interrupted)
    cmd = ["pretrain", "--method", "moco_v2", "--scale", "micro", "--epochs", "300"]   # 6 steps
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert "stopped at step 2; the same command resumes" in err and "Traceback" not in err
    key = run_key(pretrain_config("moco_v2", scale="micro", epochs=300))
    assert RunStore().status(key) == "interrupted"   # no process holds it any more
    monkeypatch.setattr(TrainLoop, "run", real)
    assert main(cmd) == 0
    assert "at step 2" in capsys.readouterr().err


# ------------------------------------------------------------------ parents' weights
def test_truncated_or_missing_parent_weights_are_recomputed_before_use(isolated, capsys):
    plan = plan_table("soco_table1", scale="micro")
    pre = next(j for j in plan.jobs if j.stage == "pretrain" and "MoCo" in j.label)
    ft = next(j for j in plan.jobs if j.stage == "finetune" and j.parents == (pre.key,))
    store = RunStore()
    run_job(pre, progress=False)
    sha = store.metrics(pre.key)["weights_sha256"]
    w = store.run_dir(pre.key) / "weights.pt"
    w.write_bytes(w.read_bytes()[:1000])                        # truncated: still "done"
    run_job(ft, progress=False)
    err = capsys.readouterr().err
    assert f"parent run {pre.key}" in err and "does not match its recorded weights_sha256" in err
    assert store.metrics(pre.key)["weights_sha256"] == sha      # recomputed: the same weights
    assert json.loads((store.run_dir(pre.key) / "metrics.invalid.json").read_text())["invalidated"]
    # a run from git keeps no weights: said, and recomputed
    w.unlink()
    ft2 = next(j for j in plan.jobs if j.stage == "finetune" and j.parents == (pre.key,) and j.key != ft.key)
    run_job(ft2, progress=False, stop_after=1)
    assert "a run from git keeps its metrics, not its weights" in capsys.readouterr().err and w.exists()


# ------------------------------------------------------------------ caches and folders
def test_a_corrupt_proposal_cache_is_recomputed(tmp_path):
    pytest.importorskip("cv2.ximgproc")
    from tools.bench.proposals_bench import make_images
    from benchmark.data.proposal_cache import compute_proposals
    paths = make_images(tmp_path / "img", 3, 64)
    first = compute_proposals(paths, tmp_path / "cache", num_workers=1, progress=False)
    first.path.write_bytes(first.path.read_bytes()[:50])
    again = compute_proposals(paths, tmp_path / "cache", num_workers=1, progress=False)
    assert again.path == first.path and len(again) == 3
    assert again.meta["params"]["max_side"] == 500


def test_a_complete_read_only_cache_is_read_without_its_lock(isolated, monkeypatch):
    from benchmark.data.synthetic import ensure_synthetic_dataset
    params = {k: v for k, v in __import__("conftest").MICRO_DATA.items() if k != "kind"}
    done = ensure_synthetic_dataset(isolated / "c", **params)
    import benchmark.common.fs as fs

    def no_lock(*a, **k):
        raise fs.UnwritableError("read-only")
    monkeypatch.setattr(fs, "file_lock", no_lock)
    assert ensure_synthetic_dataset(isolated / "c", **params) == done


def test_unwritable_store_and_results_are_named(isolated, monkeypatch, capsys):
    import benchmark.reporting.render as report
    import benchmark.runs.store as store
    monkeypatch.setattr(store, "unwritable", lambda p: "permission denied")
    assert main(["pretrain", "--method", "moco_v2", "--scale", "micro"]) == 2
    err = capsys.readouterr().err
    assert f"run store {isolated / 'runs'} is not writable (permission denied)" in err and "DETBENCH_RUNS" in err
    monkeypatch.undo()
    monkeypatch.setattr(report, "unwritable", lambda p, **kw: "permission denied")
    monkeypatch.setenv("DETBENCH_RUNS", str(isolated / "runs"))
    assert main(["render", "--table", "soco_table1"]) == 2
    assert "results folder" in capsys.readouterr().err


def test_unwritable_cache_lock_names_the_folder(tmp_path, monkeypatch):
    import benchmark.common.fs as fs
    monkeypatch.setattr(fs, "unwritable", lambda p: "permission denied")
    with pytest.raises(fs.UnwritableError, match=f"cache {tmp_path} is not writable.*DETBENCH_CACHE"):
        with fs.file_lock(tmp_path / "x.lock"):
            pass


def test_tables_are_written_atomically(isolated, monkeypatch):
    import benchmark.common.fs as fs
    import benchmark.reporting.render as report
    written = []
    real = fs.atomic_open

    def spy(path, mode="wb"):
        written.append(os.path.basename(path))
        return real(path, mode)
    monkeypatch.setattr(fs, "atomic_open", spy)
    vdir = report.render(plan_table("soco_table4", scale="tiny"), RunStore())
    made = [p.name for d in (vdir, vdir.parent) for p in d.iterdir() if p.is_file()]
    assert made and sorted(written) == sorted(made)   # every file of the table, each written whole


# ------------------------------------------------------------------ scale files
@pytest.mark.parametrize("text, msg", [
    ("name: bad\nruntime: {ckpt_every: two}\n", "runtime.ckpt_every: expected an integer, got 'two'"),
    ("name: bad\nruntime: {ckpt_every: 0}\n", "runtime.ckpt_every: expected >= 1"),
    ("name: bad\nruntime: {ckpt_evry: 3}\n", "runtime.ckpt_evry: unknown key"),
    ("name: bad\ndetectors: {mask_rcnn: {finetune: {1x: {steps: many}}}}\n", "recipe.steps: expected an integer"),
    ("name: bad\ndetectors: {mask_rcnn: {model: {fpn_chanels: 3}}}\n", "fpn_chanels: unknown key"),
    ("name: bad\npretrain: {steps_per_epoch: x}\n", "pretrain.steps_per_epoch: expected a number"),
    ("name: bad\ndata: {kind: synthetic\n", "invalid YAML"),
])
def test_a_bad_scale_file_is_an_error_naming_file_and_field(tmp_path, monkeypatch, text, msg):
    import benchmark.experiments.config as config
    from methods.config import ConfigError
    (tmp_path / "bad.yaml").write_text(text)
    monkeypatch.setattr(config, "SCALES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=str(tmp_path / "bad.yaml")) as e:
        config.load_scale("bad")
    assert msg in str(e.value)


# ------------------------------------------------------------------ a plan's inputs, up front
def test_every_missing_variable_and_path_is_listed_before_any_run(isolated, monkeypatch, capsys):
    for v in ("COCO_ROOT", "SUPERVISED_WEIGHTS", "IMAGENET_ROOT"):
        monkeypatch.delenv(v, raising=False)
    assert main(["reproduce", "--table", "soco_table1", "--scale", "small"]) == 2
    err = capsys.readouterr().err
    assert "environment variable COCO_ROOT is not set" in err and "environment variable SUPERVISED_WEIGHTS" in err
    monkeypatch.setenv("SUPERVISED_WEIGHTS", str(isolated / "nope.pth"))
    monkeypatch.setenv("COCO_ROOT", str(isolated))
    assert main(["reproduce", "--table", "soco_table1", "--scale", "small"]) == 2
    err = capsys.readouterr().err
    assert f"{isolated / 'nope.pth'} does not exist" in err and f"{isolated / 'train2017'} does not exist" in err


def test_a_parent_a_sibling_is_recomputing_is_waited_for_not_failed(isolated):
    """Two fine-tunings of one pretraining whose weights are missing start at once: the first
    invalidates and recomputes the parent; the second finds it unfinished ("running", or
    "interrupted" between the sibling's moves, when no lock is held) and must
    wait for it (or finish it) under its lock, not fail with ParentNotDone (seen on a GPU
    machine with --jobs 8)."""
    plan = plan_table("soco_table1", scale="micro")
    pre = next(j for j in plan.jobs if j.stage == "pretrain" and "MoCo" in j.label)
    ft = next(j for j in plan.jobs if j.stage == "finetune" and j.parents == (pre.key,))
    store = RunStore()
    run_job(pre, progress=False)
    (store.run_dir(pre.key) / "weights.pt").unlink()
    store.invalidate(pre.key, "weights missing")                 # the sibling's first move
    assert store.status(pre.key) == "interrupted"
    run_job(ft, progress=False, stop_after=1)
    assert store.status(pre.key) == "done" and (store.run_dir(pre.key) / "weights.pt").exists()
