"""SoCo (methods/soco.py): views, proposals in views, scale-aware levels, loss, EMA,
every Table 4 switch, and the export into the Mask R-CNN builder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods import build_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD, Photometric
from methods.base import ConfigError
from methods.geometry import ViewGeometry, whole_view
from methods.roi import assign_levels
from methods.soco import SoCo, soco_loss

# a micro model: every forward/backward here takes well under a second on CPU
MICRO = dict(backbone="resnet18", fpn_channels=16, head_conv_dim=16, head_fc_dim=32,
             proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, view_size=48, v3_size=32,
             v4_size=40)
NO_AUG = Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.fixture(autouse=True)
def _plain_cpu_kernels():
    """oneDNN builds a kernel per new conv shape (seconds each on a busy 2-core machine);
    the micro models here see many shapes once, so the plain kernels, one thread, are faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # micro batches: threading costs more than it brings
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def make(**kw) -> SoCo:
    torch.manual_seed(0)
    return build_method("soco", **{**MICRO, **kw})


def scene(seed: int, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def record(seed=0, proposals=None, size=128):
    if proposals is None:
        proposals = np.array([[10, 10, 70, 60], [40, 30, 110, 100], [0, 50, 60, 128],
                              [20, 20, 100, 100], [60, 0, 128, 64], [30, 60, 90, 120]])
    return {"index": seed, "image_id": seed, "image": scene(seed, size), "proposals": proposals}


def bright_bbox(t: torch.Tensor):
    """Pixel-edge xyxy of the bright pixels of a normalised view tensor."""
    img = t * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    ys, xs = torch.nonzero(img.mean(0) > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# --------------------------------------------------------------------------- views
def test_views_shapes_tiny():
    m = build_method("soco", **SoCo.scales["tiny"]["method"])
    s = m.views(record(), np.random.default_rng(0))
    assert s["v1"].shape == (3, 64, 64) and s["v2"].shape == (3, 64, 64) and s["v3"].shape == (3, 32, 32)
    # Table 5a at any scale: V3 as a fraction of V1 (96/224 of a 64-px view -> 27 px)
    s5 = build_method("soco", **{**SoCo.scales["tiny"]["method"], "v3_scale": 96 / 224}).views(
        record(), np.random.default_rng(0))
    assert s5["v3"].shape == (3, 27, 27)
    for v in ("v1", "v2", "v3"):
        assert s[f"boxes_{v}"].shape == (4, 4) and s[f"boxes_{v}"].dtype == torch.float32
    assert s["valid"].shape == (4,) and s["valid"].dtype == torch.bool
    star = make(soco_star=True).views(record(), np.random.default_rng(0))
    assert star["v4"].shape == (3, 40, 40) and "boxes_v4" in star
    single = make(multi_view=False).views(record(), np.random.default_rng(0))
    assert "v3" not in single


@pytest.mark.parametrize("v3_from_v2", [True, False])
@pytest.mark.parametrize("jitter", [False, True])
def test_boxes_follow_their_pixels(monkeypatch, v3_from_v2, jitter):
    """Draw the single proposal bright on a dark image: in V1, V2 and V3 the box given for the
    view is where its pixels are (box jitter moves only the crop views' boxes)."""
    import methods.soco as S
    monkeypatch.setattr(S, "BYOL_AUG_1", NO_AUG)
    monkeypatch.setattr(S, "BYOL_AUG_2", NO_AUG)
    m = make(v3_from_v2=v3_from_v2, box_jitter=jitter, cutout=False, num_proposals=1,
             view_size=96, v3_size=48)
    checked = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x0, y0 = rng.integers(0, 60, 2)
        box = np.array([[x0, y0, x0 + rng.integers(30, 68), y0 + rng.integers(30, 68)]])
        img = np.full((128, 128, 3), 10, np.uint8)
        img[box[0, 1]:box[0, 3], box[0, 0]:box[0, 2]] = 245
        s = m.views({"index": seed, "image": img, "proposals": box}, rng)
        if not s["valid"][0]:
            continue
        for v in ("v1", "v2", "v3"):
            b = s[f"boxes_{v}"][0].tolist()
            got = bright_bbox(s[v])
            scale = s[v].shape[-1] / 96
            if jitter and v != "v1":
                # jitter moves each side by at most 0.1 * (w or h) of the proposal (+ the clip)
                w, h = b[2] - b[0], b[3] - b[1]
                tol = [0.25 * w + 2, 0.25 * h + 2] * 2
                assert all(abs(g - e) <= t for g, e, t in zip(got, b, tol)), (v, got, b)
            else:
                np.testing.assert_allclose(got, b, atol=1.5 * max(1, scale)), v
        checked += 1
    assert checked >= 6


def test_v3_is_v2_downsampled_by_default():
    m = make(box_jitter=False)
    s = m.views(record(), np.random.default_rng(3))
    torch.testing.assert_close(s["boxes_v3"], s["boxes_v2"] * (32 / 48))


def test_proposals_outside_a_view_are_dropped_and_padded():
    m = make(num_proposals=4, box_jitter=False)
    geoms = {"v1": whole_view(128, 128, 64), "v2": ViewGeometry((0, 0, 64, 64), (64, 64))}
    inside = [10, 10, 50, 50]   # (views built by hand at 64 px)
    rec = {"proposals": np.array([inside, [80, 80, 120, 120], [60, 60, 120, 120]])}
    boxes, valid = m.sample_boxes(rec, geoms, 128, 128, np.random.default_rng(0))
    assert valid.tolist() == [True, False, False, False]          # one valid, padded to K
    np.testing.assert_allclose(boxes["v2"], np.tile(inside, (4, 1)))  # only the inside one, repeated
    np.testing.assert_allclose(boxes["v1"], np.tile(np.array(inside) / 2, (4, 1)))


def test_k_sampling_distinct_and_fallback():
    m = make(num_proposals=3, box_jitter=False)
    geoms = {"v1": whole_view(128, 128, 64), "v2": ViewGeometry((0, 0, 128, 128), (64, 64))}
    props = np.array([[i * 10, 0, i * 10 + 40, 40] for i in range(8)])
    boxes, valid = m.sample_boxes({"proposals": props}, geoms, 128, 128, np.random.default_rng(1))
    assert valid.all() and len({tuple(b) for b in boxes["v2"].tolist()}) == 3
    # nothing valid in every view: the whole image (clipped to each view), marked invalid
    geoms["v2"] = ViewGeometry((0, 64, 64, 128), (64, 64))
    boxes, valid = m.sample_boxes({"proposals": props}, geoms, 128, 128, np.random.default_rng(1))
    assert not valid.any()
    np.testing.assert_allclose(boxes["v2"], np.tile([0, 0, 64, 64], (3, 1)))
    # in views: K rows whatever the number of proposals
    for n in (0, 2, 8):
        s = m.views(record(proposals=props[:n]), np.random.default_rng(2))
        assert s["boxes_v1"].shape == (3, 4) and s["valid"].sum() <= min(n, 3)


def test_random_and_whole_image_sources_need_no_cache():
    rec = record()
    del rec["proposals"]
    s = make(proposal_source="random").views(rec, np.random.default_rng(0))
    assert s["boxes_v2"].shape == (4, 4)
    m = make(proposal_source="whole_image")
    s = m.views(rec, np.random.default_rng(0))
    assert s["boxes_v1"].tolist() == [[0, 0, 48, 48]] and s["boxes_v2"].tolist() == [[0, 0, 48, 48]]
    assert m.proposal_params() is None and make(proposal_source="random").proposal_params() is None
    assert make().proposal_params() == {"mode": "fast", "max_side": None}
    with pytest.raises(ValueError, match="proposals"):
        make().views(rec, np.random.default_rng(0))


# --------------------------------------------------------------------------- levels
def test_scale_aware_assignment():
    sizes = torch.tensor([10, 47.9, 48, 60, 96, 100, 191, 192.5, 300])
    boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], 1)
    assert assign_levels(boxes).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # a 112-px view halves the ranges: 24 | 48 | 96
    half = torch.tensor([[0, 0, 20, 20], [0, 0, 30, 30], [0, 0, 60, 60], [0, 0, 100, 100.]])
    assert assign_levels(half, scale=0.5).tolist() == [0, 1, 2, 3]
    # sqrt(wh), not the longer side: 16 x 144 has size 48
    assert assign_levels(torch.tensor([[0, 0, 16, 144.]])).tolist() == [0]
    enc = make().online
    b = torch.tensor([[[0, 0, 10, 10], [0, 0, 60, 60.]]])
    assert enc.levels(b, 64).shape == (1, 2, 1)
    assert make(scale_aware=False).online.levels(b, 64).tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]
    assert make(fpn=False).online.levels(b, 64).tolist() == [[[0], [0]]]


# --------------------------------------------------------------------------- loss & EMA
def test_loss_by_hand():
    p1 = torch.tensor([[[[1.0, 1.0]], [[0.0, 3.0]]]], requires_grad=True)   # (N=1, K=2, L=1, D=2)
    p2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]], requires_grad=True)
    z1 = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]], requires_grad=True)
    z2 = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]], requires_grad=True)
    loss, logs = soco_loss({"v1": p1, "v2": p2}, {"v1": z1, "v2": z2})
    # box 1: (2 - 2cos(p2, z1)) + (2 - 2cos(p1, z2)) = 2 + (2 - sqrt 2); box 2: 0 + 0
    assert loss.item() == pytest.approx((2 + 2 - math.sqrt(2)) / 2)
    assert logs["loss_12"].item() == pytest.approx(loss.item())
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None
    masked, _ = soco_loss({"v1": p1, "v2": p2}, {"v1": z1, "v2": z2}, torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(4 - math.sqrt(2))
    none, _ = soco_loss({"v1": p1, "v2": p2}, {"v1": z1, "v2": z2}, torch.tensor([[False, False]]))
    assert none.item() == 0.0
    # with V3 the pairs add up
    three, logs = soco_loss({"v1": p1, "v2": p2, "v3": p2}, {"v1": z1, "v2": z2, "v3": z2})
    assert three.item() == pytest.approx(2 * loss.item()) and set(logs) == {"loss_12", "loss_13"}


def test_momentum_schedule():
    m = make()
    for progress, expect in ((0.0, 0.99), (0.5, 0.995), (1.0, 1.0)):
        m.momentum_update(progress)
        assert m.current_momentum == pytest.approx(expect)
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in m.target.parameters()]
    m.momentum_update(1.0)     # momentum 1: target unchanged
    assert all(torch.equal(a, b) for a, b in zip(t0, m.target.parameters()))
    m.momentum_update(0.0)     # 0.99 t + 0.01 o
    o, t = next(m.online.parameters()), next(m.target.parameters())
    torch.testing.assert_close(t, 0.99 * t0[0] + 0.01 * o)
    assert not any(p.requires_grad for p in m.target.parameters())


# --------------------------------------------------------------------------- Table 4 / 5 switches
TABLE4 = {  # SoCo Table 4, each step adds one component
    "1_whole_image": dict(proposal_source="whole_image", fpn=False, box_head=False, scale_aware=False,
                          box_jitter=False, multi_view=False),
    "2_proposals": dict(fpn=False, box_head=False, scale_aware=False, box_jitter=False, multi_view=False),
    "3_fpn": dict(box_head=False, scale_aware=False, box_jitter=False, multi_view=False),
    "4_head": dict(scale_aware=False, box_jitter=False, multi_view=False),
    "5_scale_aware": dict(box_jitter=False, multi_view=False),
    "6_box_jitter": dict(multi_view=False),
    "7_multi_view": dict(),
    "soco_star": dict(soco_star=True),
    "v3_independent_random_k1_masked": dict(v3_from_v2=False, proposal_source="random", num_proposals=1,
                                            mask_padding=True, head_norm="none"),
}


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_every_switch_runs_forward_backward(name):
    m = make(**TABLE4[name])
    samples = [m.views(record(i), np.random.default_rng(i)) for i in range(2)]
    batch = m.collate(samples)
    out = m(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    out["loss"].backward()
    g = m.online.backbone.conv1.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in m.target.parameters())
    m.momentum_update(0.5)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.proposal_source"):
        make(proposal_source="edge_boxes")
    with pytest.raises(ConfigError, match="method.num_proposal"):
        build_method("soco", num_proposal=4)


def test_recipe_and_overrides():
    assert SoCo.recipe.optimizer == "lars" and SoCo.recipe.base_lr == 1.0
    assert SoCo.recipe.weight_decay == 1e-5 and SoCo.recipe.batch_size == 2048
    assert SoCo.recipe.warmup_epochs == 10 and SoCo.finetune_overrides == {"weight_decay": 2.5e-5}
    assert SoCo.scales["tiny"]["recipe"]["batch_size"] == 16


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("head_norm", ["bn", "none"])
def test_export_loads_into_mask_rcnn(head_norm):
    from benchmark.detectors import build_detector, get_detector, load_pretrained
    tiny = SoCo.scales["tiny"]["method"]
    m = build_method("soco", **{**tiny, "head_norm": head_norm})
    state = m.export()
    assert not any(k.startswith(("online.", "target.", "projector", "predictor", "fc.")) for k in state)
    cfg = dict(name="mask_rcnn", backbone="resnet18", fpn_channels=64, box_head_conv_dim=64,
               box_head_fc_dim=256, head_norm=head_norm, min_size=(128,), max_size=128, test_min_size=128)
    model = build_detector(cfg, num_classes=4)
    report = load_pretrained(model, state, get_detector("mask_rcnn"), require=("backbone", "fpn", "box_head"))
    for g in ("backbone", "fpn", "box_head"):
        r = report.groups[g]
        assert r.loaded and not r.missing and not r.mismatched and not r.unexpected, (g, r)
    sd = model.state_dict()
    torch.testing.assert_close(sd["backbone.body.conv1.weight"], m.online.backbone.conv1.weight)
    torch.testing.assert_close(sd["roi_heads.box_head.5.weight"], m.online.box_head[5].weight)
