"""Runs as a frame, cost, significance, leaderboards and what `reproduce` tells its user
(fake finished runs; no training)."""
import io
import json
import os
import stat

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.reporting.leaderboard import collect_boards, write_readme
from benchmark.experiments.plan import plan_table
from benchmark.reporting.progress import TableProgress, failure_summary
from benchmark.reporting.render import cell_values, render, welch_greater
from benchmark.reporting.results import load_runs, sacct_usage
from benchmark.runs.store import RunStore


def _finish(store, job, metrics=None, *, time="2026-01-02T03:04:05", wall_s=36.0, gpus=(), slurm=None):
    """A finished run as the stages leave it, with a chosen start time, machine and duration."""
    d = store.begin(job.key, job.config)
    env = json.loads((d / "env.json").read_text())
    env["time"] = time
    env["hardware"].update(cuda=bool(gpus), gpus=list(gpus))
    env["slurm"] = slurm or {}
    (d / "env.json").write_text(json.dumps(env))
    store.finish(job.key, {**(metrics or {}), "wall_s": wall_s})


def _fill(store, plan, ap, **kw):
    """Finish every implemented cell's chain; ``ap(row_label, seed)`` gives its box AP."""
    for cell in plan.cells:
        if cell.eval_key is None:
            continue
        for k in cell.chain[:-1]:
            if store.status(k) != "done":
                _finish(store, {j.key: j for j in plan.jobs}[k], **kw)
        if store.status(cell.eval_key) != "done":
            v = ap(plan.spec.rows[cell.row].label, cell.seed)
            _finish(store, {j.key: j for j in plan.jobs}[cell.eval_key], {"bbox": {"AP": v}, "segm": {"AP": v / 2}}, **kw)


def test_load_runs_flattens_resolves_chains_and_costs(isolated):
    store = RunStore(isolated / "runs")
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    moco = next(c for c in plan.cells if plan.spec.rows[c.row].method == "moco_v2" and c.col == 0)
    pre, ft, ev = ({j.key: j for j in plan.jobs}[k] for k in moco.chain)
    _finish(store, pre, {"steps": 3}, wall_s=360.0, gpus=("H100",))
    _finish(store, ft, time="2026-01-02T04:00:00", wall_s=720.0, gpus=("H100",))
    _finish(store, ev, {"bbox": {"AP": 1.5}}, time="2026-01-02T05:00:00", wall_s=36.0, gpus=("H100",))
    # a failed run that logged 90 s before dying, on a CPU machine
    other = next(c for c in plan.cells if plan.spec.rows[c.row].method == "scratch")
    d = store.begin(other.chain[0], {j.key: j for j in plan.jobs}[other.chain[0]].config)
    (d / "log.jsonl").write_text('{"step": 10, "time": 30.0}\n{"step": 20, "time": 90.0}\n{"step": 3')
    store.fail(other.chain[0], "Traceback ...\nFileNotFoundError: /nope/val.json")
    os.utime(d / "config.json", (0, 0))                      # file times are not the run's date

    df = load_runs(store.root)
    assert len(df) == 4 and set(df["status"]) == {"done", "failed"}
    e = df.loc[ev.key]
    assert e["stage"] == "evaluate" and e["method"] == "moco_v2" and e["schedule"] == "1x"
    assert e["detector"] == "mask_rcnn" and e["metrics.bbox.AP"] == 1.5 and e["seed"] == 0
    assert e["created"] == pd.Timestamp("2026-01-02T05:00:00") and e["gpus"] == "H100"
    assert e["gpu_hours"] == pytest.approx(0.01) and e["chain_gpu_hours"] == pytest.approx(0.31)
    assert df.loc[pre.key, "cfg.method.name"] == "moco_v2" and "env.packages.torch" in df.columns
    f = df.loc[other.chain[0]]
    assert f["error"] == "FileNotFoundError: /nope/val.json"
    assert f["cpu_hours"] == pytest.approx(90 / 3600) and f["gpu_hours"] == 0.0   # from its log
    assert f["created"].year >= 2026
    assert list(df["created"]) == sorted(df["created"])     # ordered by the runs' own start times


def test_sacct_cost_sums_requeued_attempts(isolated, monkeypatch):
    bin_ = isolated / "bin"
    bin_.mkdir()
    fake = bin_ / "sacct"
    # two attempts of array task 7_1 (preempted, then completed) and one unrelated job
    fake.write_text("#!/bin/sh\nprintf '7_1|600|2400|cpu=4,gres/gpu=2,mem=8G\\n7_1|1200|4800|cpu=4,gres/gpu=2\\n"
                    "99|5|5|cpu=1\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    u = sacct_usage(["7_1"])
    assert u == {"7_1": {"elapsed_s": 1800.0, "cpu_s": 7200.0, "gpus": 2}}
    store = RunStore(isolated / "runs")
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    job = plan.jobs[0]
    _finish(store, job, wall_s=10.0, slurm={"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"})
    r = load_runs(store.root).loc[job.key]
    assert r["slurm_job_id"] == "7_1" and r["cost_source"] == "sacct"
    assert r["gpu_hours"] == pytest.approx(1.0) and r["cpu_hours"] == pytest.approx(2.0)


def test_welch_test_matches_the_hand_computed_value():
    # means 2 and 1, both variances 1, n = 3: t = 1 / sqrt(2/3) = 1.2247 at 4 d.o.f. -> one-sided p = 0.1440
    assert welch_greater([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(0.1440, abs=5e-4)
    assert welch_greater([1.0, 2.0], [0.0, 1.0]) is None               # fewer than 3 seeds: no test
    assert welch_greater([5.0, 5.1, 5.2], [1.0, 1.1, 0.9]) < 1e-3


def test_three_seed_table_says_who_beats_scratch_and_moco(isolated):
    store = RunStore(isolated / "runs")
    plan = plan_table("soco_table1", scale="micro", seeds=(0, 1, 2))
    base = {"Scratch": 1.0, "Supervised": 1.0, "MoCo v2": 2.0, "SoCo 100ep": 5.0, "SoCo 400ep": 2.0,
            "SoCo* 400ep": 1.0}
    _fill(store, plan, lambda row, seed: base.get(row, 1.0) + 0.1 * seed)   # rows of newer methods: 1.0
    cells = cell_values(plan, store)
    r = {row.label: ri for ri, row in enumerate(plan.spec.rows)}
    assert cells[(r["SoCo 100ep"], 0)]["p"]["Scratch"] < 0.05 and cells[(r["SoCo 100ep"], 0)]["p"]["MoCo v2"] < 0.05
    assert cells[(r["SoCo 400ep"], 0)]["p"]["Scratch"] < 0.05 and cells[(r["SoCo 400ep"], 0)]["p"]["MoCo v2"] > 0.05
    assert "MoCo v2" not in cells[(r["MoCo v2"], 0)]["p"]              # a row is not tested against itself
    vdir = render(plan, store, out_root=isolated / "tables")
    md = (vdir / "table.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| SoCo 100ep"))
    assert "▲S ▲M" in line and "| 3 |" in line
    assert "▲" not in next(ln for ln in md.splitlines() if ln.startswith("| SoCo* 400ep"))
    assert "Welch" in md and "Spearman ρ" in md and "CPU-hours" in md
    csv = pd.read_csv(vdir / "table.csv")
    soco = csv[(csv["row"] == "SoCo 100ep") & (csv["column"] == "1x APbb")].iloc[0]
    assert soco["n_seeds"] == 3 and soco["scale"] == "micro" and soco["p_vs_scratch"] < 0.05
    assert soco["cost_unit"] == "CPU-h" and soco["cost_per_seed"] == pytest.approx(3 * 36 / 3600, abs=1e-4)


def test_one_seed_shows_no_std_and_a_new_version_only_on_change(isolated):
    store = RunStore(isolated / "runs")
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    _fill(store, plan, lambda row, seed: 1.0)
    vdir = render(plan, store, out_root=isolated / "tables")
    md = (vdir.parent / "table.md").read_text()
    assert "±" not in md.split("| method")[1] and "(one seed)" in md
    csv = pd.read_csv(vdir / "table.csv")
    assert csv["ours_std"].isna().all() and (csv.loc[csv["status"] == "done", "n_seeds"] == 1).all()
    before = {p: p.stat().st_mtime_ns for p in vdir.parent.rglob("*")}
    assert render(plan, store, out_root=isolated / "tables") == vdir
    assert {p: p.stat().st_mtime_ns for p in vdir.parent.rglob("*")} == before   # nothing written
    # a changed run store (one more seed) is a new version; the old one is kept
    plan2 = plan_table("soco_table1", scale="micro", seeds=(0, 1))
    _fill(store, plan2, lambda row, seed: 1.0 + seed)
    v2 = render(plan2, store, out_root=isolated / "tables")
    assert v2 != vdir and vdir.is_dir() and json.loads((v2.parent / "version.json").read_text())["seeds"] == [0, 1]


def test_leaderboards_one_per_scale_ranked_with_cost(isolated):
    store = RunStore(isolated / "runs")
    rank = {"Scratch": 1.0, "Supervised": 3.0, "MoCo v2": 2.0, "SoCo 100ep": 4.0, "SoCo 400ep": 6.0,
            "SoCo* 400ep": 5.0}
    # rows of newer methods (PixPro, InsLoc, ...) rank between Scratch and MoCo v2
    _fill(store, plan_table("soco_table1", scale="micro", seeds=(0,)), lambda row, seed: rank.get(row, 1.5))
    _fill(store, plan_table("soco_table1", scale="tiny", seeds=(0,)), lambda row, seed: 10 - rank.get(row, 1.5),
          gpus=("H100",))
    df = load_runs(store.root)
    boards = collect_boards(df)
    assert set(boards) == {("mask_rcnn", "coco", "micro"), ("mask_rcnn", "coco", "tiny")}
    micro = boards[("mask_rcnn", "coco", "micro")]
    assert [r["label"] for r in micro["rows"]][:3] == ["SoCo 400ep", "SoCo* 400ep", "SoCo 100ep"]
    assert [r["label"] for r in boards[("mask_rcnn", "coco", "tiny")]["rows"]][0] == "Scratch"
    assert micro["columns"] == ["1x APbb", "2x APbb", "1x APmk", "2x APmk"]   # box AP, then mask AP
    results = isolated / "results"
    readme = write_readme(df, results, store.root)
    text = readme.read_text()
    assert text.count("## Mask R-CNN FPN · COCO protocol") == 2 and "scale `micro`" in text and "scale `tiny`" in text
    assert "GPU-hours" in text and "CPU-hours" in text and "(GPU-h)" in text
    assert "tables/soco_table1@micro/table.md" in text and "../runs/" in text
    assert (results / "leaderboards" / "mask_rcnn_coco_tiny.png").stat().st_size > 1000
    mtime = readme.stat().st_mtime_ns
    write_readme(df, results, store.root)
    assert readme.stat().st_mtime_ns == mtime                          # unchanged page: not rewritten


def test_leaderboard_columns_are_schedule_and_metric_whatever_each_table_calls_them(isolated):
    """insloc_modelzoo calls soco_table1's "1x APbb" "FPN 1x APbb", aligndet_gains has "12k"/"90k":
    one column per (schedule, metric), ranked by the column most rows have, and a row whose runs
    another row already shows (MoCo v2 200ep, in both tables) appears once."""
    store = RunStore(isolated / "runs")
    for name in ("soco_table1", "insloc_modelzoo", "aligndet_gains"):
        _fill(store, plan_table(name, scale="micro", seeds=(0,)), lambda row, seed: 1.0 + len(row) / 100)
    board = collect_boards(load_runs(store.root))[("mask_rcnn", "coco", "micro")]
    cols = board["columns"]
    assert cols[0] == "1x APbb" and set(cols) == {"1x APbb", "2x APbb", "12k APbb", "90k APbb", "1x APmk", "2x APmk"}
    assert [c.endswith("APbb") for c in cols] == [True] * 4 + [False] * 2      # box AP, then mask AP
    soco = plan_table("soco_table1", scale="micro", seeds=(0,))
    moco = next(c.eval_key for c in soco.cells if soco.spec.rows[c.row].label == "MoCo v2" and c.col == 0)
    shows = [r["table"] for r in board["rows"] if moco in r["cells"].get("1x APbb", {}).get("runs", [])]
    assert len(shows) == 1                                   # soco_table1's MoCo v2 = insloc's MoCo v2 200ep
    ranked = [r for r in board["rows"] if "1x APbb" in r["cells"]]
    assert board["rows"][:len(ranked)] == ranked             # rows without the ranking column come last
    means = [r["cells"]["1x APbb"]["mean"] for r in ranked]
    assert means == sorted(means, reverse=True)


def test_runs_command_formats_and_filters(isolated, capsys):
    store = RunStore()
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    _finish(store, plan.jobs[0], time="2025-05-06T07:08:09")
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "2025-05-06 07:08" in out and "micro" in out and "1 runs" in out
    assert main(["runs", "--format", "csv", "--stage", "pretrain"]) == 0
    df = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(df["key"]) == [plan.jobs[0].key] and "cfg.method.name" in df.columns
    assert main(["runs", "--format", "json", "--stage", "evaluate"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit) as e:
        main(["runs", "--stage", "bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_reproduce_keeps_the_tables_seeds_and_says_what_it_reused(isolated, capsys):
    store = RunStore()
    plan = plan_table("soco_table1", scale="micro", seeds=(0, 1, 2))
    _fill(store, plan, lambda row, seed: 1.0 + seed)
    render(plan, store)
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 to run" in out and "seeds [0, 1, 2] (keeping the table's seeds" in out
    assert "2026-01-02 03:04" in out and "commits" in out and "nothing to train" in out and "--fresh" in out
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro", "--seeds", "1", "--dry-run"]) == 0
    assert "seeds [0]" in capsys.readouterr().out
    # --fresh never reuses: an empty new store, and a non-empty --runs is refused
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro", "--fresh", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "runs-fresh-" in out and "nothing reused" in out
    assert main(["reproduce", "--table", "soco_table1", "--fresh", "--runs", str(store.root), "--dry-run"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_table_whose_runs_all_failed_exits_non_zero_once(isolated, capsys, monkeypatch):
    import slurm.local as stages

    def all_fail(plan, store_root=None, **kw):
        s = RunStore(store_root)
        for j in plan.jobs:
            if j.stage == "pretrain" or not j.parents:
                s.begin(j.key, j.config)
                s.fail(j.key, "Traceback ...\nFileNotFoundError: data/val.json: no such file")
        return {}
    monkeypatch.setattr(stages, "run_plan_local", all_fail)
    assert main(["reproduce", "--table", "soco_table1", "--scale", "micro"]) == 1
    cap = capsys.readouterr()
    assert cap.err.count("FileNotFoundError: data/val.json") == 1 and "the table was not written" in cap.err
    assert "failed" in cap.err and not (isolated / "results" / "tables" / "soco_table1@micro").exists()
    plan = plan_table("soco_table1", scale="micro")
    n_failed, filled, _ = failure_summary(plan, load_runs())
    n_pre = sum(j.stage == "pretrain" for j in plan.jobs)
    assert n_failed == n_pre + 2 and filled == 0        # every pretraining and the two Scratch fine-tunings


def test_progress_line_eta_and_errors_once(isolated):
    plan = plan_table("soco_table1", scale="micro", seeds=(0,))
    out = io.StringIO()
    est = {("pretrain", "micro"): 100.0, ("finetune", "micro"): 50.0, ("evaluate", "micro"): 10.0}
    tp = TableProgress(plan, isolated / "runs", jobs=2, out=out, estimates=est)
    n_pre = sum(j.stage == "pretrain" for j in plan.jobs)
    n_ft = sum(j.stage == "finetune" for j in plan.jobs)
    n_ev = sum(j.stage == "evaluate" for j in plan.jobs)
    assert tp.eta() == pytest.approx((100 * n_pre + 50 * n_ft + 10 * n_ev) / 2)
    assert f"{len(plan.jobs)} runs to run, 2 at once" in out.getvalue()
    a, b = plan.jobs[0], plan.jobs[1]
    tp.start(a)
    tp.start(b)
    assert "running: pretrain ×2" in tp.line()
    tp.finish(a, "failed", "OSError: disk full")
    tp.finish(b, "failed", "OSError: disk full")
    text = out.getvalue()
    assert text.count("OSError: disk full") == 1 and f"the same error as {a.label}" in text
    assert f"2/{len(plan.jobs)} runs (2 failed)" in text and "ETA" in text
    assert tp.eta() == pytest.approx((100 * (n_pre - 2) + 50 * n_ft + 10 * n_ev) / 2)   # the two are done
    for j in plan.jobs[2:]:
        tp.finish(j, "done")
    assert tp.eta() == 0.0 and tp.line().endswith("ETA 0 s")


def test_results_folder_never_makes_the_tree_dirty(tmp_path):
    import subprocess

    from benchmark.runs.store import git_info

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "results" / "tables").mkdir(parents=True)
    (tmp_path / "results" / "tables" / "table.md").write_text("v1")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    assert git_info(tmp_path)["dirty"] is False
    (tmp_path / "results" / "tables" / "table.md").write_text("v2")    # the tool's own output
    assert git_info(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2")                         # the code
    assert git_info(tmp_path)["dirty"] is True


def test_a_dirty_tree_versions_no_table_where_git_could_commit_it_unless_told(isolated, monkeypatch, capsys):
    """A version names the commit that built it: from uncommitted code, no new version goes
    into the checkout's own results/ unless --allow-dirty or DETBENCH_ALLOW_DIRTY=1 says so,
    and the refusal says how to go on. Unchanged content, folders outside the checkout (the
    tests' own) and folders git ignores are written as before."""
    import subprocess

    import benchmark.reporting.render as R

    repo = isolated / "checkout"
    (repo / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1")
    (repo / ".gitignore").write_text("scratch/\n")

    def git(*a):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True,
                       capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    monkeypatch.setattr(R, "REPO", repo)
    monkeypatch.delenv("DETBENCH_ALLOW_DIRTY", raising=False)
    monkeypatch.setenv("DETBENCH_RESULTS", str(repo / "results"))
    tables = repo / "results" / "tables"
    store = RunStore(isolated / "runs")
    one, two, three = (plan_table("soco_table1", scale="micro", seeds=tuple(range(n))) for n in (1, 2, 3))
    for p in (one, two, three):
        _fill(store, p, lambda row, seed: 1.0 + seed)
    clean = render(one, store, out_root=tables)
    assert not clean.name.endswith("-dirty")

    (repo / "code.py").write_text("x = 2")
    assert render(one, store, out_root=tables) == clean              # nothing new: nothing to refuse
    with pytest.raises(R.DirtyTreeError) as e:
        render(two, store, out_root=tables)
    msg = str(e.value)
    assert "code.py" in msg and "`detbench render --table soco_table1 --scale micro`" in msg
    assert "--allow-dirty" in msg and "DETBENCH_ALLOW_DIRTY=1" in msg and str(store.root) in msg
    assert [d.name for d in clean.parent.iterdir() if d.is_dir()] == [clean.name]   # nothing written
    args = ["render", "--table", "soco_table1", "--scale", "micro", "--seeds", "2", "--runs", str(store.root)]
    assert main(args) == 2 and "not writing version" in capsys.readouterr().err
    assert main(args + ["--allow-dirty"]) == 0
    assert R.read_version(clean.parent)["version"].endswith("-dirty")
    monkeypatch.setenv("DETBENCH_ALLOW_DIRTY", "1")
    assert render(three, store, out_root=tables).name.endswith("-dirty.2")     # the day's second
    monkeypatch.delenv("DETBENCH_ALLOW_DIRTY")
    # where nothing is committed, a dirty build is written as before, named -dirty
    assert render(two, store, out_root=isolated / "elsewhere").name.endswith("-dirty")
    assert render(two, store, out_root=repo / "scratch" / "tables").name.endswith("-dirty")


def test_titles_name_every_detector_and_feature_that_ran(isolated):
    """A table of several detectors says each with its backbone feature (FPN, C4, C5), and the
    synthetic scenes in VOC layout say so: never the paper's setting, never 'FPN' for a C4."""
    from benchmark.reporting.render import what_ran
    store = RunStore(isolated / "runs")
    mixed = what_ran(plan_table("detectors_tiny", scale="micro"), load_runs(store.root))
    for part in ("Mask R-CNN, ResNet-18 FPN", "Faster R-CNN, ResNet-18 C4", "RetinaNet, ResNet-18 FPN",
                 "FCOS, ResNet-18 FPN", "DETR, ResNet-18 C5", "synthetic scenes"):
        assert part in mixed
    voc = what_ran(plan_table("moco_voc", scale="micro"), load_runs(store.root))
    assert voc.startswith("Faster R-CNN, ResNet-18 C4, on synthetic scenes") and voc.endswith("in VOC layout")


def test_gain_row_is_the_difference_of_two_rows_beside_the_papers_gain(isolated):
    """aligndet_gains publishes gains, not APs: the derived row is AlignDet minus its baseline
    (with the standard error over seeds) and the paper's gain sits in the 12k columns only."""
    from benchmark.reporting.render import gain_cells
    store = RunStore(isolated / "runs")
    plan = plan_table("aligndet_gains", scale="micro", seeds=(0, 1))
    _fill(store, plan, lambda row, seed: (2.0 + 0.3 * seed) if "AlignDet" in row else (1.0 + 0.1 * seed))
    gains = {g["column"]: g for g in gain_cells(plan, cell_values(plan, store))}
    fcos = gains["FCOS 12k APbb"]
    assert fcos["mean"] == pytest.approx(2.15 - 1.05)
    assert fcos["se"] == pytest.approx((0.3 ** 2 / 2 / 2 + 0.1 ** 2 / 2 / 2) ** 0.5)   # s^2 = d^2/2 for two seeds
    assert fcos["ref"] == 5.3 and gains["DETR 12k APbb"]["ref"] == 2.3
    assert gains["FCOS 90k APbb"]["ref"] is None and gains["Mask R-CNN 12k APbb"]["ref"] is None
    md = (render(plan, store, out_root=isolated / "tables") / "table.md").read_text()
    assert "| **AlignDet gain** |  | +1.10 ± 0.16 / +5.3 |" in md


def test_gain_naming_a_missing_row_is_an_error_naming_the_field(tmp_path):
    from benchmark.experiments.tables import load_spec
    from methods.config import ConfigError
    p = tmp_path / "t.yaml"
    p.write_text("name: t\ncolumns: [{label: A, schedule: 1x, metric: bbox.AP}]\n"
                 "rows: [{label: X, method: moco_v2}]\ngain: {label: G, row: X, over: Y, ref_column: g}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: gain.over: no row labelled 'Y'"):
        load_spec(str(p))


def test_eta_of_a_finetuning_with_other_steps_scales_with_its_steps(isolated):
    # a schedule run at 3x its steps (--set finetune.steps=...) is estimated per step, not as
    # the schedule's earlier runs
    import pandas as pd

    from benchmark.reporting.progress import duration_estimates
    frame = pd.DataFrame([{"status": "done", "hours": 0.02, "stage": "finetune", "scale": "micro",
                           "cfg.schedule": "1x", "cfg.recipe.steps": 100}], index=["k1"])
    est = duration_estimates([frame])
    assert est[("finetune", "micro", "1x", 100)] == pytest.approx(72.0)
    assert est[("finetune", "micro", "per step")] == pytest.approx(0.72)
    plan = plan_table("soco_table1", scale="micro", seeds=(0,), overrides={"finetune": {"steps": 300}})
    tp = TableProgress(plan, isolated / "runs", jobs=1, out=io.StringIO(), estimates=est)
    ft = [j for j in plan.jobs if j.stage == "finetune"]
    assert all(tp.est[j.key] == pytest.approx(0.72 * 300) for j in ft)
