"""PixPro (methods/pixpro.py): positive pixel pairs through the geometry layer, the pixel
propagation module, both pixel losses, the instance switch, EMA and views."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from methods import build_method
from methods.backbones import c5_size
from methods.config import ConfigError
from methods.geometry import ViewGeometry, grid_matches, random_view
from methods.losses import masked_cosine_regression, pixel_info_nce
from methods.pixpro import PixelPropagation, PixPro, normalised_grid_matches

MICRO = dict(backbone="resnet18", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, crop_size=64)


pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


def make(**kw) -> PixPro:
    torch.manual_seed(0)
    return build_method("pixpro", **{**MICRO, **kw})


# --------------------------------------------------------------------------- positive pairs
def test_c5_size():
    assert [c5_size(s) for s in (224, 96, 64, 65, 32)] == [7, 3, 2, 3, 1]


def test_positive_mask_of_overlapping_halves_hand_drawn():
    """A 144x96 image; view A = its left 96x96, view B = its right 96x96 (overlap x 48-96),
    both at 96 px, so C5 is 3x3 with 32-px bins (diagonal 45.25, T*diag = 31.7).
    A's bin centres: x 16, 48, 80. B's: x 64, 96, 128, flipped: columns 0, 1, 2 -> x 128, 96, 64.
    Same row only (one row apart is 32 px >= 31.7); per row A1-B(x64), A2-B(x64), A2-B(x96)."""
    a = ViewGeometry((0, 0, 96, 96), (96, 96))
    b_flip = ViewGeometry((48, 0, 144, 96), (96, 96), flip=True)
    b = ViewGeometry((48, 0, 144, 96), (96, 96))

    def drawn(pairs):      # (A column, B column) pairs in every row
        m = np.zeros((9, 9), bool)
        for r in range(3):
            for ca, cb in pairs:
                m[r * 3 + ca, r * 3 + cb] = True
        return m

    np.testing.assert_array_equal(grid_matches(a, b_flip, (3, 3)), drawn([(1, 2), (2, 2), (2, 1)]))
    np.testing.assert_array_equal(grid_matches(a, b, (3, 3)), drawn([(1, 0), (2, 0), (2, 1)]))
    np.testing.assert_array_equal(grid_matches(b_flip, a, (3, 3)), drawn([(2, 1), (2, 2), (1, 2)]))
    # threshold 1.4 (distance < 63.4): A(0,1) at (48,16) meets B(0,2) (16 px), B(1,2) (35.8 px)
    # and B(0,1) (48 px); A(0,0) at (16,16) meets B(0,2) (48 px) but not B(0,1) or B(2,2) (80 px)
    wide = grid_matches(a, b_flip, (3, 3), threshold=1.4)
    assert wide[1, 2] and wide[1, 5] and wide[1, 1]
    assert wide[0, 2] and not wide[0, 1] and not wide[0, 8]


def test_positive_threshold_uses_the_larger_bin_diagonal():
    """A's bins are 32 px (diag 45.25), B's 16 px (diag 22.6): A(0,0) at (16,16) and B(0,2) at
    (40,8) are 25.3 px apart, a positive only under the larger diagonal (25.3 < 0.7 * 45.25)."""
    a = ViewGeometry((0, 0, 96, 96), (96, 96))
    b = ViewGeometry((0, 0, 48, 48), (96, 96))
    m = grid_matches(a, b, (3, 3))
    assert m[0, 2] and grid_matches(b, a, (3, 3))[2, 0]
    assert not m[0, 8]      # B(2,2) at (40,40): 33.9 px


def test_official_positives_normalise_x_by_width_and_y_by_height():
    """Official (transform_coord.py, PixPro.py ``regression_loss``): a crop is its first to last
    pixel, x / (W - 1), y / (H - 1); 3x3 grid. (a) A 200x100 image, crops (0,0,100,100) and
    (40,0,140,100): bins 33.3 px (diag 47.1); A(0,0) and B(0,0) are 40 px apart in x: in pixels
    40 / 47.1 = 0.85 (not positive); normalised dx 40/199 = 0.201, bin (99/199/3, 99/99/3) =
    (0.166, 0.333), diag 0.372: 0.54 (positive). (b) A 400x100 image, crops (0,0,60,60) and
    (0,17,60,77), 17 px apart in y: pixels 17 / 28.3 = 0.60 (positive); normalised dy 17/99 =
    0.172, bin (59/399/3, 59/99/3) = (0.049, 0.199), diag 0.205: 0.84 (not positive)."""
    a = ViewGeometry((0, 0, 100, 100), (96, 96))
    b = ViewGeometry((40, 0, 140, 100), (96, 96))
    assert normalised_grid_matches(a, b, (3, 3), (200, 100))[0, 0] and not grid_matches(a, b, (3, 3))[0, 0]
    a = ViewGeometry((0, 0, 60, 60), (96, 96))
    b = ViewGeometry((0, 17, 60, 77), (96, 96))
    assert grid_matches(a, b, (3, 3))[0, 0] and not normalised_grid_matches(a, b, (3, 3), (400, 100))[0, 0]
    # the same 17-px offset along the long side of a 100x400 image: 17/399 over 0.205 = 0.21
    assert normalised_grid_matches(a, b, (3, 3), (100, 400))[0, 0]
    # a flip swaps the crop's x corners: the flipped view's bins are the plain view's, mirrored
    b_flip = ViewGeometry((40, 0, 140, 100), (96, 96), flip=True)
    a, b = ViewGeometry((0, 0, 100, 100), (96, 96)), ViewGeometry((40, 0, 140, 100), (96, 96))
    plain = normalised_grid_matches(a, b, (3, 3), (200, 100)).reshape(9, 3, 3)
    flipped = normalised_grid_matches(a, b_flip, (3, 3), (200, 100)).reshape(9, 3, 3)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


@pytest.mark.parametrize("pos_coords", ["normalised", "pixels"])
def test_views_build_the_positives_by_the_chosen_rule(pos_coords):
    """``pos_coords`` picks the rule in ``views``: replaying its two crops (same seed) on a
    non-square image gives its mask; the default is the official one."""
    assert PixPro.Config().pos_coords == "normalised"
    m = make(pos_coords=pos_coords)
    img = np.zeros((60, 150, 3), np.uint8)
    rule = {"normalised": lambda g1, g2: normalised_grid_matches(g1, g2, (2, 2), (150, 60)),
            "pixels": lambda g1, g2: grid_matches(g1, g2, (2, 2))}[pos_coords]
    differs = 0
    for seed in range(40):
        got = m.views({"index": 0, "image": img}, np.random.default_rng(seed))["pos_12"].numpy()
        rng = np.random.default_rng(seed)
        g1, g2 = random_view(150, 60, 64, rng), random_view(150, 60, 64, rng)
        np.testing.assert_array_equal(got, rule(g1, g2))
        differs += int((normalised_grid_matches(g1, g2, (2, 2), (150, 60)) != grid_matches(g1, g2, (2, 2))).any())
    assert differs > 0          # the two rules are told apart on this image


def coord_images(W: int, H: int) -> tuple[Image.Image, Image.Image]:
    """Float images whose pixels hold their own source x (and y) centre coordinate."""
    xs = np.broadcast_to(np.arange(W, dtype=np.float32) + 0.5, (H, W)).copy()
    ys = np.broadcast_to((np.arange(H, dtype=np.float32) + 0.5)[:, None], (H, W)).copy()
    return Image.fromarray(xs), Image.fromarray(ys)


def sample(a: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear value of the (H, W) array ``a`` at continuous (x, y) points (centres at +0.5)."""
    x, y = pts[:, 0] - 0.5, pts[:, 1] - 0.5
    x0 = np.clip(np.floor(x).astype(int), 0, a.shape[1] - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, a.shape[0] - 2)
    fx, fy = x - x0, y - y0
    return (a[y0, x0] * (1 - fx) * (1 - fy) + a[y0, x0 + 1] * fx * (1 - fy)
            + a[y0 + 1, x0] * (1 - fx) * fy + a[y0 + 1, x0 + 1] * fx * fy)


def decode(g: ViewGeometry, X: Image.Image, Y: Image.Image, view_pts: np.ndarray) -> np.ndarray:
    """Source coordinates shown by the rendered view at ``view_pts``."""
    vx = np.asarray(g.apply_image(X), dtype=np.float64)
    vy = np.asarray(g.apply_image(Y), dtype=np.float64)
    return np.stack([sample(vx, view_pts), sample(vy, view_pts)], 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(W=st.integers(48, 200), H=st.integers(48, 200), out=st.sampled_from([64, 96, 128]),
       seed=st.integers(0, 2**31 - 1))
def test_warped_bin_centres_land_on_the_same_source_pixels(W, H, out, seed):
    """Render two random crop+flip views of an image whose pixels hold their own coordinates:
    at every bin centre each view shows the source point ``grid_points`` names, and where
    view A's bin centres fall inside view B, view B shows the same source point there."""
    rng = np.random.default_rng(seed)
    X, Y = coord_images(W, H)
    a, b = random_view(W, H, out, rng), random_view(W, H, out, rng)
    n = c5_size(out)
    c = (np.arange(n) + 0.5) * out / n
    centres = np.stack(np.meshgrid(c, c), -1).reshape(-1, 2)         # bin centres in view pixels
    seen_a = decode(a, X, Y, centres)
    # tolerance: PIL's bilinear filter is cut at the source image's border, which biases a
    # decoded coordinate there by up to ~0.1 px (seen: 0.109 at W=91, H=93, out=64)
    for g, seen in ((a, seen_a), (b, decode(b, X, Y, centres))):
        np.testing.assert_allclose(seen, g.grid_points(n, n).reshape(-1, 2), atol=0.25)
    in_b = b.map_points(a.grid_points(n, n).reshape(-1, 2))           # A's centres in view B
    inside = ((in_b >= 1) & (in_b <= out - 1)).all(1)
    if inside.any():
        np.testing.assert_allclose(decode(b, X, Y, in_b[inside]), seen_a[inside], atol=0.25)
    # the positives pair bins whose pixels show nearby source points
    m = grid_matches(a, b, (n, n))
    seen_b = decode(b, X, Y, centres)
    diag = max(math.hypot(*a.bin_size(n, n)), math.hypot(*b.bin_size(n, n)))
    i, j = np.nonzero(m)
    assert (np.linalg.norm(seen_a[i] - seen_b[j], axis=1) < 0.7 * diag + 0.2).all()


# --------------------------------------------------------------------------- PPM
def test_ppm_on_a_2x2_map_by_hand():
    """Pixels (1,0), (0,1), (1,1), (-1,0); g = identity. cos: x0.x2 = x1.x2 = 1/sqrt2,
    x2.x3 = -1/sqrt2 -> 0, x0.x3 = -1 -> 0, x0.x1 = x1.x3 = 0. gamma 2: s = 1/2 for the
    1/sqrt2 pairs. y_i = sum_j s_ij g(x_j)/|g(x_j)|."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]).t().reshape(1, 2, 2, 2)
    r = 1 / math.sqrt(2)
    y = PixelPropagation(2, gamma=2.0, layers=0)(x)
    expect = torch.tensor([[1 + 0.5 * r, 0.5 * r], [0.5 * r, 1 + 0.5 * r], [0.5 + r, 0.5 + r], [-1.0, 0.0]])
    torch.testing.assert_close(y[0].t(), expect)
    # gamma 1: the similarity itself
    y1 = PixelPropagation(2, gamma=1.0, layers=0)(x)
    torch.testing.assert_close(y1[0, :, 0], torch.tensor([1 + r * r, r * r]))
    # l = 1: g is a 1x1 conv (here the channel swap), its output normalised before propagation
    ppm = PixelPropagation(2, gamma=2.0, layers=1)
    with torch.no_grad():
        ppm.transform.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(2, 2, 1, 1))
        ppm.transform.bias.zero_()
    torch.testing.assert_close(ppm(x)[0].t(), expect.flip(1))
    assert isinstance(PixelPropagation(2, layers=2).transform[1], torch.nn.BatchNorm2d)


# --------------------------------------------------------------------------- losses
def test_pixpro_regression_by_hand():
    """Image 0: p pixels (1,0), (0,1); z pixel (1,0); both matched -> cos 1 and 0 -> -0.5.
    Image 1: nothing matched -> counts 0. Mean over the images: -0.25."""
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    z = torch.tensor([[[1.0], [0.0]], [[3.0], [4.0]]], requires_grad=True)
    match = torch.tensor([[[1.0], [1.0]], [[0.0], [0.0]]])
    loss = masked_cosine_regression(p, z, match)
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()
    assert z.grad is None and p.grad is not None
    assert p.grad[1].abs().sum() == 0            # the unmatched image gets no gradient
    # per image, not per pair: image 0 with 2 pairs and image 1 with 1 pair weigh the same
    match2 = torch.tensor([[[1.0], [1.0]], [[1.0], [0.0]]])
    assert masked_cosine_regression(p, z, match2).item() == pytest.approx(-(0.5 + 0.6) / 2)


def test_pixel_info_nce_by_hand():
    """tau 0.5. q pixels (1,0), (0,1); k pixels (1,0), (0,1), (-1,0). Pixel 0: positive {0}
    -> -log(e^2 / (e^2 + e^0 + e^-2)); pixel 1: positives {1, 2} ->
    -log((e^2 + e^0) / (e^0 + e^2 + e^0)); pixel with no positive left out."""
    q = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])          # (1, C=2, Li=3)
    k = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])         # (1, C=2, Lj=3)
    match = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    e = math.exp
    l0 = -math.log(e(2) / (e(2) + e(0) + e(-2)))
    l1 = -math.log((e(2) + e(0)) / (e(0) + e(2) + e(0)))
    loss = pixel_info_nce(q, k, match, temperature=0.5)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # a second image without any positive counts 0 in the mean over images, with no NaN gradient
    q2 = torch.cat([q, q]).requires_grad_(True)
    loss2 = pixel_info_nce(q2, torch.cat([k, k]), torch.cat([match, torch.zeros_like(match)]), 0.5)
    assert loss2.item() == pytest.approx((l0 + l1) / 4, rel=1e-6)
    loss2.backward()
    assert torch.isfinite(q2.grad).all() and q2.grad[1].abs().sum() == 0


# --------------------------------------------------------------------------- model
def test_views_and_forward_shapes():
    m = make()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
    samples = [m.views({"index": i, "image": img}, np.random.default_rng(i)) for i in range(4)]
    s = samples[0]
    assert s["v1"].shape == (3, 64, 64) and s["v2"].shape == (3, 64, 64)
    assert s["pos_12"].shape == (4, 4) and s["pos_12"].dtype == torch.bool
    batch = m.collate(samples)
    out = m(batch)
    assert set(out) == {"loss", "loss_pix", "pos_pairs"} and torch.isfinite(out["loss"])
    assert -4.0 <= out["loss"].item() <= 4.0       # -2cos summed over two directions
    batch["pos_12"] = torch.zeros(4, 9, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="pos_12"):
        m(batch)


def test_objectives_and_instance_switch():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)

    def batch(m):
        return m.collate([m.views({"index": i, "image": img}, np.random.default_rng(i)) for i in range(3)])

    plain = make()
    assert plain.predictor is None and plain.online.instance_projector is None
    contrast = make(objective="pixcontrast")
    assert contrast.ppm is None
    out = contrast(batch(contrast))
    assert out["loss"].item() >= 0                 # an InfoNCE
    inst = make(instance_weight=1.0)
    assert inst.predictor is not None and inst.target.instance_projector is not None
    out = inst(batch(inst))
    torch.testing.assert_close(out["loss"].detach(), out["loss_pix"] + out["loss_instance"])
    half = make(instance_weight=0.5)
    o = half(batch(half))
    torch.testing.assert_close(o["loss"].detach(), o["loss_pix"] + 0.5 * o["loss_instance"])
    # every online part is trained, no target part is
    trained = {id(p) for g in inst.param_groups() for p in g["params"]}
    assert all(id(p) in trained for p in inst.predictor.parameters())
    assert all(id(p) in trained for p in inst.ppm.parameters())
    assert not any(id(p) in trained for p in inst.target.parameters())


def _rows_through(head: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """lin -> BN (training: batch mean, biased variance) -> ReLU -> lin, by hand, on rows; the
    head's weights read from its Linear or 1x1-conv layers."""
    lin1, bn, _, lin2 = head

    def w(layer):
        return layer.weight.reshape(layer.weight.shape[0], -1)

    h = rows @ w(lin1).t() + (lin1.bias if lin1.bias is not None else 0)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    return h.clamp(min=0) @ w(lin2).t() + lin2.bias


def test_instance_branch_applies_the_heads_per_pixel_then_pools():
    """Official PixPro.forward: projector_instance and predictor (1x1-conv MLPs) on the C5 map,
    then avgpool; the target's projector per pixel, then avgpool. The paper's order (switch
    ``instance_pool: before``) pools C5 first. With the same weights the two differ (BN and
    ReLU are not linear), and the default equals the per-pixel heads then the mean, by hand."""
    torch.manual_seed(1)
    m = make(instance_weight=1.0)
    assert m.cfg.instance_pool == "after"
    for bn in (m.online.instance_projector[1], m.predictor[1]):        # non-trivial BN affine
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    c5 = torch.randn(3, 512, 2, 2)                                       # resnet18 C5, 2x2
    pixels = c5.permute(0, 2, 3, 1).reshape(-1, 512)                     # (N*H*W, C) rows
    with torch.no_grad():
        proj = _rows_through(m.online.instance_projector, pixels)
        by_hand = _rows_through(m.predictor, proj).reshape(3, 4, -1).mean(1)
        target_by_hand = _rows_through(m.target.instance_projector, pixels).reshape(3, 4, -1).mean(1)
        got = m.instance_embedding(m.online, c5, predict=True)
        target = m.instance_embedding(m.target, c5, predict=False)
    torch.testing.assert_close(got, by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(target, target_by_hand, rtol=1e-4, atol=1e-5)
    # the paper's order, the same weights copied into its Linear / BatchNorm1d heads
    paper = make(instance_weight=1.0, instance_pool="before")
    for src, dst in ((m.online.instance_projector, paper.online.instance_projector), (m.predictor, paper.predictor)):
        state = {k: v.reshape(dst.state_dict()[k].shape) for k, v in src.state_dict().items()}
        dst.load_state_dict(state)
    with torch.no_grad():
        pooled = paper.instance_embedding(paper.online, c5, predict=True)
        pooled_by_hand = _rows_through(m.predictor, _rows_through(m.online.instance_projector, c5.mean((2, 3))))
    torch.testing.assert_close(pooled, pooled_by_hand, rtol=1e-4, atol=1e-5)
    assert (pooled - got).abs().max() > 0.1 * got.abs().max()            # the order matters
    # both orders train end to end
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (72, 90, 3), dtype=np.uint8)
    out = paper(paper.collate([paper.views({"index": i, "image": img}, np.random.default_rng(i)) for i in range(3)]))
    assert torch.isfinite(out["loss_instance"])


@pytest.mark.parametrize("backbone, block, last_bn, count", [("resnet50", "Bottleneck", "bn3", 16),
                                                             ("resnet18", "BasicBlock", "bn2", 8)])
def test_last_bn_gamma_of_every_residual_block_starts_at_zero(backbone, block, last_bn, count):
    """Official contrast/resnet.py zeroes bn3.weight (Bottleneck) / bn2.weight (BasicBlock)
    of every block: 16 in a ResNet-50. ``zero_init_residual: false`` restores ones."""
    def blocks(m):
        return [b for enc in (m.online, m.target) for b in enc.backbone.modules() if type(b).__name__ == block]

    on = make(backbone=backbone)
    assert len(blocks(on)) == 2 * count                                # online and target
    for b in blocks(on):
        assert torch.all(getattr(b, last_bn).weight == 0)
        assert torch.all(b.bn1.weight == 1)                           # only the last BN
    assert torch.all(on.online.backbone.bn1.weight == 1)
    off = make(backbone=backbone, zero_init_residual=False)
    assert all(torch.all(getattr(b, last_bn).weight == 1) for b in blocks(off))


def test_export_is_the_backbone_only():
    state = make(instance_weight=1.0).export()
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    assert not any(k.startswith(("fc.", "projector", "instance", "fpn.")) for k in state)


@pytest.mark.parametrize("bad, field", [({"objective": "pixel"}, "objective"), ({"ppm_layers": 3}, "ppm_layers"),
                                        ({"gamma": 0}, "gamma"), ({"instance_weight": -1}, "instance_weight"),
                                        ({"crop_scale": [0.5, 0.2]}, "crop_scale"), ({"crop_size": 16}, "crop_size"),
                                        ({"pos_radius": 1}, "pos_radius"), ({"pos_coords": "image"}, "pos_coords"),
                                        ({"instance_pool": "max"}, "instance_pool")])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"method.{field}"):
        build_method("pixpro", **{**MICRO, **bad})


def test_paper_defaults():
    c = PixPro.Config()
    assert (c.pos_threshold, c.gamma, c.ppm_layers, c.temperature, c.momentum) == (0.7, 2.0, 1, 0.3, 0.99)
    assert (c.proj_hidden_dim, c.proj_dim, c.crop_size, tuple(c.crop_scale)) == (4096, 256, 224, (0.08, 1.0))
    # official code over the paper (docs/methods/pixpro.md)
    assert (c.instance_pool, c.pos_coords, c.zero_init_residual) == ("after", "normalised", True)
    r = PixPro.recipe
    assert (r.optimizer, r.base_lr, r.lr_batch, r.batch_size, r.weight_decay, r.warmup_epochs) == \
        ("lars", 1.0, 256, 1024, 1e-5, 5)
