"""DenseCL (methods/densecl.py): the whole loss by hand ((1 - lambda) global + lambda dense,
matches from the backbone maps, the pooled dense keys in the second queue), the momentum
target moved only by its update, the official heads and initialisation, the per-epoch cosine,
the tiny step on 64-px images and its single traced graph. Its one-way argmax correspondence
and dense InfoNCE (methods/losses.py) are tested in tests/test_losses.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.densecl  # noqa: F401  (registers "densecl")
from benchmark.engine.optim import Schedule
from benchmark.stages.pretrain import resolve_steps
from methods import build_method, get_method
from methods.backbones import resnet_stages
from methods.config import ConfigError
from methods.densecl import DenseCL
from tests import inputs

pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py

TINY = DenseCL.scales["tiny"]["method"]


def _small(**kw):
    torch.manual_seed(0)
    return build_method("densecl", **{**TINY, "queue_size": 16, **kw})


def _batch(m, n=2, seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    recs = [{"image": rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)} for _ in range(n)]
    return m.collate([m.views(r, np.random.default_rng([seed, i])) for i, r in enumerate(recs)])


def test_registered_with_the_official_defaults():
    assert get_method("densecl") is DenseCL
    c = DenseCL.Config()
    assert (c.dim, c.hidden_dim, c.num_grid, c.queue_size) == (128, 0, 0, 65536)
    assert (c.temperature, c.momentum, c.loss_lambda, c.init) == (0.2, 0.999, 0.5, "official")
    assert (c.crop_size, tuple(c.crop_scale)) == (224, (0.2, 1.0))
    r = DenseCL.recipe
    assert (r.optimizer, r.base_lr, r.lr_batch, r.batch_size, r.weight_decay, r.momentum) == \
        ("sgd", 0.03, 256, 256, 1e-4, 0.9)
    assert (r.schedule, r.cosine_per_epoch, r.warmup_epochs, r.min_lr, r.epochs) == ("cosine", True, 0, 0.0, 200)
    assert not DenseCL.sync_bn


def test_lr_is_a_cosine_to_zero_set_once_per_epoch():
    # mmcv CosineAnnealingLrUpdaterHook(by_epoch=True): epoch e runs at 0.03 (1 + cos(pi e / 200)) / 2
    r = DenseCL.recipe
    total, warm = resolve_steps(r, 1_281_167)
    spe = math.ceil(1_281_167 / 256)
    assert (total, warm) == (200 * spe, 0)
    sched = Schedule(r.base_lr * r.batch_size / r.lr_batch, total, warm, kind=r.schedule, min_lr=r.min_lr,
                     steps_per_epoch=total / r.epochs if r.cosine_per_epoch else None)
    for step in (0, spe - 1, spe, 57 * spe + 3, 199 * spe, total - 1):
        e = step // spe
        assert sched(step) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * e / 200)), abs=1e-12), step
    assert sched(spe - 1) == sched(0) == pytest.approx(0.03) and sched(spe) < sched(spe - 1)


def test_config_ranges_name_the_field():
    for key, bad in (("loss_lambda", 1.5), ("loss_lambda", -0.1), ("init", "xavier"), ("num_grid", -1),
                     ("momentum", 1.0)):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            build_method("densecl", **{**TINY, key: bad})


def test_whole_loss_by_hand_global_plus_dense_with_backbone_matches():
    m = _small(crop_size=96)                                  # 3x3 C5 grid: 9 positions
    # training-mode BatchNorm over the whole batch of 2 on both sides (one BN group each:
    # Shuffle-BN permutes it, which batch statistics do not see); in eval mode the random
    # network's C5 cells are dominated by their position and every match is the identity
    m.train()
    batch = _batch(m)
    with torch.no_grad():
        def run(enc, x):
            c5 = resnet_stages(enc.backbone, x)[-1]
            return (enc.neck.global_head(c5.mean((2, 3))).double(),
                    enc.neck.dense_head(c5).flatten(2).double(), c5.flatten(2).double())
        q, qg, fq = run(m.encoder_q, batch["im_q"])
        k, kg, fk = run(m.encoder_k, batch["im_k"])
        # queues close to the queries, so both losses are far from 0
        m.queue.keys.copy_(F.normalize(F.normalize(q.float(), dim=1).repeat(8, 1) + 0.1 * torch.randn(16, 128), dim=1))
        rows = qg.permute(0, 2, 1).reshape(-1, 128).float()
        m.dense_queue.keys.copy_(F.normalize(F.normalize(rows[:16], dim=1) + 0.1 * torch.randn(16, 128), dim=1))
    assert fq.shape == (2, 512, 9)
    queue_g, queue_d = m.queue.keys.double().clone(), m.dense_queue.keys.double().clone()
    out = m(batch)
    unit = lambda v: v / math.sqrt(float((v * v).sum()))
    t = 0.2

    def nce(qi, ki, queue):
        pos = float(unit(qi) @ unit(ki)) / t
        negs = [float(unit(qi) @ unit(n)) / t for n in queue]
        return -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs))

    def best(fa, fb, n, i):
        sims = [float(unit(fa[n, :, i]) @ unit(fb[n, :, j])) for j in range(fb.shape[2])]
        return int(np.argmax(sims))

    lg = np.mean([nce(q[n], k[n], queue_g) for n in range(2)])
    match = [[best(fq, fk, n, i) for i in range(9)] for n in range(2)]
    ld = np.mean([nce(qg[n, :, i], kg[n, :, match[n][i]], queue_d) for n in range(2) for i in range(9)])
    assert 0.5 < lg and 0.5 < ld
    assert float(out["loss_global"]) == pytest.approx(lg, rel=1e-4)
    assert float(out["loss_dense"]) == pytest.approx(ld, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(0.5 * lg + 0.5 * ld, rel=1e-4)
    # matched on the projected grids instead, the dense loss would differ
    proj = [[best(qg, kg, n, i) for i in range(9)] for n in range(2)]
    assert proj != match
    ld_proj = np.mean([nce(qg[n, :, i], kg[n, :, proj[n][i]], queue_d) for n in range(2) for i in range(9)])
    assert abs(ld_proj - ld) > 1e-3
    # after the loss: global keys into queue 1, the grid's mean (before normalising) into queue 2
    assert int(m.queue.ptr) == int(m.dense_queue.ptr) == 2
    torch.testing.assert_close(m.queue.keys[:2].double(), F.normalize(k, dim=1), rtol=1e-5, atol=1e-6)
    pooled = F.normalize(kg.mean(2), dim=1)
    torch.testing.assert_close(m.dense_queue.keys[:2].double(), pooled, rtol=1e-5, atol=1e-6)
    assert (F.normalize(F.normalize(kg, dim=1).mean(2), dim=1) - pooled).abs().max() > 1e-4


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_loss_is_one_minus_lambda_global_plus_lambda_dense(lam):
    m = _small(loss_lambda=lam)
    m.train()
    torch.manual_seed(2)
    out = m(_batch(m))
    lg, ld = float(out["loss_global"]), float(out["loss_dense"])
    assert abs(lg - ld) > 1e-2
    assert float(out["loss"].detach()) == pytest.approx((1 - lam) * lg + lam * ld, rel=1e-6)
    out["loss"].backward()
    dense_grad = m.encoder_q.neck.dense_head[0].weight.grad
    global_grad = m.encoder_q.neck.global_head[0].weight.grad
    assert (dense_grad is not None and dense_grad.abs().sum() > 0) == (lam > 0)
    assert (global_grad is not None and global_grad.abs().sum() > 0) == (lam < 1)


def test_key_encoder_changes_only_through_its_momentum_update():
    m = _small()
    m.train()
    opt = torch.optim.SGD(m.param_groups()[0]["params"], lr=0.5)
    key_params = lambda: [p.detach().clone() for p in m.encoder_k.parameters()]
    before = key_params()
    m(_batch(m))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.encoder_k.parameters())
    assert {id(p) for p in m.param_groups()[0]["params"]} == {id(p) for p in m.encoder_q.parameters()}
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, key_params()))     # the SGD step leaves the keys
    online = [p.detach().clone() for p in m.encoder_q.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(online, before))      # the query encoder moved
    names = [n for n, _ in m.encoder_k.named_parameters()]
    assert any(n.startswith("neck.dense_head") for n in names) and any(n.startswith("backbone.") for n in names)
    m.momentum_update(0.7)   # constant m: the progress does not enter
    for old, q, new in zip(before, online, key_params()):
        torch.testing.assert_close(new, 0.999 * old + 0.001 * q)


def test_r50_heads_and_the_official_initialisation():
    torch.manual_seed(0)
    m = build_method("densecl", queue_size=16)              # ResNet-50
    neck = m.encoder_q.neck
    lin = [l for l in neck.global_head if isinstance(l, torch.nn.Linear)]
    conv = [l for l in neck.dense_head if isinstance(l, torch.nn.Conv2d)]
    assert [(l.in_features, l.out_features) for l in lin] == [(2048, 2048), (2048, 128)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in conv] == [(2048, 2048, (1, 1)), (2048, 128, (1, 1))]
    assert [type(l).__name__ for l in neck.dense_head] == ["Conv2d", "ReLU", "Conv2d"]      # no BN
    assert [type(l).__name__ for l in neck.global_head] == ["Linear", "ReLU", "Linear"]
    assert m.queue.keys.shape == m.dense_queue.keys.shape == (16, 128)
    assert not torch.equal(m.queue.keys, m.dense_queue.keys)
    # Linears: kaiming-normal fan_in (std sqrt(2/2048)), bias 0; the 1x1 convs keep PyTorch's
    # default (uniform within 1/sqrt(fan_in))
    for l in lin:
        assert float(l.weight.detach().std()) == pytest.approx(math.sqrt(2 / 2048), rel=0.05) and not l.bias.any()
    for c in conv:
        assert float(c.weight.detach().abs().max()) <= 1 / math.sqrt(2048) and c.bias.abs().sum() > 0
    # backbone convs: fan_in (conv1: 3 x 7 x 7 = 147 inputs), not torchvision's fan_out (64 x 49)
    w = m.encoder_q.backbone.conv1.weight.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 147), rel=0.05)
    tv = build_method("densecl", **{**TINY, "queue_size": 16, "init": "torchvision"})
    assert float(tv.encoder_q.backbone.conv1.weight.detach().std()) == pytest.approx(math.sqrt(2 / 3136), rel=0.05)
    # export: the query backbone in bare torchvision names, heads dropped
    state = m.export()
    assert "conv1.weight" in state and "layer4.2.bn3.running_var" in state
    assert not any(k.startswith(("fc.", "neck", "backbone.")) for k in state)
    assert torch.equal(state["layer1.0.conv1.weight"], m.encoder_q.backbone.layer1[0].conv1.weight)


def test_packed_outputs_unpack_to_the_heads_outputs_and_num_grid_pools():
    m = _small(num_grid=2)
    m.eval()
    x = _batch(m)["im_q"]                                     # 96-px crops: 3x3 C5, pooled to 2x2
    with torch.no_grad():
        g, pooled, grid, c5 = m.encoder_q.unpack(m.encoder_q(x))
        raw = resnet_stages(m.encoder_q.backbone, x)[-1]
        want = m.encoder_q.neck.dense_head(F.adaptive_avg_pool2d(raw, 2)).flatten(2)
    # the matched backbone maps are pooled to the same 2x2 grid, so a match indexes the grid
    assert (grid.shape, c5.shape, g.shape, pooled.shape) == ((2, 128, 4), (2, 512, 4), (2, 128), (2, 128))
    assert raw.shape[2:] == (3, 3)
    torch.testing.assert_close(grid, want)
    torch.testing.assert_close(c5, F.adaptive_avg_pool2d(raw, 2).flatten(2))
    torch.testing.assert_close(pooled, want.mean(2))
    torch.testing.assert_close(g, m.encoder_q.neck.global_head(raw.mean((2, 3))))
    m.train()
    assert torch.isfinite(m(_batch(m))["loss"])              # the pooled grid trains end to end
    # the packed outputs through two query BN groups and Shuffle-BN over two splits
    two = _small(bn_groups=2)
    two.train()
    out = two(_batch(two, n=4))
    assert torch.isfinite(out["loss"]) and int(two.dense_queue.ptr) == 4


def test_tiny_scale_step_on_64px_images():
    torch.manual_seed(0)
    m = build_method("densecl", **inputs.method_config("densecl", DenseCL.scales["tiny"]))
    assert m.queue.size == m.dense_queue.size == 1024 and DenseCL.scales["tiny"]["recipe"]["batch_size"] == 64
    batch = m.collate(inputs.samples(m, 4, 64))               # 64-px images, 96-px views
    assert batch["im_q"].shape == batch["im_k"].shape == (4, 3, 96, 96)
    assert not torch.equal(batch["im_q"], batch["im_k"])      # two independent draws
    m.train()
    out = m(batch)
    assert torch.isfinite(out["loss"]) and all(torch.as_tensor(v).numel() == 1 for v in out.values())
    out["loss"].backward()
    for p in (m.encoder_q.backbone.conv1.weight, m.encoder_q.neck.dense_head[2].weight,
              m.encoder_q.neck.global_head[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert int(m.queue.ptr) == int(m.dense_queue.ptr) == 4


def test_step_traces_as_one_graph():
    # the correspondence (argmax + gather) and both enqueues run on the device: with both
    # captures off, a host sync or a data-dependent shape would break the graph here
    import torch._dynamo as dynamo
    m = _small(crop_size=64)
    batch = _batch(m, n=4)
    with dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        e = dynamo.explain(m)(batch)
    dynamo.reset()
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:120] for b in e.break_reasons]
