"""BYOL (methods/byol.py): the symmetric normalised-MSE loss by hand, the target moved only by
its EMA with the cosine tau schedule, the asymmetric views and the official colour ops, the
official crop, the LARS groups, the warm-up + cosine lr, export."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest

from tests import inputs
import torch
import torchvision
from PIL import Image

import methods.byol  # noqa: F401  (registers "byol")
from benchmark.engine.optim import LARS, Schedule
from benchmark.stages.pretrain import resolve_steps
from methods import augment as A
from methods import build_method, get_method
from methods.byol import BYOL, official_crop

TINY = BYOL.scales["tiny"]["method"]


pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


def _small(**kw):
    torch.manual_seed(0)
    return build_method("byol", **{**TINY, "view_size": 32, **kw})


def _batch(m, n=4, seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    recs = [{"image": rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)} for _ in range(n)]
    return m.collate([m.views(r, np.random.default_rng([seed, i])) for i, r in enumerate(recs)])


def test_registered_with_the_official_defaults():
    assert get_method("byol") is BYOL
    c = BYOL.Config()
    assert (c.proj_hidden_dim, c.proj_dim, c.pred_hidden_dim, c.momentum) == (4096, 256, 4096, 0.996)
    assert (c.crop, c.jitter_style, c.target_init, tuple(c.crop_scale)) == ("official", "tf", "independent", (0.08, 1.0))
    r = BYOL.recipe
    assert (r.optimizer, r.base_lr, r.lr_batch, r.batch_size, r.weight_decay, r.momentum) == \
        ("lars", 0.2, 256, 4096, 1.5e-6, 0.9)
    assert (r.schedule, r.warmup_epochs, r.epochs, r.warmup_start_factor, r.min_lr, r.lars_eps) == \
        ("cosine", 10, 1000, 0.0, 0.0, 0.0)
    m = build_method("byol")                                 # ResNet-50: 2048-4096-256, 256-4096-256
    dims = lambda h: [(l.in_features, l.out_features, l.bias is not None) for l in h if isinstance(l, torch.nn.Linear)]
    assert dims(m.projector) == [(2048, 4096, False), (4096, 256, False)]
    assert dims(m.predictor) == [(256, 4096, False), (4096, 256, False)]
    assert isinstance(m.projector[1], torch.nn.BatchNorm1d) and isinstance(m.projector[2], torch.nn.ReLU)
    assert not hasattr(m, "target_predictor")


def test_loss_is_the_symmetric_normalised_mse_by_hand():
    m = _small()
    m.train()
    batch = _batch(m)
    torch.manual_seed(1)
    out = m(batch)
    with torch.no_grad():   # the same modules, the same per-view BatchNorm batches
        p = [m.predictor(m.projector(m.encoder(batch[v]))).double() for v in ("view1", "view2")]
        z = [m.target_projector(m.target_encoder(batch[v])).double() for v in ("view1", "view2")]

    def sq_dist(a, b):   # official helpers.regression_loss: ||a/|a| - b/|b|||^2 per row
        return [float(((a[i] / a[i].norm() - b[i] / b[i].norm()) ** 2).sum()) for i in range(len(a))]
    by_hand = np.mean([x + y for x, y in zip(sq_dist(p[0], z[1]), sq_dist(p[1], z[0]))])
    assert float(out["loss"].detach()) == pytest.approx(by_hand, rel=1e-5)
    assert float(out["loss_12"]) == pytest.approx(np.mean(sq_dist(p[0], z[1])), rel=1e-5)
    assert 0 < by_hand < 8
    # no gradient reaches the target
    out["loss"].backward()
    assert all(q.grad is None for q in [*m.target_encoder.parameters(), *m.target_projector.parameters()])
    assert m.predictor[0].weight.grad.abs().sum() > 0 and m.encoder.conv1.weight.grad.abs().sum() > 0


def test_regression_on_a_literal_case():
    """2 - 2cos(p, z) on two rows: (1, 0) vs (1, 1) -> 2 - sqrt 2; (0, 2) vs (0, -1) -> 4."""
    from methods.losses import byol_regression
    p, z = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert float(byol_regression(p, z)) == pytest.approx((2 - math.sqrt(2) + 4) / 2)


@pytest.fixture(scope="module")
def tiny_0996():
    torch.manual_seed(0)
    return build_method("byol", **{**TINY, "momentum": 0.996})


@pytest.mark.parametrize("progress, tau", [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0)])
def test_tau_schedule_at_0_half_and_end(progress, tau, tiny_0996):
    """tau = 1 - (1 - 0.996)(cos(pi k / K) + 1) / 2: 0.996 at k = 0, 0.998 at K/2, 1 at K."""
    m = copy.deepcopy(tiny_0996)
    old = [q.detach().clone() for q in m.target_encoder.parameters()]
    online = [q.detach().clone() for q in m.encoder.parameters()]
    m.momentum_update(progress)
    assert m.current_momentum == pytest.approx(tau, abs=1e-12)
    for o, t, new in zip(online, old, m.target_encoder.parameters()):
        torch.testing.assert_close(new, tau * t + (1 - tau) * o)
    if progress == 1.0:
        assert all(torch.equal(t, n) for t, n in zip(old, m.target_encoder.parameters()))


def test_target_changes_only_through_its_momentum_update():
    m = _small()
    m.train()
    params = m.param_groups()[0]["params"]
    ids = {id(q) for q in params}
    target = [*m.target_encoder.parameters(), *m.target_projector.parameters()]
    assert not any(id(q) in ids for q in target) and not any(q.requires_grad for q in target)
    assert {id(q) for q in [*m.encoder.parameters(), *m.projector.parameters(), *m.predictor.parameters()]} == ids
    before = [q.detach().clone() for q in target]
    opt = LARS(m.param_groups(), lr=1.0, weight_decay=1.5e-6)
    m(_batch(m))["loss"].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, target))             # the LARS step leaves xi
    online = [q.detach().clone() for q in [*m.encoder.parameters(), *m.projector.parameters()]]
    m.momentum_update(0.25)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 0.25) + 1) / 2                 # tiny tau_base 0.9
    for t, o, new in zip(before, online, target):
        torch.testing.assert_close(new, tau * t + (1 - tau) * o)


def test_target_init_independent_by_default_copy_as_a_switch():
    a = _small()
    assert not torch.equal(a.encoder.conv1.weight, a.target_encoder.conv1.weight)   # its own random draw
    b = _small(target_init="copy")
    for o, t in zip([*b.encoder.parameters(), *b.projector.parameters()],
                    [*b.target_encoder.parameters(), *b.target_projector.parameters()]):
        assert torch.equal(o, t)


def test_zero_init_residual_as_haiku():
    m = build_method("byol")
    assert all(not b.bn3.weight.detach().any() for layer in (m.encoder.layer1, m.encoder.layer4) for b in layer)


def test_views_are_asymmetric_with_the_official_probabilities():
    m = _small()
    batch = _batch(m)
    assert batch["view1"].shape == batch["view2"].shape == (4, 3, 32, 32)
    t1, t2 = m.aug
    d1 = [t1.draw(np.random.default_rng(i)) for i in range(3000)]
    d2 = [t2.draw(np.random.default_rng(i)) for i in range(3000)]
    assert all(p.blur_sigma > 0 and not p.solarize for p in d1)                # T: blur 1.0, solarize 0
    assert 0.08 < np.mean([p.blur_sigma > 0 for p in d2]) < 0.12              # T': blur 0.1
    assert 0.18 < np.mean([p.solarize for p in d2]) < 0.22                    # T': solarize 0.2
    for d in (d1, d2):
        assert 0.78 < np.mean([bool(p.jitter) for p in d]) < 0.82             # jitter p 0.8
        assert 0.18 < np.mean([p.gray for p in d]) < 0.22                     # grayscale 0.2
        ops = {}
        for p in d:
            for op, f in p.jitter:
                ops.setdefault(op, []).append(f)
        assert set(ops) == {"brightness_add", "contrast_channel", "saturation_hsv", "hue"}
        for op, lo, hi in (("brightness_add", -0.4, 0.4), ("contrast_channel", 0.6, 1.4),
                           ("saturation_hsv", 0.8, 1.2), ("hue", -0.1, 0.1)):
            assert lo <= min(ops[op]) < lo + 0.02 and hi - 0.02 < max(ops[op]) <= hi, op
    tv = build_method("byol", **{**TINY, "jitter_style": "torchvision"}).aug[0]
    assert {op for i in range(50) for op, _ in tv.draw(np.random.default_rng(i)).jitter} <= \
        {"brightness", "contrast", "saturation", "hue"}


def test_official_colour_ops_by_hand():
    x = torch.tensor([[0.8, 0.1], [0.5, 0.3]]).expand(3, 2, 2).clone()
    x[1] *= 0.5
    x[2] = torch.tensor([[0.2, 0.9], [0.05, 0.6]])
    f = lambda v: torch.full((1, 1, 1, 1), v)
    # brightness: x + delta, clipped
    torch.testing.assert_close(A._jitter_op("brightness_add", x[None], f(0.3))[0], (x + 0.3).clamp(0, 1))
    # contrast: about each channel's own mean (torchvision's is about the grayscale mean)
    m = x.mean((1, 2), keepdim=True)
    torch.testing.assert_close(A._jitter_op("contrast_channel", x[None], f(1.4))[0], (1.4 * (x - m) + m).clamp(0, 1))
    # saturation in HSV: (0.8, 0.4, 0.2): v 0.8, s 0.75, h 1/18; s x 0.5 -> (0.8, 0.6, 0.5)
    px = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(A._jitter_op("saturation_hsv", px, f(0.5)).flatten(), torch.tensor([0.8, 0.6, 0.5]))
    tv = A._jitter_op("saturation", px, f(0.5)).flatten()                 # torchvision: a blend with gray
    assert (tv - torch.tensor([0.8, 0.6, 0.5])).abs().max() > 0.1
    # the PIL path (workers) computes the same ops, rounding to uint8 after each (hue: PIL's
    # own, tests/test_loader_paths.py)
    img = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    p = A.PhotoParams(jitter=(("saturation_hsv", 1.2), ("brightness_add", -0.2), ("contrast_channel", 0.7)))
    pil = np.asarray(A.apply_pil(Image.fromarray(img), p)) / 255
    ten = A.photometric_batch(torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255, [p])[0]
    assert np.abs(pil - ten.permute(1, 2, 0).numpy()).max() < 2 / 255


def test_official_crop_clips_instead_of_redrawing():
    """Full area at ratio 4/3 on a 200 x 100 image: 163 x 122, the height clipped to 100."""
    x0, y0, x1, y1 = official_crop(200, 100, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    assert (x1 - x0, y1 - y0, y0) == (163, 100, 0) and 0 <= x0 <= 37
    areas = [(lambda b: (b[2] - b[0]) * (b[3] - b[1]) / 4e4)(official_crop(200, 200, np.random.default_rng(i)))
             for i in range(2000)]
    assert min(areas) < 0.1 and max(areas) > 0.95 and 0.45 < np.mean(areas) < 0.6   # U(0.08, 1), clipped
    m = _small()
    g = m.geometry(200, 100, np.random.default_rng(3))
    assert g.out_size == (32, 32) and 0 <= g.crop[0] < g.crop[2] <= 200 and 0 <= g.crop[1] < g.crop[3] <= 100


def test_lars_groups_exclude_exactly_biases_and_batchnorm():
    """Our LARS leaves every 1-d tensor out of weight decay and adaptation; in BYOL's online
    network those are exactly the biases and BN parameters (official exclude_bias_and_norm)."""
    m = build_method("byol", **TINY)
    norm_or_bias = {id(p) for mod in m.modules() for name, p in mod.named_parameters(recurse=False)
                    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) or name == "bias"}
    for p in m.param_groups()[0]["params"]:
        assert (p.ndim <= 1) == (id(p) in norm_or_bias)


def test_lr_is_the_official_warmup_then_cosine():
    """byol/utils/schedules.py learning_schedule: step / warmup x lr, then cosine to 0 over the rest."""
    r = replace(BYOL.recipe, steps_per_epoch=2, epochs=100)
    total, warm = resolve_steps(r, 10 ** 6)
    lr = r.base_lr * r.batch_size / r.lr_batch
    assert (total, warm, lr) == (200, 20, pytest.approx(3.2))
    sched = Schedule(lr, total, warm, kind=r.schedule, warmup_factor=r.warmup_start_factor, min_lr=r.min_lr)
    def official(k):
        if k < warm:
            return k / warm * lr
        return lr * 0.5 * (1 + math.cos(math.pi * min(k - warm, total - warm) / (total - warm)))
    for k in range(total):
        assert sched(k) == pytest.approx(official(k), abs=1e-12)


def test_export_is_the_online_backbone_in_torchvision_names():
    m = _small()
    state = m.export()
    ref = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(state) == ref
    torch.testing.assert_close(state["conv1.weight"], m.encoder.conv1.weight.detach())
    assert not torch.equal(state["conv1.weight"], m.target_encoder.conv1.weight)


def test_the_three_loaders_render_the_same_views(tmp_path):
    """recipe.loader cpu | cpu_draft | device: the same drawn views, pixels within the loaders'
    tolerance (PIL per sample vs batched tensors; tests/test_loader_paths.py)."""
    for i in range(3):
        a = np.random.default_rng(i).integers(0, 256, (15, 20, 3), dtype=np.uint8)
        Image.fromarray(a).resize((160, 120), Image.BICUBIC).save(tmp_path / f"{i}.jpg", quality=92)
    out = inputs.batches_by_loader(_small(), tmp_path)
    for loader in ("cpu_draft", "device"):
        for v in ("view1", "view2"):
            assert out[loader][v].shape == out["cpu"][v].shape == (3, 3, 32, 32)
            assert (out[loader][v] - out["cpu"][v]).abs().mean() < 0.06, (loader, v)
