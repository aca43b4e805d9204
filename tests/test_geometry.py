"""The shared geometry layer (methods.geometry): boxes and points follow their pixels."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from PIL import Image

from methods.geometry import (ViewGeometry, align_windows, geometry_tensor, jitter_boxes, map_view_boxes,
                              random_view, whole_view, window_grid)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pixel_bbox(img: Image.Image, thresh: int = 128) -> tuple[float, float, float, float] | None:
    """xyxy (pixel-edge coordinates) of the pixels brighter than ``thresh``."""
    a = np.asarray(img.convert("L")) >= thresh
    ys, xs = np.nonzero(a)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@st.composite
def scene(draw):
    W = draw(st.integers(48, 160))
    H = draw(st.integers(48, 160))
    bw = draw(st.integers(12, W - 4))
    bh = draw(st.integers(12, H - 4))
    x0 = draw(st.integers(0, W - bw))
    y0 = draw(st.integers(0, H - bh))
    out = draw(st.integers(32, 128))
    seed = draw(st.integers(0, 2**31 - 1))
    return W, H, (x0, y0, x0 + bw, y0 + bh), out, seed


def _draw_box(W, H, box):
    a = np.zeros((H, W, 3), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return a


@FAST
@given(scene(), st.sampled_from(["random", "whole", "resized"]))
def test_box_follows_pixels(sc, kind):
    """A filled box drawn into the image lands where map_boxes says, in any crop/resize/flip."""
    W, H, box, out, seed = sc
    rng = np.random.default_rng(seed)
    g = random_view(W, H, out, rng, scale=(0.2, 1.0))
    if kind == "whole":
        g = whole_view(W, H, out, flip=bool(rng.random() < 0.5))
    elif kind == "resized":
        g = g.resized((max(16, out // 2), max(16, out // 2)))
    view = g.apply_image(_draw_box(W, H, box))
    clipped, keep = g.boxes_in_view(np.array([box]), min_visible=0.0, min_size=0.0)
    m = clipped[0] if keep[0] else None
    got = pixel_bbox(view)
    if m is None or min(m[2] - m[0], m[3] - m[1]) < 4:
        return  # (nearly) outside the view: nothing reliable to compare
    assert got is not None
    # one output pixel of blur from the resampling filter, plus rounding
    tol = 1.5
    np.testing.assert_allclose(got, m, atol=tol)


def test_flip_mirrors_box():
    g = ViewGeometry((0, 0, 100, 50), (100, 50), flip=True)
    np.testing.assert_allclose(g.map_boxes([[10, 5, 30, 20]]), [[70, 5, 90, 20]])
    img = g.apply_image(_draw_box(100, 50, (10, 5, 30, 20)))
    assert pixel_bbox(img) == (70.0, 5.0, 90.0, 20.0)


@FAST
@given(scene(), st.lists(st.tuples(st.floats(-50, 250), st.floats(-50, 250)), min_size=1, max_size=8))
def test_map_unmap_round_trip(sc, pts):
    W, H, _, out, seed = sc
    g = random_view(W, H, (out, out + 7), np.random.default_rng(seed))
    p = np.array(pts)
    np.testing.assert_allclose(g.unmap_points(g.map_points(p)), p, atol=1e-7)
    np.testing.assert_allclose(g.map_points(g.unmap_points(p)), p, atol=1e-7)


def test_grid_points_are_pixel_centres():
    g = ViewGeometry((10, 20, 30, 60), (2, 4))
    gp = g.grid_points(2, 4)
    assert gp.shape == (4, 2, 2)
    np.testing.assert_allclose(gp[0, 0], [15, 25])
    np.testing.assert_allclose(gp[-1, -1], [25, 55])


def test_boxes_in_view_drops_outside_and_partial():
    g = ViewGeometry((50, 50, 150, 150), (200, 200))   # x2 zoom
    boxes = np.array([[60, 60, 100, 100],     # inside
                      [0, 0, 40, 40],         # outside
                      [140, 60, 180, 100],    # 25% visible
                      [120, 60, 160, 100],    # 75% visible
                      [150, 150, 200, 200]])  # touches the corner only
    clipped, keep = g.boxes_in_view(boxes, min_visible=0.5)
    assert keep.tolist() == [True, False, False, True, False]
    np.testing.assert_allclose(clipped, [[20, 20, 100, 100], [140, 20, 200, 100]])
    _, keep_any = g.boxes_in_view(boxes, min_visible=0.0)
    assert keep_any.tolist() == [True, False, True, True, False]


@FAST
@given(scene())
def test_boxes_in_view_keeps_only_visible(sc):
    W, H, box, out, seed = sc
    g = random_view(W, H, out, np.random.default_rng(seed), scale=(0.1, 0.5))
    clipped, keep = g.boxes_in_view(np.array([box]), min_visible=0.5)
    if keep[0]:
        assert (clipped[:, [0, 2]] >= 0).all() and (clipped[:, [0, 2]] <= out).all()
        assert (clipped[:, [1, 3]] >= 0).all() and (clipped[:, [1, 3]] <= out).all()
        m = g.map_boxes([box])[0]
        area = (m[2] - m[0]) * (m[3] - m[1])
        c = clipped[0]
        assert (c[2] - c[0]) * (c[3] - c[1]) >= 0.5 * area - 1e-6


def test_jitter_boxes_statistics_and_bounds():
    rng = np.random.default_rng(0)
    n = 4000
    boxes = np.tile([[100.0, 50.0, 140.0, 130.0]], (n, 1))   # w 40, h 80
    j = jitter_boxes(boxes, rng, ratio=0.1, prob=1.0)
    w, h = j[:, 2] - j[:, 0], j[:, 3] - j[:, 1]
    cx, cy = (j[:, 0] + j[:, 2]) / 2, (j[:, 1] + j[:, 3]) / 2
    # each of x, y, w, h moves by r*w or r*h, r ~ U[-0.1, 0.1]
    assert np.abs(cx - 120).max() <= 4 + 1e-9 and np.abs(cy - 90).max() <= 8 + 1e-9
    assert (w >= 36 - 1e-9).all() and (w <= 44 + 1e-9).all()
    assert (h >= 72 - 1e-9).all() and (h <= 88 + 1e-9).all()
    # uniform: mean 0, std 0.1/sqrt(3)
    r = (w / 40 - 1)
    assert abs(r.mean()) < 0.005 and abs(r.std() - 0.1 / np.sqrt(3)) < 0.005
    # prob: the fraction of boxes that move
    moved = (np.abs(jitter_boxes(boxes, rng, prob=0.5) - boxes).sum(1) > 0).mean()
    assert 0.45 < moved < 0.55
    np.testing.assert_array_equal(jitter_boxes(boxes[:5], rng, prob=0.0), boxes[:5])
    assert jitter_boxes(np.zeros((0, 4)), rng).shape == (0, 4)


def test_jitter_is_deterministic_for_a_seed():
    b = np.array([[0, 0, 10, 10], [5, 5, 50, 40]], float)
    np.testing.assert_array_equal(jitter_boxes(b, np.random.default_rng(3)),
                                  jitter_boxes(b, np.random.default_rng(3)))


@pytest.mark.parametrize("W,H", [(200, 100), (64, 64), (33, 97)])
def test_random_view_crop_is_inside_image(W, H):
    rng = np.random.default_rng(1)
    for _ in range(50):
        g = random_view(W, H, 32, rng, scale=(0.5, 1.0))
        x0, y0, x1, y1 = g.crop
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert g.out_size == (32, 32)


# -- the tensor mappings (ReSim's windows) --------------------------------------------------
def G(crop, out, flip=False) -> torch.Tensor:
    return geometry_tensor(ViewGeometry(crop, out, flip))[None]


def test_window_maps_to_the_right_place_after_a_known_crop_and_flip():
    # source 200x100; q = left square, k = the square 50 px to the right; both views 50 px (x 0.5)
    q_crop, k_crop = (0, 0, 100, 100), (50, 0, 150, 100)
    win = torch.tensor([[30.0, 10, 40, 20], [0, 0, 10, 10], [0, 10, 10, 20]])
    boxes, valid = align_windows(win, G(q_crop, (50, 50)), G(k_crop, (50, 50)))
    # (30,10,40,20) on q -> source (60,20,80,40) -> k (5,10,15,20); (0,0,10,10) -> source x 0..20: left of k
    assert torch.allclose(boxes[0, 0], torch.tensor([5.0, 10, 15, 20]))
    assert valid[0].tolist() == [True, False, False]
    assert boxes[0, 1].tolist() == [0, 0, 1, 1]                          # the dummy box (datasets.py:88-90)
    # one shared flip: q's window (0,10,10,20) is q's unflipped x 40..50 -> source 80..100 -> k's
    # unflipped 15..25 -> flipped 25..35; (30,10,40,20) is now source x 20..40: left of k
    boxes, valid = align_windows(win, G(q_crop, (50, 50), True), G(k_crop, (50, 50), True))
    assert torch.allclose(boxes[0, 2], torch.tensor([25.0, 10, 35, 20]))
    assert torch.allclose(boxes[0, 1], torch.tensor([25.0, 0, 35, 10]))
    assert valid[0].tolist() == [False, True, True]
    # the far side is strict (x1 < W): a window of identical views ending at the border is invalid
    same = G((0, 0, 50, 50), (50, 50))
    _, valid = align_windows(torch.tensor([[40.0, 0, 50, 10], [39, 0, 49, 10], [0, 0, 10, 10]]), same, same)
    assert valid[0].tolist() == [False, True, True]


def test_device_mapping_equals_view_geometry():
    rng = np.random.default_rng(0)
    gq, gk, want = [], [], []
    win = window_grid(14, 9, 3).numpy()
    for i in range(8):
        a = ViewGeometry(tuple(rng.uniform(0, 60, 2)) + tuple(rng.uniform(80, 150, 2)), (64, 48), bool(i % 2))
        b = ViewGeometry(tuple(rng.uniform(0, 60, 2)) + tuple(rng.uniform(80, 150, 2)), (40, 64), bool(i % 3 == 0))
        src = np.concatenate([a.unmap_points(win[:, :2]), a.unmap_points(win[:, 2:])], 1)
        want.append(b.map_boxes(src))
        gq.append(geometry_tensor(a))
        gk.append(geometry_tensor(b))
    got = map_view_boxes(torch.from_numpy(win), torch.stack(gq), torch.stack(gk))
    assert torch.allclose(got, torch.tensor(np.stack(want), dtype=torch.float32), atol=1e-4)
