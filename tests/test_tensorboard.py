"""TensorBoard event files beside log.jsonl (issue 26): the scalars read back with
TensorBoard's own EventAccumulator equal the log's, a resumed run's are purged past its
checkpoint, the label names the event folder, hparams of a finished run, and one notice
without the package."""
from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from benchmark.engine import tb  # noqa: E402
from benchmark.engine.loop import JsonlLogger, LoopConfig, TrainLoop  # noqa: E402


def _run(run_dir, steps, resume=False, stop_after=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainLoop(model, opt, lambda s: 0.1 / (1 + s), LoopConfig(total_steps=steps, ckpt_every=2, log_every=1),
                     run_dir)
    start = loop.try_resume() if resume else 0
    x = torch.tensor([[1.0, 2.0]])

    def step(_):
        loss = (model(x) - 3).pow(2).mean()
        return {"loss": loss, "loss_term": loss.detach() * 2}
    loop.run(iter([None] * steps), step, JsonlLogger(run_dir / "log.jsonl", resume_step=start if resume else None),
             stop_after=stop_after, progress=False)


def _events(run_dir) -> dict:
    acc = EventAccumulator(str(tb.event_dir(run_dir)))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_scalars_equal_the_log(tmp_path):
    run = tmp_path / "0123456789abcdef"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"label": "soco_table1/SoCo R50 (FPN)/seed0/finetune"}))
    _run(run, 5)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert tb.event_dir(run) == run / "tb" / "soco_table1" / "SoCo_R50_FPN" / "seed0" / "finetune"
    ev = _events(run)
    assert set(ev) == {"train/loss", "train/lr", "train/loss_term"}
    for key in ("loss", "lr", "loss_term"):
        assert [s for s, _ in ev[f"train/{key}"]] == [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        assert [v for _, v in ev[f"train/{key}"]] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    _run(tmp_path, 6, stop_after=3)          # checkpoint at step 3, logged 1..3
    rows_before = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(rows_before) == 3
    _run(tmp_path, 6, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "event" not in line]
    ev = _events(tmp_path)["train/loss"]
    assert [s for s, _ in ev] == [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in ev] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_hparams_of_a_finished_run(tmp_path):
    assert tb.write_hparams(tmp_path, {"method": {"name": "soco"}, "seed": 0}, {"bbox_AP": 12.5, "steps": 4,
                                                                                  "note": "x"})
    acc = EventAccumulator(str(tb.event_dir(tmp_path)))
    acc.Reload()
    assert [e.value for e in acc.Scalars("final/bbox_AP")] == [12.5]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_without_the_package_one_notice_and_no_files(tmp_path, monkeypatch, caplog):
    import builtins
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    monkeypatch.setattr(tb, "_warned", False)
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, 3)
        _run(tmp_path, 3)
    notices = [r for r in caplog.records if "TensorBoard logs off" in r.getMessage()]
    assert len(notices) == 1 and len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "tb").exists()


def test_logdir_of_a_store_lists_a_tables_runs_by_table_row_seed_stage(tmp_path):
    """``tensorboard --logdir <store>``: TensorBoard's EventMultiplexer (what the server loads)
    names each run by its event folder's path, so one table's runs are ``<key>/tb/<table>/<row>/
    <seed>/<stage>`` and the filter box ``soco_table1/`` selects exactly them."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    labels = {"00000000000000a1": "soco_table1/SoCo R50 (FPN)/seed0/finetune",
              "00000000000000a2": "soco_table1/SoCo R50 (FPN)/seed1/finetune",
              "00000000000000a3": "soco_table1/MoCo v2/seed0/pretrain",
              "00000000000000b1": "pixpro_coco/PixPro/seed0/finetune"}
    for key, label in labels.items():
        run = tmp_path / key
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"label": label}))
        _run(run, 2)
    mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    names = set(mux.Runs())
    assert names == {f"{k}/tb/{tb.event_dir(tmp_path / k).relative_to(tmp_path / k / 'tb').as_posix()}" for k in labels}
    table = sorted(n.split("/tb/", 1)[1] for n in names if "/tb/soco_table1/" in n)
    assert table == ["soco_table1/MoCo_v2/seed0/pretrain", "soco_table1/SoCo_R50_FPN/seed0/finetune",
                     "soco_table1/SoCo_R50_FPN/seed1/finetune"]
    assert all("train/loss" in mux.GetAccumulator(n).Tags()["scalars"] for n in names)
