"""The official codes' schedule and optimiser details as recipe fields (benchmark/engine/optim.py,
methods/base.py PretrainRecipe): the warm-up's start and the cosine's floor of SoCo's/PixPro's
contrast/lr_scheduler.py, mmcv's per-epoch cosine (InsLoc), the eps of their LARS; at their
defaults every earlier run trains (and is keyed) as before."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmark.engine.optim import LARS, Schedule, build_optimizer
from benchmark.runs.identity import strip_defaults
from methods import get_method
from methods.base import PretrainRecipe
from methods.config import ConfigError
from tests.conftest import MICRO_DATA

NEW = ("warmup_start_factor", "min_lr", "cosine_per_epoch", "lars_eps")


def official_warmup_cosine(step: int, base: float, warmup: int, total: int, multiplier: float,
                           eta_min: float) -> float:
    """SoCo/PixPro contrast/lr_scheduler.py stepped once per iteration: GradualWarmupScheduler
    (base / m * ((m - 1) * t / W + 1) up to t = W), then CosineAnnealingLR(eta_min,
    T_max = total - W) in its closed form."""
    if step <= warmup:
        return base / multiplier * ((multiplier - 1) * step / warmup + 1)
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_warmup_start_and_cosine_floor_are_the_official_ones():
    s = Schedule(1.0, total_steps=110, warmup_steps=10, warmup_factor=0.01, min_lr=1e-6)
    # hand-computed: lr / 100 at step 0, 0.01 (99 / 2 + 1) at 5, base at 10, floor at the end
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.505)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(1e-6 + (1 - 1e-6) / 2)
    assert s(110) == pytest.approx(1e-6, rel=1e-9)
    for step in range(111):
        assert s(step) == pytest.approx(official_warmup_cosine(step, 1.0, 10, 110, 100, 1e-6), rel=1e-12)


def test_the_defaults_give_the_earlier_schedule_bit_for_bit():
    """warm-up from 0, cosine to 0: what every stored run trained with."""
    s = Schedule(0.3, total_steps=50, warmup_steps=7, warmup_factor=0.0)
    for step in range(51):
        a = step / 7
        old = (0.3 * 0.5 * (1 + math.cos(0.0)) * (0.0 * (1 - a) + a) if step < 7 else
               0.3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 7) / 43))))
        assert s(step) == old


def test_cosine_per_epoch_holds_each_epochs_lr():
    """mmcv CosineAnnealingLrUpdaterHook(by_epoch=True), InsLoc's lr_config: lr of epoch e =
    base (1 + cos(pi e / E)) / 2 for all of its steps."""
    E, spe, base = 200, 5, 0.03
    s = Schedule(base, total_steps=E * spe, steps_per_epoch=spe)
    per_step = Schedule(base, total_steps=E * spe)
    for step in range(E * spe):
        e = step // spe
        assert s(step) == pytest.approx(base * (1 + math.cos(math.pi * e / E)) / 2, rel=1e-12)
        assert s(step) >= per_step(step)
    assert s(E * spe - 1) > 0          # the last epoch's lr: base (1 + cos(pi 199/200)) / 2
    # the gap to a per-step cosine is at most pi / (2 E) of the base lr within an epoch
    gap = max(s(t) - per_step(t) for t in range(E * spe)) / base
    assert (spe - 1) / spe * math.pi / (2 * E) * 0.99 < gap <= math.pi / (2 * E)
    # a fractional epoch (the tiny scale: 0.25 steps per epoch) moves it every step
    tiny = Schedule(base, total_steps=50, steps_per_epoch=0.25)
    assert [tiny(t) for t in range(51)] == [Schedule(base, total_steps=50)(t) for t in range(51)]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Schedule(base, 10, steps_per_epoch=0)


def test_lars_eps_in_the_trust_ratio_denominator():
    """Official contrast/lars.py: trust = eta ||w|| / (||g + wd w|| + eps), eps 1e-8; a
    gradient of norm 1e-8 shows it: trust 1e-3 * 5 / 2e-8 = 2.5e5 instead of 5e5."""
    def step(eps):
        w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))   # ||w|| = 5
        b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, eps=eps)
        w.grad = torch.tensor([[0.0, 1e-8]], dtype=torch.float64)
        b.grad = torch.tensor([2.0], dtype=torch.float64)                    # 1-d: never adapted
        opt.step()
        return w.detach(), b.detach()
    w, b = step(1e-8)
    torch.testing.assert_close(w, torch.tensor([[3.0, 4.0 - 0.1 * 2.5e5 * 1e-8]], dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([1.0 - 0.1 * 2.0], dtype=torch.float64))
    w0, _ = step(0.0)
    torch.testing.assert_close(w0, torch.tensor([[3.0, 4.0 - 0.1 * 5e5 * 1e-8]], dtype=torch.float64))
    # with weight decay the norm is the decayed gradient's (wd folded in before the ratio)
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = build_optimizer([w], "lars", 1.0, 0.1, momentum=0.0, lars_eps=1e-8)
    w.grad = torch.tensor([[0.0, 0.6]], dtype=torch.float64)
    d = torch.tensor([[0.3, 1.0]], dtype=torch.float64)                     # g + 0.1 w
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64)
                               - 1e-3 * 5 / (d.norm() + 1e-8) * d)
    with pytest.raises(ValueError, match="lars_eps"):
        build_optimizer([w], "sgd", 0.1, 0.0, lars_eps=1e-8)


def test_recipe_fields_checked_and_left_out_at_their_defaults():
    for bad, field in (({"warmup_start_factor": 1.5}, "warmup_start_factor"), ({"min_lr": -1.0}, "min_lr"),
                       ({"schedule": "multistep", "cosine_per_epoch": True}, "cosine_per_epoch"),
                       ({"optimizer": "sgd", "lars_eps": 1e-8}, "lars_eps")):
        with pytest.raises(ConfigError, match=f"recipe.{field}"):
            PretrainRecipe.from_dict(bad)
    # MoCo v2 and Supervised keep their configs (so their keys); SoCo and InsLoc set the
    # official values, so those enter their runs' configs
    for name in ("moco_v2", "supervised"):
        kept = strip_defaults(PretrainRecipe, get_method(name).recipe.to_dict())
        assert not set(NEW) & set(kept)
    soco = strip_defaults(PretrainRecipe, get_method("soco").recipe.to_dict())
    assert (soco["warmup_start_factor"], soco["min_lr"], soco["lars_eps"]) == (0.01, 1e-6, 1e-8)
    insloc = strip_defaults(PretrainRecipe, get_method("insloc").recipe.to_dict())
    assert insloc["cosine_per_epoch"] is True and "min_lr" not in insloc   # mmcv min_lr=0.0


def test_pretraining_follows_the_recipes_schedule(isolated):
    """The pretraining stage builds its schedule from the recipe: the logged lr of every step
    is the one the fields give (2 steps per epoch, 1 warm-up epoch, per-epoch cosine)."""
    from benchmark.experiments.config import pretrain_config
    from benchmark.stages.pretrain import run_pretrain
    rec = {"batch_size": 4, "steps_per_epoch": 2, "base_lr": 0.4, "warmup_epochs": 1,
           "warmup_start_factor": 0.25, "min_lr": 0.001, "cosine_per_epoch": True}
    cfg = pretrain_config("moco_v2", scale="tiny", seed=0, epochs=3,
                          method_overrides={"queue_size": 32, "crop_size": 32},
                          recipe_overrides=rec, data_overrides=MICRO_DATA)
    assert {k: cfg["recipe"][k] for k in ("warmup_start_factor", "min_lr", "cosine_per_epoch")} == \
        {"warmup_start_factor": 0.25, "min_lr": 0.001, "cosine_per_epoch": True}
    cfg["runtime"] = {"ckpt_every": 100, "log_every": 1}
    run_pretrain(cfg, isolated / "a", progress=False)
    lrs = [json.loads(line)["lr"] for line in (isolated / "a" / "log.jsonl").read_text().splitlines()]
    lr = 0.4 * cfg["recipe"]["batch_size"] / 256   # the tiny scale divides a recipe batch
    cos = lambda t: 0.001 + (lr - 0.001) * (1 + math.cos(math.pi * t)) / 2
    assert lrs == pytest.approx([0.25 * lr, 0.25 * lr + 0.75 * lr / 2, cos(0), cos(0), cos(0.5), cos(0.5)])
