"""ReSim-FPN^T (methods/resim.py): precise RoI pooling (methods/roi.py) against hand values
and a dense integral, window alignment through rendered pixels (after known crops and flips,
and against ``ViewGeometry``: tests/test_geometry.py), the masking of invalid windows, the
region loss by hand, the negative groups, the 1:1:1 total, the momentum target, the FPN
export, one traced graph, and the contract at the tiny scale."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.resim  # noqa: F401  (registers "resim"; methods/__init__.py does not import it yet)
from methods import build_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD, Photometric, apply_pil, render_view, to_tensor
from methods.geometry import ViewGeometry, align_windows, geometry_tensor
from methods.resim import ReSim, key_cells, region_info_nce, render_resim_view
from methods.roi import prroi_pool
from tests import inputs

pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py

TINY = ReSim.scales["tiny"]["method"]
NO_AUG = Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def make(**kw) -> ReSim:
    torch.manual_seed(0)
    return build_method("resim", **{**TINY, **kw})


def tiny_batch(m: ReSim, n: int = 4) -> dict:
    return m.collate(inputs.samples(m, n, 64))


# --------------------------------------------------------------------------- pooling
def test_prroi_pool_hand_values():
    # bilinear surface of [[1, 2], [3, 4]] with features at integer positions: f(x, y) = 1 + x + 2y
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    boxes = torch.tensor([[[0, 0, 1, 1],        # mean of the 4 corners: 2.5
                           [0, 0, 0.5, 0.5],    # 1 + 0.25 + 0.5
                           [-1, 0, 0, 1],       # zero padding: mean of (1 + x) over [-1, 0] (1/2) x mean of 1 + 2y (2)
                           [0.5, 0.2, 0.5, 1],  # empty: 0
                           [0, 0, 2, 2]]])      # at spatial scale 1/2 below
    got = prroi_pool(f, boxes[:, :4], 1.0)[0, :, 0]
    assert torch.allclose(got, torch.tensor([2.5, 1.75, 1.0, 0.0]))
    assert torch.allclose(prroi_pool(f, boxes[:, 4:], 0.5)[0, 0], torch.tensor([2.5]))   # no half-pixel offset


def test_prroi_pool_equals_the_dense_integral_and_has_gradient():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 5, 6, requires_grad=True)
    xy = torch.rand(2, 3, 2) * torch.tensor([6.0, 5.0]) - 1
    boxes = torch.cat([xy, xy + 0.3 + torch.rand(2, 3, 2) * 3], -1)     # some reach past the map
    got = prroi_pool(f, boxes, 1.0)
    s = 400   # midpoint rule over the box; grid_sample(align_corners=True, zeros) = features at integer positions
    t = (torch.arange(s) + 0.5) / s
    want = torch.empty_like(got)
    for n in range(2):
        for k in range(3):
            x0, y0, x1, y1 = boxes[n, k]
            gx = (x0 + (x1 - x0) * t) / 5 * 2 - 1       # W - 1 = 5
            gy = (y0 + (y1 - y0) * t) / 4 * 2 - 1       # H - 1 = 4
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
            want[n, k] = F.grid_sample(f[n:n + 1], grid, align_corners=True, padding_mode="zeros").mean((2, 3))[0]
    assert torch.allclose(got, want, atol=1e-4)
    got.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_key_cells_and_the_official_grids():
    feat = torch.randn(2, 4, 14, 14)
    cells = key_cells(feat)
    assert cells.shape == (2, 144, 4)                                     # P4 14x14 -> 12x12 (builder.py:154)
    assert torch.allclose(cells.norm(dim=-1), torch.ones(2, 144))
    assert torch.allclose(F.normalize(feat[0, :, 3:6, 5:8].mean((1, 2)), dim=0), cells[0, 3 * 12 + 5])
    assert key_cells(torch.randn(1, 4, 28, 28)).shape[1] == 676           # P3 28x28 -> 26x26
    m = build_method("resim", backbone="resnet18", fpn_channels=8, queue_size=16)   # official grids at 224
    assert m.windows_p4.shape == (36, 4) and m.windows_p3.shape == (64, 4)
    assert m.windows_p4[-1].tolist() == [160, 160, 208, 208] and m.windows_p3[-1].tolist() == [168, 168, 200, 200]
    assert m.windows_p4[1].tolist() == [32, 0, 80, 48]                    # row-major: x moves first


# --------------------------------------------------------------------------- alignment
def _channel_means(t: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean source-x / source-y value (R, G of a ramp image) of each view-pixel box."""
    img = (t * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]) * 255
    img = F.pad(img[None, :2], (1, 1, 1, 1), mode="replicate")     # pixel i's centre at i + 0.5
    return prroi_pool(img, boxes[None] + 0.5, 1.0)[0]


def test_windows_follow_their_pixels(monkeypatch):
    """A ramp image (R = source x, G = source y): every valid window reads the same source
    place on q and at its mapped box on k, flipped views included; ignoring the flip would not."""
    monkeypatch.setattr(methods.resim, "RESIM_AUG", NO_AUG)
    m = make()
    ys, xs = np.mgrid[0:256, 0:256]
    img = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)
    checked = {False: 0, True: 0}
    worst_if_flip_ignored = 0.0
    for seed in range(40):
        s = m.views({"index": seed, "image": img}, np.random.default_rng(seed))
        gq, gk = s["geom_q"][None], s["geom_k"][None]
        assert gq[0, 6] == gk[0, 6]                                       # one shared flip
        for level in ("p4", "p3"):
            win = getattr(m, f"windows_{level}")
            boxes, valid = align_windows(win, gq, gk)
            if not valid.any():
                continue
            on_q = _channel_means(s["im_q"], win)[valid[0]]
            on_k = _channel_means(s["im_k"], boxes[0])[valid[0]]
            assert (on_q - on_k).abs().max() < 1.5, (seed, level, (on_q - on_k).abs().max())
            checked[bool(gq[0, 6])] += int(valid.sum())
            if gq[0, 6]:
                unflipped = gk.clone()
                unflipped[:, 6] = 0
                wrong, _ = align_windows(win, gq, unflipped)
                worst_if_flip_ignored = max(worst_if_flip_ignored,
                                            float((_channel_means(s["im_k"], wrong[0])[valid[0]] - on_q).abs().max()))
    assert checked[False] >= 20 and checked[True] >= 20, checked
    assert worst_if_flip_ignored > 10


def test_one_flip_for_both_views():
    m = make()
    draws = [m.view_geometries(300, 200, np.random.default_rng(i)) for i in range(20)]
    assert all(a.flip == b.flip for a, b in draws) and {a.flip for a, _ in draws} == {False, True}
    assert all(a.crop != b.crop for a, b in draws)                       # a crop of its own per view
    own = make(shared_flip=False)
    assert any(a.flip != b.flip for a, b in (own.view_geometries(300, 200, np.random.default_rng(i))
                                             for i in range(20)))


def test_augmentation_order_blur_before_jitter():
    """main_moco.py:229-242: blur, then jitter, then grayscale (MoCo v2: blur last)."""
    aug = Photometric(jitter=(0.9, 0, 0, 0), jitter_p=1.0, gray_p=0.0, blur_p=1.0, blur_sigma=(2.0, 2.0))
    from PIL import Image, ImageFilter
    import torchvision.transforms.functional as TF
    img = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 250, np.ones((8, 8), np.uint8))[..., None].repeat(3, -1))
    g = ViewGeometry((0, 0, 64, 64), (64, 64))
    factor = aug.draw(np.random.default_rng(0)).jitter[0][1]
    want = to_tensor(TF.adjust_brightness(img.filter(ImageFilter.GaussianBlur(2.0)), factor))
    got = render_resim_view(img, g, np.random.default_rng(0), aug)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, render_view(img, g, aug, np.random.default_rng(0)), atol=1e-2)


# --------------------------------------------------------------------------- the loss
def test_region_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    negs = torch.tensor([[0.0, 1.0], [-2.0, 0.0]])
    T = 0.5
    # window 0: pos 1, negatives 0, -1 -> logits 2, 0, -2; window 1: pos 0, negatives 1, 0 -> 0, 2, 0
    ce0 = math.log(math.e ** 2 + 1 + math.e ** -2) - 2
    ce1 = math.log(1 + math.e ** 2 + 1)
    loss, logits = region_info_nce(q, k, negs, torch.tensor([True, True]), T)
    assert torch.allclose(logits, torch.tensor([[2.0, 0, -2], [0, 2, 0]]))
    assert math.isclose(loss.item(), (ce0 + ce1) / 2, rel_tol=1e-6)
    # an invalid window does not count (official ignore_index -1): mean over the valid ones
    loss, _ = region_info_nce(q, k, negs, torch.tensor([True, False]), T)
    assert math.isclose(loss.item(), ce0, rel_tol=1e-6)
    # groups: each window against its own group's negatives only
    loss, logits = region_info_nce(q[:, None], k[:, None], negs[:, None], torch.tensor([[True], [True]]), T)
    assert logits.shape == (2, 1, 2) and torch.allclose(logits[:, 0], torch.tensor([[2.0, 0], [0, 0]]))
    assert math.isclose(loss.item(), (math.log(math.e ** 2 + 1) - 2 + math.log(2)) / 2, rel_tol=1e-6)
    # no valid window: 0 (the official mean over no target would be NaN), and no gradient
    qq = q.clone().requires_grad_()
    loss, _ = region_info_nce(qq, k, negs, torch.tensor([False, False]), T)
    loss.backward()
    assert loss.item() == 0 and qq.grad.abs().sum() == 0


def test_invalid_windows_do_not_reach_the_loss():
    """Views that do not overlap: every window of that pair is masked; its key windows can be
    anything without changing the loss."""
    m = make()
    m.train()
    batch = tiny_batch(m, 4)
    batch["geom_q"][1] = geometry_tensor(ViewGeometry((0, 0, 30, 30), (64, 64)))
    batch["geom_k"][1] = geometry_tensor(ViewGeometry((34, 34, 64, 64), (64, 64)))
    _, valid = align_windows(m.windows_p4, batch["geom_q"], batch["geom_k"])
    assert not valid[1].any()
    feat_q, feat_k = torch.randn(4, 64, 4, 4), torch.randn(4, 64, 4, 4)
    loss, _, valid = m.region_loss("p4", feat_q, feat_k, batch["geom_q"], batch["geom_k"])
    assert valid[0].any()
    r_q = prroi_pool(feat_q, m.windows_p4.expand(4, 36, 4), 1 / 16).flatten(0, 1)
    box_k, _ = align_windows(m.windows_p4, batch["geom_q"], batch["geom_k"])
    r_k = prroi_pool(feat_k, box_k, 1 / 16).flatten(0, 1)
    r_k_moved = r_k.clone()
    r_k_moved[36:72] = torch.randn(36, 64)   # image 1's key windows only
    negs = key_cells(feat_k).flatten(0, 1)
    a, _ = region_info_nce(r_q, r_k, negs, valid.flatten(), m.cfg.temperature)
    b, _ = region_info_nce(r_q, r_k_moved, negs, valid.flatten(), m.cfg.temperature)
    assert torch.allclose(a, loss) and torch.equal(a, b)
    r_k_moved[:36] = torch.randn(36, 64)     # image 0's: some are valid, so the loss moves
    c, _ = region_info_nce(r_q, r_k_moved, negs, valid.flatten(), m.cfg.temperature)
    assert not torch.allclose(a, c)


def test_negative_groups():
    """P4: every cell of the (global) batch; P3 with G groups: the cells of the window's own
    group of consecutive images (official: per GPU) — the same as each group on its own."""
    m = make(p3_neg_groups=2)
    cells = key_cells(torch.randn(4, 8, 8, 8))
    G, negs = m._grouped(cells, 1, "p4_neg_groups")
    assert G == 1 and negs.shape == (1, 4 * 36, 8)
    G, negs = m._grouped(cells, 2, "p3_neg_groups")
    assert G == 2 and torch.equal(negs[1], cells[2:].flatten(0, 1))
    batch = tiny_batch(m)
    torch.manual_seed(0)
    feat_q, feat_k = torch.randn(4, 64, 8, 8), torch.randn(4, 64, 8, 8)
    loss, logits, valid = m.region_loss("p3", feat_q, feat_k, batch["geom_q"], batch["geom_k"])
    assert logits.shape == (2, 2 * 64, 1 + 2 * 36)
    one = make()
    parts = [one.region_loss("p3", feat_q[h], feat_k[h], batch["geom_q"][h], batch["geom_k"][h])
             for h in (slice(0, 2), slice(2, 4))]
    counts = [p[2].sum() for p in parts]
    assert min(counts) > 0
    assert torch.allclose(loss, sum(p[0] * c for p, c in zip(parts, counts)) / sum(counts))
    assert torch.isfinite(m(batch)["loss"])
    with pytest.raises(ValueError, match="p3_neg_groups"):
        make(p3_neg_groups=3)(tiny_batch(m))


def test_total_is_global_plus_p4_plus_p3():
    out = {}
    for w in ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 3.0)):
        m = make(loss_weights=w)
        batch = tiny_batch(m)
        torch.manual_seed(1)                  # the Shuffle-BN permutation
        out[w] = m(batch)
    o = out[(1.0, 1.0, 1.0)]
    assert ReSim.Config.loss_weights == (1.0, 1.0, 1.0)                  # main_moco.py:331-334
    assert torch.allclose(o["loss"], o["loss_global"] + o["loss_p4"] + o["loss_p3"])
    assert torch.allclose(out[(1.0, 0.0, 0.0)]["loss"], o["loss_global"])
    assert torch.allclose(out[(0.0, 2.0, 0.0)]["loss"], 2 * o["loss_p4"])
    assert torch.allclose(out[(0.0, 0.0, 3.0)]["loss"], 3 * o["loss_p3"])
    assert all(o[k] > 0 for k in ("loss_global", "loss_p4", "loss_p3"))


# --------------------------------------------------------------------------- model
def test_momentum_target_moves_only_through_its_update():
    m = make()
    m.train()
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert trained == {id(p) for p in m.encoder_q.parameters()}
    assert not any(p.requires_grad for p in m.encoder_k.parameters())
    k_before = [p.clone() for p in m.encoder_k.parameters()]
    m(tiny_batch(m))["loss"].backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert m.encoder_q.fpn.output3.weight.grad.abs().sum() > 0           # the region loss trains the FPN
    torch.optim.SGD(m.param_groups(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(k_before, m.encoder_k.parameters()))
    q_now = [p.detach().clone() for p in m.encoder_q.parameters()]
    m.momentum_update(0.5)
    mom = m.cfg.momentum
    assert mom == 0.999
    for a, q, b in zip(k_before, q_now, m.encoder_k.parameters()):
        assert torch.allclose(b, mom * a + (1 - mom) * q)


def test_export_transfers_the_pretrained_fpn():
    from benchmark.detectors import build_detector, get_detector, load_pretrained
    m = make()
    state = m.export()
    fpn = m.encoder_q.fpn
    for key, conv in (("inner_blocks.1", fpn.lateral3), ("inner_blocks.2", fpn.lateral4),
                      ("inner_blocks.3", fpn.lateral5), ("layer_blocks.1", fpn.output3),
                      ("layer_blocks.2", fpn.output4)):
        assert torch.equal(state[f"fpn.{key}.0.weight"], conv.weight.detach())
        assert f"fpn.{key}.0.bias" not in state and f"fpn.{key}.1.weight" in state   # BN FPN: no conv bias
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "proj")) for k in state)
    assert torch.equal(m.export()["fpn.inner_blocks.0.0.weight"], state["fpn.inner_blocks.0.0.weight"])   # fixed draw
    # "none": weights and biases, into a Mask R-CNN whose FPN has no norm
    plain = make(export_fpn="none").export()
    assert torch.equal(plain["fpn.layer_blocks.2.0.bias"], fpn.output4.bias.detach())
    cfg = dict(name="mask_rcnn", backbone="resnet18", fpn_channels=64, head_norm="none", min_size=(64,),
               max_size=80, test_min_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    det = build_detector(cfg, num_classes=3)
    report = load_pretrained(det, plain, get_detector("mask_rcnn"), require=("backbone", "fpn"))
    r = report.groups["fpn"]
    assert r.loaded and not r.missing and not r.mismatched and not r.unexpected, r
    assert not any(k.startswith("fpn.") for k in make(export_fpn="off").export())


def test_step_traces_as_one_graph():
    """The window alignment, pooling and negatives are in the step without a host sync: one
    graph (as tests/test_fast_path.py checks for the other methods), with the P3 group mask."""
    import torch._dynamo as dynamo
    m = make(p3_neg_groups=2)
    batch = tiny_batch(m)
    with dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        e = dynamo.explain(m)(batch)
    dynamo.reset()
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:120] for b in e.break_reasons]


def test_tiny_scale_builds_and_runs_the_contract():
    from tests import test_method_contract as contract
    m = make()
    s = inputs.samples(m, 2, 64)
    assert s[0]["im_q"].shape == (3, 64, 64) and s[0]["geom_q"].shape == (7,)
    assert m.windows_p4.shape == (36, 4) and m.windows_p3.shape == (64, 4)
    assert m.windows_p4[-1, 2] < 64 and m.windows_p3[-1, 2] < 64
    out = m(m.collate(s))
    assert torch.isfinite(out["loss"]) and 0 <= out["valid_p4"] <= 1 and 0 <= out["valid_p3"] <= 1
    contract.test_method_contract("resim")   # views -> step -> momentum -> export -> Mask R-CNN load


def test_config_ranges():
    from methods.config import ConfigError
    with pytest.raises(ConfigError, match="method.export_fpn"):
        make(export_fpn="yes")
    with pytest.raises(ConfigError, match="method.p4_window"):
        make(p4_window=20.0)            # 5 x 9.14 + 20 > 64: the last window leaves the crop
    with pytest.raises(ConfigError, match="method.loss_weights"):
        make(loss_weights=(1.0, 1.0))
