"""SoCo (methods/soco.py): views, proposals per view pair, scale-aware levels in each view's
own pixels, per-box cutout, loss, EMA, every Table 4 switch, the official-code defaults
(zero-init gamma, adaptive RoIAlign sampling, SoCo* sizes, selective search), a real 1-process
DDP step with an empty FPN level, and the export into the Mask R-CNN builder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods import build_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD, Photometric, cutout_box_rects, cutout_in_boxes
from methods.config import ConfigError
from methods.geometry import ViewGeometry, whole_view
from methods.roi import assign_levels, multilevel_roi_align
from methods.soco import SoCo, soco_loss

# a micro model: every forward/backward here takes well under a second on CPU
MICRO = dict(backbone="resnet18", fpn_channels=16, head_conv_dim=16, head_fc_dim=32,
             proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, view_size=48, v3_size=32,
             star_v3_size=40, v4_size=32)
NO_AUG = Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


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
    for k in ("boxes_v1_v2", "boxes_v2", "boxes_v1_v3", "boxes_v3"):
        assert s[k].shape == (4, 4) and s[k].dtype == torch.float32
    for k in ("valid_v2", "valid_v3"):
        assert s[k].shape == (4,) and s[k].dtype == torch.bool
    single = make(multi_view=False).views(record(), np.random.default_rng(0))
    assert "v3" not in single and "boxes_v1_v3" not in single


def test_soco_star_view_sizes():
    """Official tools/SoCo_FPN_Star_400ep.sh: V3 an independent crop at 192, V4 = V2 resized
    to 112 (paired with V1 through the V1-V2 proposals)."""
    assert (SoCo.Config.star_v3_size, SoCo.Config.v4_size) == (192, 112)
    m = build_method("soco", soco_star=True, backbone="resnet18")
    g = m.view_geometries(400, 300, np.random.default_rng(0))
    assert g["v3"].out_size == (192, 192) and g["v4"].out_size == (112, 112)
    assert g["v4"].crop == g["v2"].crop                       # V2's crop (its flip: its own)
    crops = {m.view_geometries(400, 300, np.random.default_rng(i))["v3"].crop ==
             m.view_geometries(400, 300, np.random.default_rng(i))["v2"].crop for i in range(5)}
    assert crops == {False}                                   # V3 is not V2's crop
    tiny = build_method("soco", **{**SoCo.scales["tiny"]["method"], "soco_star": True})
    s = tiny.views(record(), np.random.default_rng(0))
    assert s["v3"].shape == (3, 55, 55) and s["v4"].shape == (3, 32, 32)
    assert "boxes_v1_v4" not in s and torch.equal(s["ids_v4"], s["ids_v2"])   # V1 side = V1-V2's


def test_soco_star_v4_flips_on_its_own(monkeypatch):
    """Official dataset.py (ImageFolderImageAsymBboxAwareMulti3ResizeExtraJitter1): img4 is
    img2 resized before V2's flip, then flipped by its own draw; its boxes follow its pixels."""
    import methods.soco as S
    monkeypatch.setattr(S, "BYOL_AUG_1", NO_AUG)
    monkeypatch.setattr(S, "BYOL_AUG_2", NO_AUG)
    m = make(soco_star=True, box_jitter=False, cutout=False, num_proposals=1, view_size=96, v4_size=48)
    same = mirrored = 0
    for seed in range(16):
        img = np.full((128, 128, 3), 10, np.uint8)
        box = np.array([[20, 30, 70, 90]])
        img[30:90, 20:70] = 245
        s = m.views({"index": seed, "image": img, "proposals": box}, np.random.default_rng(seed))
        if not s["valid_v2"][0]:
            continue
        b2, b4 = s["boxes_v2"][0].numpy(), s["boxes_v4"][0].numpy()
        np.testing.assert_allclose(bright_bbox(s["v4"]), b4, atol=1.5)          # boxes follow V4's pixels
        if np.allclose(b4, b2 / 2, atol=1e-3):
            same += 1
        else:   # V2's box mirrored in the 48-px view
            np.testing.assert_allclose(b4, [48 - b2[2] / 2, b2[1] / 2, 48 - b2[0] / 2, b2[3] / 2], atol=1e-3)
            mirrored += 1
    assert same >= 2 and mirrored >= 2


@pytest.mark.parametrize("v3_from_v2", [True, False])
@pytest.mark.parametrize("jitter", [False, True])
def test_boxes_follow_their_pixels(monkeypatch, v3_from_v2, jitter):
    """Draw the single proposal bright on a dark image: in every view the box given for the
    view is where its pixels are; box jitter (official) moves only V1's box of each pair."""
    import methods.soco as S
    monkeypatch.setattr(S, "BYOL_AUG_1", NO_AUG)
    monkeypatch.setattr(S, "BYOL_AUG_2", NO_AUG)
    m = make(v3_from_v2=v3_from_v2, box_jitter=jitter, jitter_prob=1.0, cutout=False, num_proposals=1,
             view_size=96, v3_size=48)
    checked = moved = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x0, y0 = rng.integers(0, 60, 2)
        box = np.array([[x0, y0, x0 + rng.integers(30, 68), y0 + rng.integers(30, 68)]])
        img = np.full((128, 128, 3), 10, np.uint8)
        img[box[0, 1]:box[0, 3], box[0, 0]:box[0, 2]] = 245
        s = m.views({"index": seed, "image": img, "proposals": box}, rng)
        if not (s["valid_v2"][0] and s["valid_v3"][0]):
            continue
        for v, key in (("v1", "boxes_v1_v2"), ("v1", "boxes_v1_v3"), ("v2", "boxes_v2"), ("v3", "boxes_v3")):
            b = s[key][0].tolist()
            got = bright_bbox(s[v])
            scale = s[v].shape[-1] / 96
            if jitter and v == "v1":
                # jitter moves each side by at most 0.1 * (w or h) of the proposal (+ the clip)
                w, h = b[2] - b[0], b[3] - b[1]
                tol = [0.25 * w + 2, 0.25 * h + 2] * 2
                assert all(abs(g - e) <= t for g, e, t in zip(got, b, tol)), (key, got, b)
                moved += max(abs(g - e) for g, e in zip(got, b)) > 1.5
            else:
                np.testing.assert_allclose(got, b, atol=1.5 * max(1, scale)), key
        checked += 1
    assert checked >= 6
    assert (moved > 0) == jitter


def test_v3_is_an_independent_crop_by_default(monkeypatch):
    """Official transform.py (both FPN scripts): V3 = RandomResizedCropParams(image_size // 2),
    its own crop and flip; the paper's V2 downsampled is the switch ``v3_from_v2``. V3's boxes
    come from V3's own crop, whatever V2's is."""
    assert SoCo.Config.v3_from_v2 is False
    crops = set()
    for seed in range(6):
        g = make().view_geometries(128, 128, np.random.default_rng(seed))
        assert g["v3"].out_size == (32, 32)
        crops.add(g["v3"].crop == g["v2"].crop)
    assert crops == {False}
    g = make(v3_from_v2=True).view_geometries(128, 128, np.random.default_rng(3))
    assert g["v3"] == g["v2"].resized((32, 32))
    # the same proposal, V2 and V3 over different parts of the image: each view's box is the
    # proposal in that view's own crop
    m = make(num_proposals=1, box_jitter=False, cutout=False)
    prop = np.array([[40, 40, 80, 90]])
    geoms = {"v1": whole_view(128, 128, 48), "v2": ViewGeometry((0, 0, 100, 100), (48, 48), True),
             "v3": ViewGeometry((30, 20, 120, 128), (32, 32))}
    _fixed_views(monkeypatch, m, [geoms])
    s = m.views(record(proposals=prop), np.random.default_rng(0))
    np.testing.assert_allclose(s["boxes_v2"][0], [48 - 80 * 0.48, 40 * 0.48, 48 - 40 * 0.48, 90 * 0.48], atol=1e-4)
    np.testing.assert_allclose(s["boxes_v3"][0], [(40 - 30) * 32 / 90, (40 - 20) * 32 / 108,
                                                  (80 - 30) * 32 / 90, (90 - 20) * 32 / 108], atol=1e-4)


def _fixed_views(monkeypatch, m, draws):
    """Make ``m.view_geometries`` return the given geometries in turn; returns the call log."""
    calls = []
    def fake(width, height, rng):
        calls.append(1)
        return draws[min(len(calls), len(draws)) - 1]
    monkeypatch.setattr(m, "view_geometries", fake)
    return calls


def test_proposals_are_selected_per_pair(monkeypatch):
    """V1-V2 and V1-V3 each draw from the proposals visible in both views of that pair
    (official dataset.py), not from those visible in all three views."""
    m = make(num_proposals=2, box_jitter=False, cutout=False)
    left, right = [4, 4, 40, 40], [80, 80, 120, 120]
    geoms = {"v1": whole_view(128, 128, 48), "v2": ViewGeometry((0, 0, 64, 64), (48, 48)),
             "v3": ViewGeometry((64, 64, 128, 128), (32, 32))}
    _fixed_views(monkeypatch, m, [geoms])
    s = m.views(record(proposals=np.array([left, right])), np.random.default_rng(0))
    # each pair keeps its one visible proposal (padded to K=2 by repeating it)
    assert s["valid_v2"].tolist() == [True, False] and s["valid_v3"].tolist() == [True, False]
    np.testing.assert_allclose(s["boxes_v2"], np.tile(np.array(left) * 48 / 64, (2, 1)), atol=1e-4)
    np.testing.assert_allclose(s["boxes_v3"], np.tile((np.array(right) - 64) * 32 / 64, (2, 1)), atol=1e-4)
    np.testing.assert_allclose(s["boxes_v1_v2"], np.tile(np.array(left) * 48 / 128, (2, 1)), atol=1e-4)
    np.testing.assert_allclose(s["boxes_v1_v3"], np.tile(np.array(right) * 48 / 128, (2, 1)), atol=1e-4)


def test_views_are_redrawn_before_padding(monkeypatch):
    """Too few proposals in a pair: the views are drawn again (official max_tries 5, needing
    K//2, then half as many); after view_tries draws the last one is padded."""
    m = make(num_proposals=4, box_jitter=False, multi_view=False, cutout=False)
    props = np.array([[i * 10, 0, i * 10 + 30, 30] for i in range(6)])
    miss = {"v1": whole_view(128, 128, 48), "v2": ViewGeometry((0, 64, 64, 128), (48, 48))}
    hit = {"v1": whole_view(128, 128, 48), "v2": ViewGeometry((0, 0, 128, 64), (48, 24))}
    calls = _fixed_views(monkeypatch, m, [miss, miss, hit])
    s = m.views(record(proposals=props), np.random.default_rng(0))
    assert len(calls) == 3 and s["valid_v2"].all()
    calls = _fixed_views(monkeypatch, m, [miss])
    s = m.views(record(proposals=props), np.random.default_rng(0))
    assert len(calls) == m.cfg.view_tries == 5
    # nothing visible: the whole image (clipped to each view), marked invalid
    assert not s["valid_v2"].any()
    np.testing.assert_allclose(s["boxes_v2"], np.tile([0, 0, 48, 48], (4, 1)))


def test_k_sampling_distinct():
    m = make(num_proposals=3, box_jitter=False, cutout=False)
    props = np.array([[i * 10, 0, i * 10 + 40, 40] for i in range(8)])
    geoms = {"v1": whole_view(128, 128, 64), "v2": ViewGeometry((0, 0, 128, 128), (64, 64)),
             "v3": ViewGeometry((0, 0, 128, 128), (32, 32))}
    out = m.sample_boxes({"v2": props, "v3": props}, geoms, 128, 128, np.random.default_rng(1))
    assert out["valid_v2"].all() and len({tuple(b) for b in out["boxes_v2"].tolist()}) == 3
    # in views: K rows whatever the number of proposals
    for n in (0, 2, 8):
        s = m.views(record(proposals=props[:n]), np.random.default_rng(2))
        assert s["boxes_v1_v2"].shape == (3, 4) and s["valid_v2"].sum() <= min(n, 3)


def test_jitter_switch_moves_the_crop_box_instead():
    props = np.array([[20, 20, 100, 100]])
    geoms = {"v1": whole_view(128, 128, 128), "v2": ViewGeometry((0, 0, 128, 128), (128, 128)),
             "v3": ViewGeometry((0, 0, 128, 128), (64, 64))}
    for on, moved, still in (("v1", "boxes_v1_v2", "boxes_v2"), ("crop", "boxes_v2", "boxes_v1_v2")):
        m = make(num_proposals=1, jitter_prob=1.0, jitter_on=on)
        out = m.sample_boxes({"v2": props, "v3": props}, geoms, 128, 128, np.random.default_rng(0))
        np.testing.assert_allclose(out[still][0], props[0])
        assert np.abs(out[moved][0] - props[0]).max() > 0.5
    with pytest.raises(ConfigError, match="method.jitter_on"):
        make(jitter_on="v2")


def test_random_and_whole_image_sources_need_no_cache():
    rec = record()
    del rec["proposals"]
    s = make(proposal_source="random").views(rec, np.random.default_rng(0))
    assert s["boxes_v2"].shape == (4, 4)
    m = make(proposal_source="whole_image")
    s = m.views(rec, np.random.default_rng(0))
    assert s["boxes_v1_v2"].tolist() == [[0, 0, 48, 48]] and s["boxes_v2"].tolist() == [[0, 0, 48, 48]]
    assert m.proposal_params() is None and make(proposal_source="random").proposal_params() is None
    assert make().proposal_params() == {"mode": "soco", "max_side": None}
    with pytest.raises(ValueError, match="proposals"):
        make().views(rec, np.random.default_rng(0))


# --------------------------------------------------------------------------- cutout
def test_cutout_clipped_to_the_box_switch():
    t = torch.ones(3, 64, 64)
    boxes = np.array([[4.0, 4.0, 30.0, 20.0], [40.0, 30.0, 60.0, 62.0]])
    inside = torch.zeros(64, 64, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        inside[y1:y2, x1:x2] = True
    hit = []
    for seed in range(40):
        out = cutout_in_boxes(t, boxes, np.random.default_rng(seed), p=0.5, area=(0.1, 0.3), clip="box")
        erased = (out == 0).all(0)
        assert not (erased & ~inside).any()                # never outside a box
        per_box = [erased[y1:y2, x1:x2].sum().item() for x1, y1, x2, y2 in boxes.astype(int)]
        for n, (x1, y1, x2, y2) in zip(per_box, boxes):
            assert n <= 0.3 * (x2 - x1) * (y2 - y1) + 2 * math.sqrt(0.3 * (x2 - x1) * (y2 - y1)) + 1
        hit.append([n > 0 for n in per_box])
    hit = np.array(hit)
    assert 0.2 < hit.mean() < 0.8 and (hit[:, 0] != hit[:, 1]).any()   # p 0.5, each box on its own
    assert torch.equal(t, torch.ones(3, 64, 64))                        # input untouched
    assert torch.equal(cutout_in_boxes(t, boxes, np.random.default_rng(0), p=0.0), t)
    with pytest.raises(ConfigError, match="method.cutout_clip"):
        make(cutout_clip="bbox")


def _expected_official_area(box_area: float, area=(0.1, 0.3)) -> float:
    """E[(2 (s // 2) + 1)^2] / box area, s = round(sqrt(u A)), u ~ U(area): the square the
    official RandomCutoutInBbox erases (cut_x1 .. cut_x2 inclusive, cut = centre -+ s // 2)."""
    u = np.linspace(*area, 200001)
    s = np.round(np.sqrt(u * box_area))
    return float(np.mean((2 * (s // 2) + 1) ** 2)) / box_area


def test_cutout_official_square_centred_in_the_box_clipped_to_the_image():
    """Official RandomCutoutInBbox as it evidently means to run (its randint on float corners
    raises): a centre pixel of the box, a (2 (s // 2) + 1)-px square, s = round(sqrt(u A)),
    u ~ U(0.1, 0.3), clipped to the image only. Measured against the distribution it implies."""
    H = W = 224
    t = torch.ones(3, H, W)
    box = np.array([[60.0, 70.0, 140.0, 130.0]])           # 80 x 60, far from the image's edges
    A = 80 * 60
    rng = np.random.default_rng(0)
    frac, outside, erased_total = [], 0, 0
    for _ in range(3000):
        erased = (cutout_in_boxes(t, box, rng, p=1.0) == 0).all(0)
        ys, xs = torch.nonzero(erased, as_tuple=True)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert w == h and w % 2 == 1 and erased.sum() == w * h            # one odd square
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        assert 60 <= cx < 140 and 70 <= cy < 130                         # centred on a box pixel
        inside = erased[70:130, 60:140].sum().item()
        frac.append(erased.sum().item() / A)
        outside += erased.sum().item() - inside
        erased_total += erased.sum().item()
    want = _expected_official_area(A)
    assert 0.2 < want < 0.23
    assert abs(np.mean(frac) - want) < 0.005                 # standard error ~0.001
    assert 0.05 < outside / erased_total < 0.4               # it spills past the box
    # the old switch erases less and never outside the box
    rng = np.random.default_rng(0)
    box_frac = [(cutout_in_boxes(t, box, rng, p=1.0, clip="box") == 0).all(0).sum().item() / A
                for _ in range(1000)]
    assert np.mean(box_frac) < want - 0.03
    # at the image's corner the square is clipped to the image
    corner = np.array([[0.0, 0.0, 30.0, 30.0]])
    sizes = set()
    for seed in range(50):
        (y, x, h, w), = cutout_box_rects(H, W, corner, np.random.default_rng(seed), p=1.0)
        assert x >= 0 and y >= 0 and x + w <= W and y + h <= H
        sizes.add((h % 2, w % 2))
    assert len(sizes) > 1                                     # some squares cut by the edges


def test_cutout_only_on_v2_and_v3_by_default(monkeypatch):
    import methods.soco as S
    monkeypatch.setattr(S, "BYOL_AUG_1", NO_AUG)
    monkeypatch.setattr(S, "BYOL_AUG_2", NO_AUG)
    assert SoCo.Config.cutout_views == ("v2", "v3")
    img = np.full((128, 128, 3), 200, np.uint8)
    zero = lambda t: (t == 0).all(0)   # an erased pixel (a plain 200 pixel is never 0 after normalising)
    m = make(cutout_prob=1.0, box_jitter=False, soco_star=True, cutout_clip="box")
    seen = set()
    for seed in range(6):
        s = m.views(record(seed, proposals=np.array([[10, 10, 90, 90], [30, 40, 120, 110]])) | {"image": img},
                    np.random.default_rng(seed))
        assert not zero(s["v1"]).any() and not zero(s["v4"]).any()
        for v in ("v2", "v3"):
            erased = zero(s[v])
            inside = torch.zeros_like(erased)
            for x1, y1, x2, y2 in s[f"boxes_{v}"].tolist():
                inside[int(y1):math.ceil(y2), int(x1):math.ceil(x2)] = True
            assert not (erased & ~inside).any()
            if erased.any():
                seen.add(v)
    assert seen == {"v2", "v3"}
    off = make(cutout=False, cutout_prob=1.0).views(record(0) | {"image": img}, np.random.default_rng(0))
    assert not any(zero(off[v]).any() for v in ("v1", "v2", "v3"))


# --------------------------------------------------------------------------- levels
def test_scale_aware_assignment():
    sizes = torch.tensor([10, 47.9, 48, 60, 96, 100, 191, 192.5, 300])
    boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], 1)
    assert assign_levels(boxes).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # sqrt(wh), not the longer side: 16 x 144 has size 48
    assert assign_levels(torch.tensor([[0, 0, 16, 144.]])).tolist() == [0]
    b = torch.tensor([[[0, 0, 10, 10], [0, 0, 60, 60.]]])
    assert make().online.levels(b).tolist() == [[[0], [1]]]
    assert make(scale_aware=False).online.levels(b).tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]
    assert make(fpn=False).online.levels(b).tolist() == [[[0], [0]]]


def test_levels_in_each_views_own_pixels():
    """Official aware_range 48/96/192 in every view's own pixels, never rescaled: the same
    object in the 112-px V3 (V2 downsampled) lands one level finer than in the 224-px V2."""
    m = build_method("soco", backbone="resnet18", v3_from_v2=True)
    g = m.view_geometries(640, 480, np.random.default_rng(0))
    assert g["v2"].out_size == (224, 224) and g["v3"] == g["v2"].resized((112, 112))
    x0, y0 = g["v2"].crop[:2]
    sx = (g["v2"].crop[2] - x0) / 224
    sy = (g["v2"].crop[3] - y0) / 224
    shifted = 0
    for side in (40, 70, 130, 200):     # sizes in V2 pixels: P2, P3, P4, P5 there
        src = np.array([[x0 + 10 * sx, y0 + 10 * sy, x0 + (10 + side) * sx, y0 + (10 + side) * sy]])
        b2 = torch.tensor(g["v2"].map_boxes(src), dtype=torch.float32)[None]
        b3 = torch.tensor(g["v3"].map_boxes(src), dtype=torch.float32)[None]
        l2, l3 = m.online.levels(b2).item(), m.online.levels(b3).item()
        assert l3 == max(l2 - 1, 0), (side, l2, l3)
        shifted += l3 != l2
    assert shifted == 3
    # tiny: the thresholds are the paper's scaled once to the 64-px V1 and used as they are
    tiny = SoCo.scales["tiny"]["method"]
    np.testing.assert_allclose(tiny["level_thresholds"], np.array([48, 96, 192]) * tiny["view_size"] / 224,
                               atol=0.01)
    t = build_method("soco", **tiny).online
    box = torch.tensor([[[0, 0, 20, 20.]]])          # P3 in a 64-px view
    assert t.levels(box).item() == 1 and t.levels(box / 2).item() == 0


# --------------------------------------------------------------------------- loss & EMA
def test_loss_by_hand():
    q1 = torch.tensor([[[[1.0, 1.0]], [[0.0, 3.0]]]], requires_grad=True)   # (N=1, K=2, L=1, D=2)
    q2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]], requires_grad=True)
    z1 = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]], requires_grad=True)
    z2 = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]], requires_grad=True)
    loss, logs = soco_loss({"v2": (q1, z1, q2, z2)})
    # box 1: (2 - 2cos(q2, z1)) + (2 - 2cos(q1, z2)) = 2 + (2 - sqrt 2); box 2: 0 + 0
    assert loss.item() == pytest.approx((2 + 2 - math.sqrt(2)) / 2)
    assert logs["loss_12"].item() == pytest.approx(loss.item())
    loss.backward()
    assert z1.grad is None and z2.grad is None and q1.grad is not None
    masked, _ = soco_loss({"v2": (q1, z1, q2, z2)}, {"v2": torch.tensor([[True, False]])})
    assert masked.item() == pytest.approx(4 - math.sqrt(2))
    none, _ = soco_loss({"v2": (q1, z1, q2, z2)}, {"v2": torch.tensor([[False, False]])})
    assert none.item() == 0.0
    # pairs add up; each pair has its own V1 features (its own proposals)
    three, logs = soco_loss({"v2": (q1, z1, q2, z2), "v3": (q2, z2, q2, z2)})
    assert three.item() == pytest.approx(loss.item()) and set(logs) == {"loss_12", "loss_13"}
    assert logs["loss_13"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_matches_every_copy_of_a_padded_id():
    """Official SoCo_FPN.regression_loss_bboxs_aware with get_aware_correspondence_matrix:
    fewer than K distinct proposals, each side padded with its own copies; every V1 row is
    compared with every V row of the same id, a mean over those matches per image. Two
    distinct boxes a, b; V1 rows [a, b, a, a], V2 rows [a, b, b, a] (copies: the same box, so
    the same features)."""
    e = lambda *x: torch.tensor(x, dtype=torch.float32)
    feats = {"q1": {0: e(1.0, 0.0), 1: e(0.0, 1.0)}, "z1": {0: e(1.0, 0.0), 1: e(1.0, 1.0)},
             "q2": {0: e(1.0, 1.0), 1: e(0.0, 1.0)}, "z2": {0: e(1.0, 1.0), 1: e(0.0, 2.0)}}
    ids1, ids2 = [0, 1, 0, 0], [0, 1, 1, 0]
    rows = lambda f, ids: torch.stack([feats[f][i] for i in ids])[None, :, None]   # (1, 4, 1, 2)
    q1, z1, q2, z2 = rows("q1", ids1), rows("z1", ids1), rows("q2", ids2), rows("z2", ids2)
    ids = {"v2": (torch.tensor([ids1]), torch.tensor([ids2]))}
    loss, logs = soco_loss({"v2": (q1, z1, q2, z2)}, ids=ids)
    # matches: a = 3 V1 rows x 2 V2 rows = 6, b = 1 x 2 = 2 (8 of 16 pairs)
    # q1 vs z2: cos(a) = cos([1,0],[1,1]) = 1/sqrt2, cos(b) = 1; q2 vs z1: cos(a) = 1/sqrt2, cos(b) = 1/sqrt2
    r = 1 / math.sqrt(2)
    official = -2 * (6 * r + 2 * 1) / 8 + -2 * (6 * r + 2 * r) / 8   # the official loss (-2 cos form)
    assert loss.item() == pytest.approx(official + 4, abs=1e-6)       # ours: 2 - 2cos, 2 terms
    assert logs["loss_12"].item() == pytest.approx(loss.item())
    # rows paired instead (the earlier loss) weigh ids otherwise and pair a with b on row 3
    paired, _ = soco_loss({"v2": (q1, z1, q2, z2)})
    assert abs(paired.item() - loss.item()) > 0.05
    # one padding shared by both sides ([a, b, a, a]): matching ids weighs a 9 : 1, pairing
    # rows 3 : 1, so the two differ by 2 ((3r + 1) / 4 - (9r + 1) / 10) = 0.3 (1 - r)
    q2s, z2s = rows("q2", ids1), rows("z2", ids1)
    shared = {"v2": (torch.tensor([ids1]), torch.tensor([ids1]))}
    by_id = soco_loss({"v2": (q1, z1, q2s, z2s)}, ids=shared)[0].item()
    by_row = soco_loss({"v2": (q1, z1, q2s, z2s)})[0].item()
    assert by_id == pytest.approx(4 - 2 * (9 * r + 1) / 10 - 2 * r, abs=1e-6)
    assert by_id - by_row == pytest.approx(0.3 * (1 - r), abs=1e-6)
    # distinct ids in the same order on both sides: the same as pairing rows
    one = torch.tensor([[0, 1, 2, 3]])
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(2, 4, 1, 8, generator=g) for _ in range(4))
    x, _ = soco_loss({"v2": (a, b, c, d)}, ids={"v2": (one.expand(2, 4), one.expand(2, 4))})
    y, _ = soco_loss({"v2": (a, b, c, d)})
    assert x.item() == pytest.approx(y.item(), abs=1e-5)
    # levels are compared level by level (scale_aware off: L = 4)
    a4, b4 = torch.randn(1, 4, 4, 8, generator=g), torch.randn(1, 4, 4, 8, generator=g)
    x4, _ = soco_loss({"v2": (a4, b4, a4, b4)}, ids={"v2": (one, one)})
    assert x4.item() == pytest.approx(soco_loss({"v2": (a4, b4, a4, b4)})[0].item(), abs=1e-5)


def test_padding_is_drawn_per_side_after_the_jitter():
    """Official dataset.py: jitter_props on the selected proposals, then pad_bboxs_with_common
    pads each side of the pair with its own draw of copies of those boxes: a copy is the same
    (jittered) box, and the ids tell which proposal each row is on either side."""
    m = make(num_proposals=4, jitter_prob=1.0, cutout=False)
    props = np.array([[10.0, 10.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]])
    geoms = {"v1": whole_view(128, 128, 128), "v2": ViewGeometry((0, 0, 128, 128), (128, 128)),
             "v3": ViewGeometry((0, 0, 128, 128), (64, 64))}
    differ = 0
    for seed in range(10):
        out = m.sample_boxes({"v2": props, "v3": props}, geoms, 128, 128, np.random.default_rng(seed))
        for v in ("v2", "v3"):
            i1, iv = out[f"ids_v1_{v}"], out[f"ids_{v}"]
            assert out[f"valid_{v}"].tolist() == [True, True, False, False]
            assert i1[:2].tolist() == iv[:2].tolist() and sorted(i1[:2]) == [0, 1]
            for ids, key in ((i1, f"boxes_v1_{v}"), (iv, f"boxes_{v}")):
                for j in (0, 1):   # every copy of an id is the same box
                    rows = out[key][ids == j]
                    assert np.allclose(rows, rows[0])
            # the V side is the plain proposal of the same id, scaled into the view
            scale = geoms[v].out_size[0] / 128
            for r, j in enumerate(iv):
                src = props[np.argmin(np.abs(props * scale - out[f"boxes_{v}"][r]).sum(1))]
                assert np.allclose(out[f"boxes_{v}"][r], src * scale, atol=1e-4)
                assert np.allclose(out[f"boxes_{v}"][iv == iv[r]], src * scale, atol=1e-4)
            # V1's (jittered) box of an id lies nearest the proposal of that id on the V side
            near = lambda b, sc: int(np.argmin(np.abs(props * sc - b).sum(1)))
            for r1, j in enumerate(i1):
                rv = int(np.flatnonzero(iv == j)[0])
                assert near(out[f"boxes_v1_{v}"][r1], 1.0) == near(out[f"boxes_{v}"][rv], scale)
            differ += i1.tolist() != iv.tolist()
    assert differ > 0


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
    "jitter_on_crop_v1_cutout": dict(jitter_on="crop", cutout_views=("v1", "v2")),
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


# --------------------------------------------------------------------------- official defaults
def test_zero_init_residual_gamma():
    m = make()
    for name, p in m.online.backbone.named_parameters():
        if name.endswith("bn2.weight") and name.startswith("layer"):   # BasicBlock's last BN
            assert torch.equal(p, torch.zeros_like(p)), name
    assert m.online.backbone.bn1.weight.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(m.online.parameters(), m.target.parameters()))
    off = make(zero_init_residual=False)
    assert off.online.backbone.layer1[0].bn2.weight.abs().sum() > 0
    r50 = build_method("soco", backbone="resnet50", fpn_channels=16, head_conv_dim=16, head_fc_dim=32,
                       proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    assert all(b.bn3.weight.abs().sum() == 0 for layer in ("layer1", "layer4")
               for b in getattr(r50.online.backbone, layer))


def test_roi_align_adaptive_sampling(monkeypatch):
    from torchvision.ops import roi_align
    assert SoCo.Config.roi_sampling_ratio == -1 and SoCo.Config.roi_size == 7
    torch.manual_seed(0)
    f = torch.randn(1, 2, 16, 16)
    boxes, levels = torch.tensor([[[1.0, 2.0, 50.0, 40.0]]]), torch.zeros(1, 1, 1, dtype=torch.long)
    got = multilevel_roi_align([f], (4,), boxes, levels, 7, sampling_ratio=-1)
    want = roi_align(f, torch.tensor([[0, 1.0, 2.0, 50.0, 40.0]]), (7, 7), 1 / 4, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, multilevel_roi_align([f], (4,), boxes, levels, 7, sampling_ratio=1))
    # the encoder passes its config value through
    import methods.soco as S
    seen = []
    real = S.multilevel_roi_align
    monkeypatch.setattr(S, "multilevel_roi_align", lambda *a, **k: seen.append(k["sampling_ratio"]) or real(*a, **k))
    x, b = torch.randn(2, 3, 48, 48), torch.tensor([[[0.0, 0.0, 20.0, 20.0]]] * 2)
    make().online(x, b)
    make(roi_sampling_ratio=2).online(x, b)
    assert seen == [-1, 2]


def test_selective_search_soco_mode_is_one_strategy_with_the_official_segmentation(monkeypatch):
    """benchmark.data.proposal_cache mode "soco": one image, one Felzenszwalb segmentation with scale
    (k) 300, sigma 0.9, min size 100 (official generate_imagenet_ss_proposals.py), and one
    strategy combining colour, texture, size and fill."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "ximgproc"):
        pytest.skip("OpenCV without ximgproc")
    from benchmark.data import proposal_cache as P
    seg = cv2.ximgproc.segmentation
    calls = []

    class Spy:
        def __init__(self, ss):
            self.ss = ss

        def __getattr__(self, name):
            fn = getattr(self.ss, name)
            def wrapped(*a):
                calls.append((name, a))
                return fn(*a)
            return wrapped
    real = seg.createSelectiveSearchSegmentation
    monkeypatch.setattr(seg, "createSelectiveSearchSegmentation", lambda: Spy(real()))
    img = np.zeros((96, 128, 3), np.uint8)
    img[10:60, 20:80] = (250, 30, 30)
    img[40:90, 70:120] = (30, 30, 250)
    img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
    boxes = P.selective_search(img, mode="soco")
    names = [n for n, _ in calls]
    assert names.count("addImage") == 1 and names.count("addGraphSegmentation") == 1
    assert names.count("addStrategy") == 1 and names[-1] == "process"
    gs = next(a[0] for n, a in calls if n == "addGraphSegmentation")
    assert (gs.getK(), gs.getSigma(), gs.getMinSize()) == (300, pytest.approx(0.9), 100)
    image = next(a[0] for n, a in calls if n == "addImage")
    np.testing.assert_array_equal(image, img)                     # the RGB image, as the original
    assert len(boxes) >= 1 and (boxes[:, 2:] <= [128, 96]).all()
    calls.clear()
    fast = P.selective_search(img, mode="fast")
    assert "switchToSelectiveSearchFast" in [n for n, _ in calls]
    assert len(fast) > len(boxes)          # fast: several colour spaces, k and strategies


def test_ddp_step_with_an_empty_fpn_level(tmp_path):
    """Real DDP (gloo, world size 1, find_unused_parameters=False): steps whose boxes all go
    to P2 leave P3-P5 without a box; every parameter must still be reduced, or the second
    step raises "Expected to have finished reduction in the prior iteration"."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        m = make(multi_view=False)
        model = DDP(m, find_unused_parameters=False)
        samples = [m.views(record(i, proposals=np.array([[10, 10, 24, 24], [40, 40, 56, 52]])),
                           np.random.default_rng(i)) for i in range(2)]
        batch = m.collate(samples)
        for v in ("v1_v2", "v2"):
            batch[f"boxes_{v}"] = batch[f"boxes_{v}"].clamp(max=12)   # all boxes <= 12 px: P2 only
        assert (m.online.levels(batch["boxes_v2"]) == 0).all()
        opt = torch.optim.SGD(m.param_groups()[0]["params"], lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            model(batch)["loss"].backward()
            opt.step()
        assert all(p.grad is not None for p in m.param_groups()[0]["params"])
        fpn_out = m.online.fpn.layer_blocks[3]            # P5's output conv: no box there
        assert all(p.grad is not None for p in fpn_out.parameters())
    finally:
        dist.destroy_process_group()


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
