"""InfoMin (methods/infomin.py): RandAugment's ops at their official magnitudes, the InfoMin
augmentation's order, the JigSaw patches and head, the loss (instance + JigSaw InfoNCE against
the same keys and queue, weighted by beta) by hand, the target network changing only through
its momentum update, the views and the export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import methods.infomin as infomin
from methods import build_method
from methods.config import ConfigError
from methods.randaug import RAND_AUGMENT_FILL, RAND_AUGMENT_OPS, rand_augment
from tests import inputs

TINY = {"backbone": "resnet18", "dim": 8, "hidden_dim": 16, "queue_size": 32, "crop_size": 32,
        "jigsaw_size": 36, "jigsaw_patch": 10, "bn_groups": 1, "shuffle_bn_splits": 1}


def _img(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- RandAugment ------------------------------------------------------------------------------
def test_rand_augment_ops_at_the_official_magnitudes():
    img = _img()
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    sign = -1 if ref.random() > 0.5 else 1
    resample = (Image.BILINEAR, Image.BICUBIC)[int(ref.integers(2))]
    want = img.rotate(sign * 30.0, resample=resample, fillcolor=RAND_AUGMENT_FILL)      # m 10: 30 degrees
    assert np.array_equal(np.asarray(RAND_AUGMENT_OPS["rotate"](img, 10.0, rng, RAND_AUGMENT_FILL)), np.asarray(want))
    rng, ref = np.random.default_rng(6), np.random.default_rng(6)
    sign = -1 if ref.random() > 0.5 else 1
    resample = (Image.BILINEAR, Image.BICUBIC)[int(ref.integers(2))]
    want = img.transform(img.size, Image.AFFINE, (1, 0, sign * 0.45 * 40, 0, 1, 0), resample=resample,
                         fillcolor=RAND_AUGMENT_FILL)                                 # 45% of the width
    got = RAND_AUGMENT_OPS["translate_x"](img, 10.0, rng, RAND_AUGMENT_FILL)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    enh = np.asarray(RAND_AUGMENT_OPS["color"](img, 5.0, None, None))
    assert np.array_equal(enh, np.asarray(ImageEnhance.Color(img).enhance(1.0)))    # 5 / 10 x 1.8 + 0.1
    assert np.array_equal(np.asarray(RAND_AUGMENT_OPS["posterize"](img, 10.0, None, None)),
                          np.asarray(ImageOps.posterize(img, 4)))                     # 4 bits at m 10
    assert np.array_equal(np.asarray(RAND_AUGMENT_OPS["solarize"](img, 10.0, None, None)), np.asarray(img))
    a = np.asarray(img).astype(int)
    sol = np.asarray(RAND_AUGMENT_OPS["solarize_add"](img, 10.0, None, None)).astype(int)
    assert np.array_equal(sol, np.where(a < 128, np.minimum(a + 110, 255), a))
    assert RAND_AUGMENT_FILL == (124, 116, 104)
    assert len(RAND_AUGMENT_OPS) == 15


def test_rand_augment_draws_two_ops_each_applied_half_the_time():
    img = _img(16, 16)
    rng = np.random.default_rng(0)
    counts = [len(rand_augment(img, rng)[1]) for _ in range(400)]
    assert max(counts) == 2 and 0.45 < np.mean(counts) / 2 < 0.55
    names = {n for _ in range(200) for n in rand_augment(img, rng, prob=1.0)[1]}
    assert names == set(RAND_AUGMENT_OPS)                                             # uniform over 15


def test_infomin_aug_jitters_and_blurs_then_rand_augments_then_grays(monkeypatch):
    seen = []
    monkeypatch.setattr(infomin, "rand_augment", lambda img, rng, *a: (seen.append(img) or img, []))
    img = _img()
    aug = infomin.InfoMinAug(jitter_blur=infomin.Photometric(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0, gray_p=0.0,
                                                             blur_p=0.0), gray_p=1.0)
    out = np.asarray(aug(img, np.random.default_rng(0)))
    before = np.asarray(seen[0])
    assert not np.array_equal(before, np.asarray(img))            # jittered before RandAugment
    assert not (before[..., 0] == before[..., 1]).all()           # and still in colour there
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()   # gray last


# -- JigSaw ---------------------------------------------------------------------------------
def test_jigsaw_patches_one_per_cell_inside_it_in_a_random_order():
    S, grid, patch = 36, 3, 10
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    view = torch.stack([ys.float(), xs.float(), torch.zeros(S, S)])
    orders = set()
    for seed in range(5):
        p = infomin.jigsaw_patches(view, grid, patch, np.random.default_rng(seed))
        assert p.shape == (9, 3, patch, patch)
        cells = []
        for q in p:
            y0, x0 = int(q[0, 0, 0]), int(q[1, 0, 0])
            assert (q[0] == torch.arange(y0, y0 + patch)[:, None]).all()      # a contiguous square
            r, c = y0 // 12, x0 // 12
            assert y0 + patch <= (r + 1) * 12 and x0 + patch <= (c + 1) * 12  # inside its 12-px cell
            cells.append((r, c))
        assert sorted(cells) == [(r, c) for r in range(3) for c in range(3)]
        orders.add(tuple(cells))
    assert len(orders) > 1


def test_jigsaw_head_concatenates_the_patches_of_each_image_in_order():
    torch.manual_seed(0)
    head = infomin.JigsawHead(6, 5, 4, patches=9)
    feats = torch.randn(2 * 9, 6)
    out = head(feats)
    assert out.shape == (2, 4) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)
    by_hand = F.normalize(head.fc2(torch.cat(list(head.fc1(feats[9:18])))), dim=0)
    assert torch.allclose(out[1], by_hand, atol=1e-6)


# -- the model ------------------------------------------------------------------------------
def test_views_and_batch_shapes():
    m = build_method("infomin", **TINY)
    samples = inputs.samples(m, 3, 48)
    assert samples[0]["im_q"].shape == (3, 32, 32) and samples[0]["jigsaw"].shape == (9, 3, 10, 10)
    batch = m.collate(samples)
    assert batch["jigsaw"].shape == (3, 9, 3, 10, 10) and batch["im_k"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_loss_is_beta_weighted_instance_and_jigsaw_infonce_by_hand(beta):
    torch.manual_seed(0)
    m = build_method("infomin", **{**TINY, "jigsaw_weight": beta, "temperature": 0.15})
    batch = m.collate(inputs.samples(m, 4, 48))
    queue = m.queue.keys.clone()
    with torch.no_grad():
        # with one BN group and one Shuffle-BN split, the forward's three passes are these
        q = F.normalize(m.proj_q(m.encoder_q(batch["im_q"])), dim=1)
        feats = m.encoder_q(batch["jigsaw"].flatten(0, 1))
        q_jig = F.normalize(m.jigsaw_q.fc2(m.jigsaw_q.fc1(feats).reshape(4, -1)), dim=1)
        k = F.normalize(m.proj_k(m.encoder_k(batch["im_k"])), dim=1)

    def nce(a):   # -log e^{a.k/t} / (e^{a.k/t} + sum_queue e^{a.n/t}), by rows
        rows = []
        for i in range(4):
            pos = float(a[i] @ k[i]) / 0.15
            negs = [float(a[i] @ n) / 0.15 for n in queue]
            top = max([pos] + negs)
            rows.append(-(pos - top - math.log(math.exp(pos - top) + sum(math.exp(v - top) for v in negs))))
        return sum(rows) / 4

    out = m(batch)
    assert math.isclose(out["loss_inst"].item(), nce(q), rel_tol=1e-4)
    assert math.isclose(out["loss_jig"].item(), nce(q_jig), rel_tol=1e-4)
    assert math.isclose(out["loss"].item(), (1 - beta) * nce(q) + beta * nce(q_jig), rel_tol=1e-4)
    assert torch.allclose(m.queue.keys[:4], k, atol=1e-5)            # the keys enter the queue after


def test_the_target_network_changes_only_through_its_momentum_update():
    torch.manual_seed(0)
    m = build_method("infomin", **{**TINY, "momentum": 0.9})
    assert not any(p.requires_grad for p in list(m.encoder_k.parameters()) + list(m.proj_k.parameters()))
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not any(id(p) in trained for p in m.encoder_k.parameters())
    assert all(id(p) in trained for p in m.jigsaw_q.parameters())
    opt = torch.optim.SGD(m.param_groups(), lr=0.5)
    k0 = {n: p.clone() for n, p in m.encoder_k.named_parameters()}
    m(m.collate(inputs.samples(m, 4, 48)))["loss"].backward()
    opt.step()
    assert all(torch.equal(p, k0[n]) for n, p in m.encoder_k.named_parameters())
    q1 = dict(m.encoder_q.named_parameters())
    m.momentum_update(0.5)
    for n, p in m.encoder_k.named_parameters():
        assert torch.allclose(p, 0.9 * k0[n] + 0.1 * q1[n], atol=1e-6)
    assert any(not torch.equal(p, k0[n]) for n, p in m.encoder_k.named_parameters())


def test_configs_that_cannot_cut_the_jigsaw_are_refused():
    with pytest.raises(ConfigError, match="method.jigsaw_patch"):
        infomin.InfoMin.Config.from_dict({**TINY, "jigsaw_patch": 13})     # 36 // 3 = 12-px cells
    with pytest.raises(ConfigError, match="method.jigsaw_weight"):
        infomin.InfoMin.Config.from_dict({**TINY, "jigsaw_weight": 1.5})


def test_device_loader_is_refused_and_the_recipe_is_the_official_one():
    from benchmark.experiments.config import pretrain_config
    with pytest.raises(ConfigError, match="recipe.loader"):
        pretrain_config("infomin", scale="tiny", recipe_overrides={"loader": "device"})
    r = infomin.InfoMin.recipe
    assert (r.optimizer, r.base_lr, r.lr_batch, r.weight_decay, r.schedule, r.epochs) == ("sgd", 0.03, 256, 1e-4,
                                                                                          "multistep", 200)
    assert [round(f * 200) for f in r.milestones] == [120, 160]


def test_export_is_the_query_backbone_in_torchvision_names():
    import torchvision
    m = build_method("infomin", **TINY)
    state = m.export()
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "proj", "jigsaw", "encoder")) for k in state)
    assert torch.equal(state["conv1.weight"], m.encoder_q.conv1.weight.detach())
    missing, unexpected = torchvision.models.resnet18(weights=None).load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
