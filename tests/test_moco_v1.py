"""MoCo v1 (methods/moco_v1.py): the linear head, tau 0.07 InfoNCE by hand, the key encoder
moved only by its momentum update, the InstDisc augmentation (grayscale before the jitter),
the step schedule, export."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from tests import inputs
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import methods.moco_v1  # noqa: F401  (registers "moco")
from benchmark.engine.optim import Schedule
from benchmark.stages.pretrain import resolve_steps
from methods import augment as A
from methods import build_method, get_method
from methods.moco import MoCoV2
from methods.moco_v1 import MoCoV1


pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


def _small(**kw):
    torch.manual_seed(0)
    return build_method("moco", **{"backbone": "resnet18", "queue_size": 16, "crop_size": 32, **kw})


def _batch(m, n=4, seed=0):
    rng = np.random.default_rng(seed)
    recs = [{"image": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)} for _ in range(n)]
    return m.collate([m.views(r, np.random.default_rng([seed, i])) for i, r in enumerate(recs)])


def test_registered_as_moco_beside_v2_with_the_official_defaults():
    assert get_method("moco") is MoCoV1 and get_method("moco_v2") is MoCoV2
    cfg = MoCoV1.Config()
    assert (cfg.dim, cfg.queue_size, cfg.temperature, cfg.momentum) == (128, 65536, 0.07, 0.999)
    assert tuple(cfg.crop_scale) == (0.2, 1.0) and cfg.gray_before_jitter
    r = MoCoV1.recipe
    assert (r.optimizer, r.base_lr, r.lr_batch, r.batch_size, r.weight_decay, r.momentum) == \
        ("sgd", 0.03, 256, 256, 1e-4, 0.9)
    assert (r.schedule, tuple(r.milestones), r.epochs, r.warmup_epochs) == ("multistep", (0.6, 0.8), 200, 0)


def test_head_is_one_linear_layer_to_128():
    m = build_method("moco", queue_size=16)           # ResNet-50
    assert isinstance(m.proj_q, torch.nn.Linear) and isinstance(m.proj_k, torch.nn.Linear)
    assert (m.proj_q.in_features, m.proj_q.out_features) == (2048, 128) and m.proj_q.bias is not None
    # MoCo v2's head is an MLP: the two differ exactly there
    v2 = build_method("moco_v2", queue_size=16)
    assert isinstance(v2.proj_q, torch.nn.Sequential) and len(v2.proj_q) == 3


def test_loss_is_tau_007_info_nce_by_hand():
    m = _small()
    m.eval()   # BatchNorm from running statistics: each row's features are its own (Shuffle-BN moot)
    batch = _batch(m)
    with torch.no_grad():
        q = m.proj_q(m.encoder_q(batch["im_q"])).double()
        k = m.proj_k(m.encoder_k(batch["im_k"])).double()
        # a queue close to the queries, so the loss is far from 0
        m.queue.keys.copy_(F.normalize(F.normalize(q.float(), dim=1).repeat(4, 1) + 0.05 * torch.randn(16, 128), dim=1))
    queue = m.queue.keys.double().clone()
    out = m(batch)
    unit = lambda v: v / math.sqrt(float((v * v).sum()))
    def by_hand(t):
        total = 0.0
        for i in range(len(q)):
            qi, ki = unit(q[i]), unit(k[i])
            pos = math.exp(float(qi @ ki) / t)
            neg = sum(math.exp(float(qi @ unit(n)) / t) for n in queue)
            total += -math.log(pos / (pos + neg))
        return total / len(q)
    assert 1.0 < by_hand(0.07)
    assert float(out["loss"].detach()) == pytest.approx(by_hand(0.07), rel=1e-5)
    assert abs(by_hand(0.2) - by_hand(0.07)) > 0.1          # the temperature is what is pinned
    # the batch's keys entered the queue after the loss used the old entries
    assert int(m.queue.ptr) == 4
    torch.testing.assert_close(m.queue.keys[:4].double(), F.normalize(k, dim=1), rtol=1e-5, atol=1e-6)


def test_key_encoder_changes_only_through_its_momentum_update():
    m = _small()
    m.train()
    opt = torch.optim.SGD(m.param_groups()[0]["params"], lr=0.5)
    key_params = lambda: [p.detach().clone() for p in [*m.encoder_k.parameters(), *m.proj_k.parameters()]]
    before = key_params()
    out = m(_batch(m))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in [*m.encoder_k.parameters(), *m.proj_k.parameters()])
    opt.step()
    after_step = key_params()
    assert all(torch.equal(a, b) for a, b in zip(before, after_step))      # the SGD step leaves f_k
    online = [p.detach().clone() for p in [*m.encoder_q.parameters(), *m.proj_q.parameters()]]
    assert not all(torch.equal(a, b) for a, b in zip(online, before))     # f_q moved
    m.momentum_update(0.9)   # constant m: the progress does not enter
    for old, q, new in zip(before, online, key_params()):
        torch.testing.assert_close(new, 0.999 * old + 0.001 * q)


def test_views_shapes_and_aug_without_blur():
    m = build_method("moco", **MoCoV1.scales["tiny"]["method"])
    batch = _batch(m)
    assert batch["im_q"].shape == batch["im_k"].shape == (4, 3, 64, 64)
    p = [m.aug.draw(np.random.default_rng(i)) for i in range(400)]
    assert all(x.blur_sigma == 0 and not x.solarize and x.gray_first for x in p)
    assert all(len(x.jitter) == 4 for x in p)                              # ColorJitter always (no RandomApply)
    hues = [f for x in p for op, f in x.jitter if op == "hue"]
    assert max(hues) > 0.3 and min(hues) < -0.3 and max(map(abs, hues)) <= 0.4   # hue 0.4, not v2's 0.1
    assert 0.15 < np.mean([x.gray for x in p]) < 0.25
    assert not build_method("moco", queue_size=16, gray_before_jitter=False).aug.gray_first


def _smooth(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / (3 + c) + rng.random() * 6) * np.cos(yy / (4 + c)) for c in range(3)], -1)
    return ((img + 1) * 127.5).astype(np.uint8)


def test_grayscale_before_the_jitter_on_both_paths():
    """Official order: RandomGrayscale, then ColorJitter: a grayed view stays gray (every jitter
    op keeps r = g = b) but still takes brightness/contrast; jitter-then-gray differs."""
    p = A.PhotoParams(jitter=(("brightness", 1.3), ("saturation", 1.4), ("contrast", 0.7), ("hue", 0.3)),
                      gray=True, gray_first=True)
    img = _smooth(24, 20, 0)
    pil = np.asarray(A.apply_pil(Image.fromarray(img), p)).astype(float)
    assert np.abs(pil[..., 0] - pil[..., 1]).max() <= 1 and np.abs(pil[..., 1] - pil[..., 2]).max() <= 1
    plain_gray = np.asarray(Image.fromarray(img).convert("L"), dtype=float)
    assert np.abs(pil[..., 0] - plain_gray).mean() > 5                    # the jitter acted after the gray
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    ref = TF.rgb_to_grayscale(x[0], num_output_channels=3)
    for op, f in p.jitter:
        ref = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
               "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[op](ref, f)
    batched = A.photometric_batch(x, [p])[0]
    torch.testing.assert_close(batched, ref, atol=1e-5, rtol=1e-5)
    late = A.photometric_batch(x, [A.PhotoParams(jitter=p.jitter, gray=True)])[0]
    assert (late - batched).abs().mean() > 0.02
    assert np.abs(pil / 255 - batched.permute(1, 2, 0).numpy()).mean() < 3 / 255   # PIL path = device path


def test_step_schedule_drops_at_epochs_120_and_160_of_200():
    r = replace(MoCoV1.recipe, steps_per_epoch=10)
    total, warm = resolve_steps(r, 1000)
    assert (total, warm) == (2000, 0)
    sched = Schedule(0.03, total, warm, kind=r.schedule, milestones=tuple(round(f * total) for f in r.milestones))
    lr = [sched(s) for s in range(total)]
    epoch = lambda e: lr[e * 10]
    assert epoch(0) == epoch(119) == pytest.approx(0.03)
    assert lr[1199] == pytest.approx(0.03) and lr[1200] == pytest.approx(0.003)
    assert epoch(159) == pytest.approx(0.003) and epoch(160) == pytest.approx(0.0003) == lr[-1]


def test_export_is_the_query_backbone_in_torchvision_names():
    m = _small()
    state = m.export()
    ref = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(state) == ref
    torch.testing.assert_close(state["layer4.1.conv2.weight"], m.encoder_q.layer4[1].conv2.weight.detach())


def test_the_three_loaders_render_the_same_views(tmp_path):
    """recipe.loader cpu | cpu_draft | device: grayscale-first included on the device path."""
    for i in range(3):
        Image.fromarray(_smooth(160, 120, i)).save(tmp_path / f"{i}.jpg", quality=92)
    out = inputs.batches_by_loader(_small(), tmp_path)
    for loader in ("cpu_draft", "device"):
        for v in ("im_q", "im_k"):
            assert out[loader][v].shape == out["cpu"][v].shape == (3, 3, 32, 32)
            assert (out[loader][v] - out["cpu"][v]).abs().mean() < 0.06, (loader, v)
