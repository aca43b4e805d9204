"""Nothing silent, part II: symlinked data, a cache fooled by a restored mtime, a killed run
that still read "running", names and keys that walked out of their folders, table versions
half written or written twice, tables with no value, and failures found only at the end."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmark.cli import main
from benchmark.experiments.plan import plan_table
from benchmark.runs.store import RunStore
from tests.test_data_images import _save
from tests.test_data_voc import _devkit, _obj, _xml
from tests.test_results import _fill

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2


def _one_line(err: str, *words: str) -> None:
    """``err`` is one line (progress bars aside) holding ``words``."""
    err = "\n".join(l for l in err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


# ------------------------------------------------------------------ symlinks are followed
@pytest.fixture
def linked_images(tmp_path) -> Path:
    """imgs/ holding one image, a link to a folder of two more, a second link to that folder
    and a link back to imgs/ itself (a cycle): three images."""
    _save(tmp_path / "real" / "x.png", 0)
    _save(tmp_path / "real" / "y.png", 1)
    _save(tmp_path / "imgs" / "z.png", 2)
    (tmp_path / "imgs" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "imgs" / "linked_again").symlink_to(tmp_path / "real")
    (tmp_path / "imgs" / "loop").symlink_to(tmp_path / "imgs")
    return tmp_path / "imgs"


def test_images_under_a_symlinked_subfolder_are_read_once_and_a_link_cycle_ends(linked_images):
    from benchmark.data.images import ImageSource
    from benchmark.data.user import _folder_images
    names = [os.path.relpath(p, linked_images) for p in ImageSource.from_folder(linked_images).paths]
    assert names == ["linked/x.png", "linked/y.png", "z.png"]
    assert [os.path.relpath(p, linked_images) for p in _folder_images(linked_images)] == names


def test_an_edited_xml_in_a_symlinked_annotations_folder_changes_the_identity(tmp_path):
    import benchmark.data.user as user
    devkit = _devkit(tmp_path / "devkit", {"a": _xml(_obj()), "b": _xml(_obj("dog"))}, {"trainval": ["a"],
                                                                                       "test": ["b"]})
    ann = devkit / "VOC2007" / "Annotations"
    ann.rename(tmp_path / "shared_annotations")
    ann.symlink_to(tmp_path / "shared_annotations")
    data = {"kind": "voc", "root": str(devkit)}
    before = user.data_identity(data)
    (ann / "a.xml").write_text(_xml(_obj(box=(2, 2, 12, 12))))
    user._MEMO.clear()   # a new command
    assert user.data_identity(data)["annotations"] != before["annotations"]


def test_data_check_counts_the_images_of_every_split_beside_a_voc_folder(tmp_path, linked_images, isolated, capsys):
    devkit = _devkit(tmp_path / "devkit", {"a": _xml(_obj()), "b": _xml(_obj("dog"))}, {"trainval": ["a"],
                                                                                       "test": ["b"]})
    assert main(["data", "check", str(devkit / "VOC2007"), f"pretrain={linked_images}"]) == 0
    out = capsys.readouterr().out
    assert f"pretrain: 3 images in {linked_images}" in out
    assert "train: 1 images" in out and "val: 1 images" in out


# ------------------------------------------------------------------ annotation hashes
def test_a_same_size_edit_with_its_old_mtime_restored_is_hashed_again(isolated):
    import benchmark.data.user as user
    f = isolated / "ann.json"
    f.write_text('{"a": 1}')
    assert user.file_sha256(f) == hashlib.sha256(b'{"a": 1}').hexdigest()
    st = f.stat()
    time.sleep(0.05)   # past the file system's timestamp tick
    with open(f, "r+") as fh:   # in place: same inode, same size
        fh.write('{"a": 2}')
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_mtime_ns, f.stat().st_size) == (st.st_mtime_ns, st.st_size)
    new = hashlib.sha256(b'{"a": 2}').hexdigest()
    assert user.file_sha256(f) == new            # not this process's memory of it
    user._MEMO.clear()
    assert user.file_sha256(f) == new            # nor the dataset cache's


# ------------------------------------------------------------------ a killed writer
def test_a_run_whose_writer_was_killed_reads_interrupted(isolated, capsys):
    key = "0123456789abcdef"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom benchmark.runs.store import RunStore\n"
                               f"s = RunStore({str(isolated / 'runs')!r})\n"
                               f"with s.lock({key!r}):\n"
                               f"    s.begin({key!r}, {{'stage': 'pretrain', 'label': 'x/y'}})\n"
                               "    print('ready', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert RunStore().status(key) == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunStore().status(key) == "interrupted"
    assert main(["runs", "--status", "interrupted"]) == 0
    assert f"{key}  interrupted" in capsys.readouterr().out


# ------------------------------------------------------------------ names and keys stay in their folders
def test_a_spec_named_outside_the_tables_folder_is_refused(isolated, capsys):
    from benchmark.experiments.tables import SPECS
    p = isolated / "escape.yaml"
    p.write_text((SPECS / "soco_table1.yaml").read_text().replace("name: soco_table1", "name: ../../escape"))
    assert main(["render", "--table", str(p), "--scale", "micro"]) == 2
    _one_line(capsys.readouterr().err, str(p), "name", "'../../escape'")
    assert not (isolated / "escape@micro").exists()   # results/tables/../../escape@micro


@pytest.mark.parametrize("args", [
    ["reproduce", "--table", "../tables/soco_table1", "--dry-run"],
    ["render", "--table", "../tables/soco_table1"],
    ["reproduce", "--table", "soco_table1", "--scale", "../scales/micro", "--dry-run"],
    ["status", "../../etc/passwd"],
    ["collect", "../x"],
])
def test_a_table_or_scale_name_that_is_a_path_is_refused(isolated, capsys, args):
    assert main(args) == 2
    _one_line(capsys.readouterr().err, "is not a name", "no path separators")


@pytest.mark.parametrize("args", [
    ["finetune", "--from", "../other/0123456789abcdef", "--scale", "micro"],
    ["evaluate", "--from", "../other/fedcba9876543210"],
    ["export", "--run", "../other/0123456789abcdef", "--to", "torchvision"],
])
def test_a_run_key_that_is_a_path_is_refused(isolated, capsys, monkeypatch, args):
    import benchmark.cli.run as cli_run
    from tests.conftest import MICRO_DATA
    other = RunStore(isolated / "other")   # finished runs of another store, beside this one: ../other/<key>
    cfg = {"method": {"name": "moco_v2"}, "scale": "micro", "seed": 0, "data": MICRO_DATA}
    for key, stage in (("0123456789abcdef", "pretrain"), ("fedcba9876543210", "finetune")):
        other.begin(key, {**cfg, "stage": stage})
        other.finish(key, {})
    ran = []
    monkeypatch.setattr(cli_run, "run_one", lambda job, a: ran.append(job) or {})
    assert main(args) == 2
    _one_line(capsys.readouterr().err, "not a run key", "16 hex digits")
    assert ran == []


# ------------------------------------------------------------------ table versions: whole, once
def _tables(root: Path, plan) -> Path:
    from benchmark.reporting.render import table_dir_name
    return root / table_dir_name(plan.spec.name, plan.scale)


@pytest.mark.parametrize("fail_at", [2, 7])   # in the version folder's files; in the top-level ones
def test_a_failed_results_write_leaves_no_partial_version_and_one_versions_top_files(isolated, monkeypatch, fail_at):
    import benchmark.common.fs as fs
    from benchmark.reporting.render import render
    store = RunStore(isolated / "runs")
    out = isolated / "tables"
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    _fill(store, plan, lambda row, seed: 1.0)
    v1 = render(plan, store, out_root=out)
    plan2 = plan_table("soco_table1", scale="micro", seeds=(0, 1))
    _fill(store, plan2, lambda row, seed: 1.0 + seed)
    real, calls = fs.atomic_open, []

    def disk_full(path, mode="wb"):
        calls.append(path)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device", str(path))
        return real(path, mode)
    monkeypatch.setattr(fs, "atomic_open", disk_full)
    with pytest.raises(OSError, match="No space left"):
        render(plan2, store, out_root=out)
    monkeypatch.undo()
    tdir = _tables(out, plan)
    assert sorted(p.name for p in tdir.iterdir() if p.is_dir()) == [v1.name]     # nothing staged is left
    for name in ("table.csv", "plot.png", "version.json"):
        assert (tdir / name).read_bytes() == (v1 / name).read_bytes(), name
    assert f"[`{v1.name}`]({v1.name}/table.md)" in (tdir / "table.md").read_text()
    v2 = render(plan2, store, out_root=out)
    assert sorted(p.name for p in tdir.iterdir() if p.is_dir()) == sorted([v1.name, v2.name])
    assert v2.name == f"{v1.name}.2" and json.loads((tdir / "version.json").read_text())["version"] == v2.name
    assert sorted(p.name for p in v2.iterdir()) == ["cells.json", "plot.png", "table.csv", "table.md", "version.json"]


def test_two_renders_at_once_write_one_version(isolated, monkeypatch):
    import benchmark.reporting.render as R
    store = RunStore(isolated / "runs")
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    _fill(store, plan, lambda row, seed: 1.0)
    real = R.git_info
    monkeypatch.setattr(R, "git_info", lambda *a: time.sleep(0.5) or real(*a))   # a slow step between
    start, got, errors = threading.Barrier(2), [], []                            # compare and write

    def one():
        start.wait()
        try:
            got.append(R.render(plan, store, out_root=isolated / "tables"))
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == 2 and got[0] == got[1]
    assert [p.name for p in _tables(isolated / "tables", plan).iterdir() if p.is_dir()] == [got[0].name]


# ------------------------------------------------------------------ reproduce: said at once, said plainly
def test_a_table_whose_runs_all_diverged_is_not_written_and_exits_non_zero(isolated, capsys, monkeypatch):
    import slurm.local as local

    def all_diverge(plan, store_root=None, **kw):
        s = RunStore(store_root)
        for j in plan.jobs:
            if not j.parents:
                s.begin(j.key, j.config)
                s.fail(j.key, "diverged: loss is nan at step 3", diverged=True)
        return {}
    monkeypatch.setattr(local, "run_plan_local", all_diverge)
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro"]) == 1
    _one_line(capsys.readouterr().err, "soco_table1: no cell has a value", "diverged", "the table was not written")
    assert not (isolated / "results" / "tables" / "soco_table1@micro").exists()


def test_an_unwritable_results_folder_is_named_before_any_run(isolated, capsys, monkeypatch):
    import benchmark.reporting.render as R
    import slurm.local as local
    ran = []
    monkeypatch.setattr(local, "run_plan_local", lambda plan, *a, **k: ran.append(plan) or {})
    monkeypatch.setattr(R, "unwritable", lambda p, **kw: "permission denied")
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro"]) == 2
    _one_line(capsys.readouterr().err, "results folder", "soco_table1@micro", "permission denied", "DETBENCH_RESULTS")
    assert ran == []


def test_exporting_damaged_weights_is_one_line_naming_the_file(isolated, capsys):
    from benchmark.common.fs import sha256_file
    key = "0123456789abcdef"
    store = RunStore()
    d = store.begin(key, {"stage": "pretrain", "method": {"name": "moco_v2"}, "seed": 0})
    torch.save({"state_dict": {"conv1.weight": torch.ones(4, 3, 7, 7)}}, d / "weights.pt")
    store.finish(key, {"weights_sha256": sha256_file(d / "weights.pt")})
    data = (d / "weights.pt").read_bytes()
    (d / "weights.pt").write_bytes(data[: len(data) // 2])    # truncated
    assert main(["export", "--run", key, "--to", "torchvision"]) == 2
    _one_line(capsys.readouterr().err, str(d / "weights.pt"), "weights_sha256", "not exported")


def test_a_number_in_exponent_form_is_a_number_in_set_and_in_yaml_files():
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: ``--set recipe.base_lr=3e-4`` was refused
    as "not a number"; now it is 0.0003 on the command line and in a config file."""
    from benchmark.experiments.config import parse_overrides
    from methods.base import PretrainRecipe
    from methods.config import ConfigError, coerce
    assert parse_overrides(["recipe.base_lr=3e-4", "method.name=1e5x"]) == {"recipe": {"base_lr": 3e-4},
                                                                           "method": {"name": "1e5x"}}
    assert coerce("1E-5", float, "recipe.base_lr") == 1e-5
    assert PretrainRecipe.from_dict({**PretrainRecipe().to_dict(), "base_lr": "2e-4"}).base_lr == 2e-4
    with pytest.raises(ConfigError, match="recipe.base_lr: expected a number, got 'fast'"):
        coerce("fast", float, "recipe.base_lr")


def test_a_diverged_run_is_a_result_and_is_not_run_again(isolated, capsys, monkeypatch):
    import slurm.local as local
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    s = RunStore()
    roots = [j for j in plan.jobs if not j.parents]
    for j in roots:
        s.begin(j.key, j.config)
        s.fail(j.key, "diverged: loss is nan at step 3", diverged=True)

    def no_run(*a, **kw):
        raise AssertionError("a diverged run (or a child of one) was run again")
    monkeypatch.setattr(local, "run_job", no_run)
    status = local.run_plan_local(plan, jobs=1)
    assert {status[j.key] for j in roots} == {"diverged"}
    assert {status[j.key] for j in plan.jobs if j.parents} == {"skipped"}
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro", "--seeds", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{len(plan.jobs)} runs, 0 to run" in out and f"{len(roots)} stored run(s) diverged" in out


# ------------------------------------------------------------------ Ctrl-C: at the end of this step, one line
def test_ctrl_c_stops_at_the_end_of_the_current_step_not_the_next_logging_step(tmp_path, capsys):
    from benchmark.engine.loop import JsonlLogger, LoopConfig, Stopped, TrainLoop
    model = torch.nn.Linear(2, 1)
    loop = TrainLoop(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 0.1,
                     LoopConfig(total_steps=200, ckpt_every=100, log_every=50), tmp_path)

    def step(b):
        if loop.step == 3:
            os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C during step 4 (logging every 50)
        return {"loss": model(torch.ones(1, 2)).sum()}
    with pytest.raises(Stopped):
        loop.run(iter([None] * 200), step, JsonlLogger(tmp_path / "log.jsonl"), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped at step 4; the same command resumes"


def test_a_ctrl_c_during_a_checkpoint_write_is_delivered_once_the_file_is_whole(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside torch.save surfaced as the zip writer's RuntimeError (a
    traceback per spawned run); now the write finishes, then the Ctrl-C is delivered: outside
    a loop as KeyboardInterrupt, inside one as the loop's stop request."""
    from benchmark.engine.checkpoint import save_checkpoint
    from benchmark.engine.signals import REQUESTS
    real = torch.save

    def slow_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)                 # a plain handler would have raised by now
        real(obj, f)
    monkeypatch.setattr(torch, "save", slow_save)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)   # CI's background pytest ignores SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(3)}, keep_previous=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with REQUESTS.handlers():
            save_checkpoint(tmp_path / "b.pt", {"w": torch.ones(4)})
            assert REQUESTS.stop == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, old)
    assert torch.load(tmp_path / "a.pt")["w"].sum() == 3 and torch.load(tmp_path / "b.pt")["w"].sum() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]      # no temporary left


@pytest.mark.slow
def test_ctrl_c_with_two_runs_at_once_is_one_line_and_both_resume(isolated):
    """A terminal's Ctrl-C reaches the whole process group: the parent and every spawned run
    (checkpoints are written every 2 steps at micro, so one may be mid-write). One line, no
    traceback; both runs saved a checkpoint and read interrupted. The runs are made long
    (epochs=4000) so that both are still training when the Ctrl-C comes; SIGINT is restored in
    the child, as CI starts its jobs in the background, where it is ignored."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "reproduce", "--table", "soco_table1",
                          "--scale", "micro", "--jobs", "2", "--set", "recipe.epochs=4000"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs, t0 = isolated / "runs", time.time()
    while len(list(runs.glob("*/log.jsonl"))) < 2 and time.time() - t0 < 240:   # both runs are training
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 130
    _one_line(err, "detbench: interrupted", "the same command resumes")
    store = RunStore(runs)
    made = [d for d in runs.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert [store.status(d.name) for d in made] == ["interrupted"] * 2
    assert all((d / "checkpoint.pt").is_file() for d in made)


# ------------------------------------------------------------------ data: refused before anything runs
def _no_runs(isolated) -> bool:
    runs = isolated / "runs"
    return not runs.exists() or not any(p.is_dir() for p in runs.iterdir())


def test_a_bad_voc_xml_is_refused_before_any_run(isolated, tmp_path, capsys):
    _devkit(tmp_path / "voc", {"a": _xml(_obj()), "b": _xml(_obj("cat", (1, 1, 99, 10)))},
            {"trainval": ["a"], "test": ["b"]})
    args = ["finetune", "--from", "scratch", "--scale", "micro", "--data", str(tmp_path / "voc" / "VOC2007")]
    assert main(args) == 2
    _one_line(capsys.readouterr().err, "b.xml", "object[0].bndbox.xmax", "outside the image")
    assert _no_runs(isolated)


@pytest.mark.parametrize("fault", ["missing", "missized"])
def test_a_missing_or_mis_sized_image_is_refused_before_any_run(isolated, capsys, fault):
    from tests.test_own_data import _args
    from benchmark.data.synthetic import ensure_synthetic_dataset
    from tests.conftest import MICRO_DATA
    import shutil
    splits = ensure_synthetic_dataset(isolated / "gen", **{k: v for k, v in MICRO_DATA.items() if k != "kind"})
    root = isolated / "mydata"
    for s in ("train", "val"):
        shutil.copytree(splits[s]["image_root"], root / s)
        shutil.copy(splits[s]["ann_file"], root / f"{s}.json")
    victim = sorted((root / "train").iterdir())[2]
    if fault == "missing":
        victim.unlink()
    else:
        from PIL import Image
        Image.new("RGB", (50, 40)).save(victim)
    assert main(["finetune", "--from", "scratch", "--scale", "micro", *_args(root)]) == 2
    _one_line(capsys.readouterr().err, "train.json", "1 of 8 images", "Nothing was run",
              "no such file" if fault == "missing" else "is 50x40, the annotation says 64x64")
    assert _no_runs(isolated)
    assert main(["data", "check", f"train={root}/train.json:{root}/train"]) == 1
    assert "a run refuses the dataset before it starts" in capsys.readouterr().out


def test_a_voc_image_is_the_file_its_xml_names(tmp_path):
    from PIL import Image
    from benchmark.data.voc import voc_to_coco
    root = _devkit(tmp_path, {"a": _xml(_obj()), "b": _xml(_obj())}, {"test": ["a", "b"]})
    (root / "VOC2007" / "JPEGImages" / "b.jpg").unlink()
    Image.new("RGB", (40, 30)).save(root / "VOC2007" / "JPEGImages" / "b.png")
    xml = root / "VOC2007" / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<folder>VOC2007</folder>", "<folder>VOC2007</folder><filename>b.png"
                                                                       "</filename>"))
    names = [im["file_name"] for im in voc_to_coco(root, ["VOC2007/test"])["images"]]
    assert names == ["VOC2007/JPEGImages/a.jpg", "VOC2007/JPEGImages/b.png"]   # no <filename>: <id>.jpg


def test_a_sibling_folder_beside_a_voc_year_folder_is_not_its_content(tmp_path):
    from benchmark.data.user import _MEMO, data_identity, parse_data_args
    _devkit(tmp_path, {"a": _xml(_obj()), "b": _xml(_obj())}, {"trainval": ["a"], "test": ["b"]})
    data = parse_data_args([str(tmp_path / "VOC2007")])
    before = data_identity(data)
    _devkit(tmp_path, {"c": _xml(_obj("dog"))}, {"trainval": ["c"], "test": ["c"]}, year="VOC2007_backup")
    _MEMO.clear()
    assert data_identity(data) == before
    (tmp_path / "VOC2007" / "Annotations" / "a.xml").write_text(_xml(_obj("dog")))
    _MEMO.clear()
    assert data_identity(data) != before


# ------------------------------------------------------------------ a full disk: one line, nothing lost
def _full_save(real, after: int):
    """torch.save as it fails on a full file system (seen on a 512 KiB tmpfs): a RuntimeError
    whose context is OSError 28, after ``after`` good saves."""
    import errno
    calls = []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) <= after:
            return real(obj, f, *a, **k)
        f.write(b"x" * 100)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return save


def test_a_full_disk_while_checkpointing_is_one_line_keeps_the_last_checkpoint_and_resumes(isolated, capsys,
                                                                                       monkeypatch):
    import benchmark.engine.checkpoint as ck
    from benchmark.experiments.config import pretrain_config
    from benchmark.runs.identity import run_key
    cmd = ["pretrain", "--method", "moco_v2", "--scale", "micro", "--epochs", "300"]   # 6 steps
    key = run_key(pretrain_config("moco_v2", scale="micro", epochs=300))
    run_dir = isolated / "runs" / key
    real = torch.save
    monkeypatch.setattr(ck.torch, "save", _full_save(real, after=1))
    import benchmark.engine.loop as loop
    monkeypatch.setattr(loop.LoopConfig, "__init__", _every(loop.LoopConfig.__init__, ckpt_every=2))
    # saved at step 2; the save at step 4 finds the disk full
    assert main(cmd) == 28
    _one_line(capsys.readouterr().err, f"no space left in {run_dir}", "writing checkpoint.pt",
              "run the same command again: it resumes")
    assert RunStore().status(key) == "interrupted"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(ck.torch, "save", real)
    assert main(cmd) == 0
    assert "resumed from" in capsys.readouterr().err and RunStore().status(key) == "done"


def _every(init, **fixed):
    def patched(self, *a, **k):
        init(self, *a, **{**k, **fixed})
    return patched


def test_a_full_disk_anywhere_is_one_line_naming_the_folder(isolated, capsys, monkeypatch):
    import errno
    from benchmark.engine.loop import JsonlLogger

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    monkeypatch.setattr(JsonlLogger, "log", full)
    assert main(["pretrain", "--method", "moco_v2", "--scale", "micro", "--epochs", "300"]) == 28
    err = capsys.readouterr().err
    _one_line(err, "no space left in", "Free space and run the same command again")
    assert str(isolated / "runs") in err
