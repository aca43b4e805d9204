
import pytest
import torch

from benchmark.engine.checkpoint import load_checkpoint, previous_checkpoint, save_checkpoint
from benchmark.engine.loop import Diverged, LoopConfig, TrainLoop
from benchmark.engine.optim import LARS, Schedule
from benchmark.engine.sampling import ResumableBatchSampler
from benchmark.engine.signals import REQUESTS
from tests.conftest import MICRO_DATA


def test_cosine_schedule_with_warmup():
    s = Schedule(base_lr=1.0, total_steps=110, warmup_steps=10, kind="cosine", warmup_factor=0.0)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(110) == pytest.approx(0.0, abs=1e-12)


def test_multistep_schedule_is_detectron2_like():
    s = Schedule(base_lr=0.02, total_steps=90, warmup_steps=10, kind="multistep", milestones=(60, 80))
    assert s(0) == pytest.approx(0.02 * 0.001)
    assert s(30) == pytest.approx(0.02)
    assert s(60) == pytest.approx(0.002)
    assert s(85) == pytest.approx(0.0002)
    with pytest.raises(ValueError, match="schedule.kind"):
        Schedule(1.0, 10, kind="poly")




def test_lars_trust_ratio_scales_update():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))     # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.1)
    w.grad = torch.tensor([[0.0, 10.0]])                    # ||g|| = 10 -> trust = 0.1 * 5 / 10
    b.grad = torch.tensor([2.0])                            # 1-d: not adapted
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 3.5]]))
    assert torch.allclose(b.detach(), torch.tensor([-1.0]))


def test_sampler_resumes_the_same_stream():
    full = ResumableBatchSampler(10, 4, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(6)]                  # crosses epoch boundaries
    again = iter(ResumableBatchSampler(10, 4, seed=3, start_step=4))
    assert [next(again) for _ in range(2)] == batches[4:]
    flat = [x for b in batches[:5] for x in b]              # 20 items = 2 epochs
    assert sorted(i for e, i in flat if e == 0) == list(range(10))
    assert sorted(i for e, i in flat if e == 1) == list(range(10))


def test_sampler_splits_the_same_global_batches_over_any_process_count():
    def steps(world, rank, start=0, n=7):
        it = iter(ResumableBatchSampler(10, 4, seed=0, start_step=start, rank=rank, world_size=world))
        return [next(it) for _ in range(n)]
    one = steps(1, 0)
    for world in (2, 4):
        per_rank = [steps(world, r) for r in range(world)]
        assert all(len(b) == 4 // world for b in per_rank[0])
        assert [sum((per_rank[r][s] for r in range(world)), []) for s in range(7)] == one   # rank order
        assert steps(world, 1, start=5, n=2) == per_rank[1][5:]                              # resumes alike
    with pytest.raises(ValueError, match="global batch 4 is not divisible by 3 processes"):
        ResumableBatchSampler(10, 4, seed=0, world_size=3)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"x": torch.ones(2)})

    def boom(*a, **k):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(p, {"x": torch.zeros(2)})
    assert torch.equal(load_checkpoint(p)["x"], torch.ones(2))   # old file intact
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]          # no temporary file left behind


def test_loss_nan_raises_diverged(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainLoop(model, opt, lambda s: 0.1, LoopConfig(total_steps=3), tmp_path)
    with pytest.raises(Diverged):
        loop.run(iter([None] * 3), lambda b: {"loss": torch.tensor(float("nan"), requires_grad=True)},
                 None, progress=False)


def _pretrain_cfg():
    from benchmark.experiments.config import pretrain_config
    return pretrain_config("moco_v2", scale="tiny", seed=0, epochs=6,
                           method_overrides={"queue_size": 32, "crop_size": 32},
                           recipe_overrides={"batch_size": 4, "steps_per_epoch": 1, "base_lr": 0.5},
                           data_overrides=MICRO_DATA)


def test_pretrain_stop_and_resume_is_bit_exact(isolated):
    from benchmark.stages.pretrain import run_pretrain
    cfg = _pretrain_cfg()
    cfg["runtime"] = {"ckpt_every": 100, "log_every": 1}
    full = run_pretrain(cfg, isolated / "a", progress=False)
    part = run_pretrain(cfg, isolated / "b", stop_after=2, progress=False)
    assert part["steps"] == 2 and not (isolated / "b" / "weights.pt").exists()
    rest = run_pretrain(cfg, isolated / "b", progress=False)
    assert rest["steps"] == 6 and full["final"]["loss"] == rest["final"]["loss"]
    wa = torch.load(isolated / "a" / "weights.pt")["state_dict"]
    wb = torch.load(isolated / "b" / "weights.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = (isolated / "a" / "log.jsonl").read_text().splitlines()
    lb = (isolated / "b" / "log.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in __import__("json").loads(l).items() if k != "time"} for l in ls]
    events = [r for r in strip(lb) if "event" in r]   # the log says where the run resumed
    assert events == [{"step": 2, "event": "resumed", "from": "checkpoint.pt"}]
    assert strip(la) == [r for r in strip(lb) if "event" not in r] and len(la) == 6


def test_requested_checkpoint_is_written_at_the_end_of_the_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainLoop(model, opt, lambda s: 0.1, LoopConfig(total_steps=10, ckpt_every=1000), tmp_path)

    def step(b):
        if loop.step == 3:
            REQUESTS.request_checkpoint()          # what submitit's checkpoint() / SIGUSR1 call
        return {"loss": model(torch.ones(1, 2)).sum()}
    saved = []
    real_save = loop.save
    loop.save = lambda: (saved.append(loop.step), real_save())
    loop.run(iter([None] * 10), step, None, stop_after=6, progress=False)
    assert saved == [4, 6]                   # the requested one after step 4, then at the stop
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6
    assert REQUESTS.checkpoint is False


def test_keeping_the_previous_checkpoint_never_leaves_the_checkpoint_missing(tmp_path, monkeypatch):
    """A reader (a resume, a test waiting on the file) always finds ``checkpoint.pt``: the old
    one is linked as ``checkpoint.prev.pt`` and the new one replaces it in one rename."""
    import os
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, {"step": 1}, keep_previous=True)
    seen, real = [], os.replace

    def spy(a, b):
        seen.append(p.exists())
        real(a, b)
        seen.append(p.exists())
    monkeypatch.setattr(os, "replace", spy)
    save_checkpoint(p, {"step": 2}, keep_previous=True)
    assert seen and all(seen)
    assert load_checkpoint(p)["step"] == 2 and load_checkpoint(previous_checkpoint(p))["step"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_pretraining_resumed_after_its_last_step_keeps_the_final_values(isolated):
    """A run killed after its last checkpoint (weights.pt not yet written) resumes at the end:
    its metrics still carry the last logged loss (issue: ``"final": {}``)."""
    from benchmark.stages.pretrain import run_pretrain
    cfg = _pretrain_cfg()
    cfg["runtime"] = {"ckpt_every": 1, "log_every": 1}
    full = run_pretrain(cfg, isolated / "a", progress=False)
    (isolated / "a" / "weights.pt").unlink()
    again = run_pretrain(cfg, isolated / "a", progress=False)
    assert again["steps"] == full["steps"] and again["final"] == full["final"] and "loss" in again["final"]
    assert (isolated / "a" / "weights.pt").exists()
