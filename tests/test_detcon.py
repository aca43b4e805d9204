"""DetCon (methods/detcon.py, benchmark/data/mask_cache.py): the grid assignment and mask
pooling on hand-made masks, the sampler, the contrastive-detection loss by hand (positives,
same-view removal, duplicate weights, rows without a positive), the forward's wiring of both
directions, masks following their pixels through crop + flip + resize, and the FH mask cache
(key, no recompute, resume, bytes per image, the pretraining stage's record)."""
from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import methods.detcon  # noqa: F401  (registers "detcon")
from benchmark.data import mask_cache as MC
from benchmark.data.synthetic import render_image
from methods import build_method, get_method
from methods.augment import IMAGENET_MEAN, IMAGENET_STD, Photometric
from methods.byol import official_crop
from methods.detcon import (DetCon, contrastive_detection, grid_assignment, mask_pool, relabel_pair,
                            sample_mask_ids)
from methods.geometry import ViewGeometry, apply_mask

TINY = DetCon.scales["tiny"]["method"]
pytestmark = pytest.mark.usefixtures("plain_cpu_kernels")   # tests/conftest.py


def _tiny(**kw):
    torch.manual_seed(0)
    return build_method("detcon", **{**TINY, **kw})


def _block_mask(w: int, h: int, block: int, rng) -> np.ndarray:
    """Ids constant on block x block squares, drawn from 0..5."""
    small = rng.integers(0, 6, (-(-h // block), -(-w // block)))
    return np.kron(small, np.ones((block, block), np.int64))[:h, :w].astype(np.uint16)


def _records(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "masks": _block_mask(size, size, 16, rng)} for _ in range(n)]


# -- defaults -----------------------------------------------------------------------------
def test_registered_with_the_official_detcon_b_defaults():
    assert get_method("detcon") is DetCon
    c = DetCon.Config()
    assert (c.variant, c.temperature, c.num_masks, c.max_mask_id, c.momentum) == ("b", 0.1, 16, 256, 0.996)
    assert (c.proj_hidden_dim, c.proj_dim, c.pred_hidden_dim, c.view_size) == (4096, 256, 4096, 224)
    assert (c.fh_scale, c.fh_min_size, c.fh_sigma, c.fh_max_side) == (1000.0, 1000, 0.8, 0)
    r = DetCon.recipe
    assert (r.optimizer, r.base_lr, r.batch_size, r.weight_decay, r.warmup_epochs, r.epochs) == \
        ("lars", 0.2, 4096, 1.5e-6, 10, 1000)
    m = build_method("detcon")
    assert m.mask_params() == {"scale": 1000.0, "sigma": 0.8, "min_size": 1000, "max_side": None}
    dims = lambda h: [(l.in_features, l.out_features) for l in h if isinstance(l, torch.nn.Linear)]
    assert dims(m.projector) == [(2048, 4096), (4096, 256)] and dims(m.predictor) == [(256, 4096), (4096, 256)]
    s = build_method("detcon", variant="s", backbone="resnet18", proj_hidden_dim=64, proj_dim=32)
    assert not any(hasattr(s, a) for a in ("predictor", "target_encoder", "target_projector"))
    assert s.aug[0].jitter == (0.8, 0.8, 0.8, 0.2) and s.aug[0].blur_p == 0.5 == s.aug[1].blur_p
    with pytest.raises(Exception, match="method.variant"):
        build_method("detcon", variant="x")


# -- masks on the device ------------------------------------------------------------------
def test_grid_assignment_and_mask_pooling_by_hand():
    # a 4x4 id map over a 2x2 grid (2x2-pixel windows)
    m = torch.tensor([[[0, 0, 1, 1],
                       [0, 3, 1, 2],
                       [3, 3, 2, 2],
                       [3, 3, 2, 0]]])
    a = grid_assignment(m, (2, 2), num_ids=4)
    # cell 0: 0,0,0,3 -> 0; cell 1: 1,1,1,2 -> 1; cell 2: all 3; cell 3: 2,2,2,0 -> 2
    assert a.tolist() == [[0, 1, 3, 2]]
    # a tie goes to the lowest id: cell {1, 2, 2, 1} -> 1
    tie = torch.tensor([[[2, 1], [1, 2]]])
    assert grid_assignment(tie, (1, 1), num_ids=3).tolist() == [[1]]
    # 32-px windows of a 64-px map on a 2x2 grid: the official avg-pool + argmax
    big = torch.zeros(1, 64, 64, dtype=torch.long)
    big[0, 20:, :50] = 5     # id 5 holds 384, 216, 1024 and 576 of each cell's 1024 pixels
    assert grid_assignment(big, (2, 2), 8).tolist() == [[0, 0, 5, 5]]
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])   # (1, C=2, 2, 2)
    a2 = torch.tensor([[0, 1, 1, 2]])
    pooled = mask_pool(feat, a2, torch.tensor([[1, 0, 2, 3, 1]]))
    assert pooled.tolist() == [[[2.5, 25.0], [1.0, 10.0], [4.0, 40.0], [0.0, 0.0], [2.5, 25.0]]]   # id 3: no cell


def test_sampler_draws_present_ids_uniformly_with_replacement():
    assign = torch.tensor([[1, 3, 3, 4]]).repeat(2000, 1)
    torch.manual_seed(0)
    ids = sample_mask_ids(assign, num_ids=6, n=16)
    assert ids.shape == (2000, 16) and set(ids.unique().tolist()) == {1, 3, 4}   # present ids only
    freq = torch.bincount(ids.flatten(), minlength=6)[[1, 3, 4]].float() / ids.numel()
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.01)   # uniform over ids, not cells
    assert (ids == ids[:, :1]).all(1).float().mean() < 0.01            # 16 independent draws
    one = sample_mask_ids(torch.tensor([[2, 2, 2, 2]]), 4, 16)
    assert one.tolist() == [[2] * 16]                                   # duplicates when fewer are present


# -- the loss -----------------------------------------------------------------------------
def _hand_loss(pred, ids, other, oids, same, sids, tau, offset=0):
    """The official loss written as loops over rows and entries."""
    pred, other, same = (x.double() for x in (pred, other, same))
    nrm = lambda v: v / v.norm()
    B, n, _ = pred.shape
    G = other.shape[0]
    rows = []
    for b in range(B):
        for k in range(n):
            p, i = nrm(pred[b, k]), int(ids[b, k])
            entries = [(float(p @ nrm(other[g, j])) / tau, g == b + offset and int(oids[g, j]) == i)
                       for g in range(G) for j in range(n)]
            entries += [(float(p @ nrm(same[g, j])) / tau, False) for g in range(G) for j in range(n)
                        if not (g == b + offset and int(sids[g, j]) == i)]     # same view, same mask: removed
            n_pos = sum(pos for _, pos in entries)
            if n_pos == 0:
                rows.append(0.0)
                continue
            lse = math.log(sum(math.exp(l) for l, _ in entries))
            ce = -sum((l - lse) / n_pos for l, pos in entries if pos)
            rows.append(ce / int((ids[b] == i).sum()))
    return sum(rows) / len(rows)


def test_contrastive_detection_closed_forms():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])   # norms differ: cosines, not dots
    t = lambda *v: torch.stack(v)[None]
    ids = lambda *v: torch.tensor([v])
    # tau 0.5. Two masks, each with its positive: logits [2 (pos), 0 | removed, 0] -> log(1 + 2 e^-2)
    got = contrastive_detection(t(e1, e2), ids(0, 1), t(e1, e2), ids(0, 1), t(e1, e2), ids(0, 1), 0.5)
    assert float(got) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    # one id drawn twice in this view: both same-view copies removed, each row weighted 1/2
    got = contrastive_detection(t(e1, e1), ids(0, 0), t(e1, e2), ids(0, 1), t(e1, e1), ids(0, 0), 0.5)
    assert float(got) == pytest.approx(0.5 * math.log(1 + math.exp(-2)), rel=1e-6)
    # two positives share the label: -(1/2)(2 - lse) * 2 with lse = log(2 e^2 + e^0 (same view, id 1))
    got = contrastive_detection(t(e1, e2), ids(0, 1), t(e1, e1), ids(0, 0), t(e1, e2), ids(0, 1), 0.5)
    row0 = math.log(2 * math.exp(2) + 1) - 2
    assert float(got) == pytest.approx(row0 / 2, rel=1e-6)   # row 1 (id 1) has no positive: 0, still counted


def test_contrastive_detection_matches_the_loops_with_negatives_from_other_images():
    g = torch.Generator().manual_seed(3)
    B, n, D, G = 2, 4, 5, 3     # local images 0, 1 are global images 1, 2 (offset 1)
    pred = torch.randn(B, n, D, generator=g)
    other, same = torch.randn(G, n, D, generator=g), torch.randn(G, n, D, generator=g)
    ids = torch.tensor([[0, 2, 2, 5], [1, 1, 1, 1]])
    sids = torch.cat([torch.tensor([[0, 1, 2, 3]]), ids])
    oids = torch.tensor([[0, 2, 2, 5], [2, 2, 0, 3], [1, 4, 1, 1]])   # image 1: id 0 and 5 lack a positive
    got = contrastive_detection(pred, ids, other, oids, same, sids, 0.1, offset=1)
    want = _hand_loss(pred, ids, other, oids, same, sids, 0.1, offset=1)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert 0 < want
    # the offset matters: positives are looked up in the global batch
    assert float(contrastive_detection(pred, ids, other, oids, same, sids, 0.1, offset=0)) != pytest.approx(want)


def test_forward_is_both_directions_of_the_loss_on_the_pooled_masks():
    m = _tiny()
    m.train()
    recs = _records()
    batch = m.collate([m.views(r, np.random.default_rng(i)) for i, r in enumerate(recs)])
    torch.manual_seed(7)
    out = m(batch)
    torch.manual_seed(7)   # the same uniforms: the same 16 ids per view
    from methods.backbones import resnet_stages
    with torch.no_grad():
        feats = [resnet_stages(m.encoder, batch[v])[-1] for v in ("view1", "view2")]
        assign = [grid_assignment(batch[k], f.shape[-2:], 256) for k, f in zip(("mask1", "mask2"), feats)]
        ids = [m.sample_ids(a) for a in assign]
        B, n = ids[0].shape
        p = [m.predictor(m.projector(mask_pool(f, a, k).flatten(0, 1))).view(B, n, -1)
             for f, a, k in zip(feats, assign, ids)]
        tf = [resnet_stages(m.target_encoder, batch[v])[-1] for v in ("view1", "view2")]
        t = [m.target_projector(mask_pool(f, a, k).flatten(0, 1)).view(B, n, -1) for f, a, k in zip(tf, assign, ids)]
    l12 = _hand_loss(p[0], ids[0], t[1], ids[1], t[0], ids[0], 0.1)
    l21 = _hand_loss(p[1], ids[1], t[0], ids[0], t[1], ids[1], 0.1)
    assert float(out["loss_12"]) == pytest.approx(l12, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(l12 + l21, rel=1e-4)   # summed, not averaged
    assert assign[0].shape == (4, 4)   # ResNet-18 at 64 px: a 2x2 C5 grid
    out["loss"].backward()
    assert all(q.grad is None for q in [*m.target_encoder.parameters(), *m.target_projector.parameters()])
    assert m.encoder.conv1.weight.grad.abs().sum() > 0 and m.predictor[0].weight.grad.abs().sum() > 0


def test_detcon_s_shares_one_network_and_trains_through_both_sides(monkeypatch):
    m = _tiny(variant="s")
    m.train()
    batch = m.collate([m.views(r, np.random.default_rng(i)) for i, r in enumerate(_records())])
    torch.manual_seed(3)
    out = m(batch)
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith(("target_", "predictor")) for n in names)
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert trained == {id(p) for p in m.parameters()}
    # the targets are the same projections with their gradient: detaching them changes the gradient
    out["loss"].backward()
    g_full = m.projector[0].weight.grad.clone()
    assert torch.isfinite(out["loss"]) and g_full.abs().sum() > 0
    m.zero_grad()
    monkeypatch.setattr(methods.detcon, "gather_with_grad", lambda x: x.detach())
    torch.manual_seed(3)
    detached = m(batch)
    detached["loss"].backward()
    assert float(detached["loss"].detach()) == pytest.approx(float(out["loss"].detach()), rel=1e-5)
    assert not torch.allclose(m.projector[0].weight.grad, g_full, rtol=1e-3, atol=1e-6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.momentum_update(0.5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # no EMA in DetCon_S


# -- masks follow their pixels ------------------------------------------------------------
def _ties(n_out: int, lo: int, hi: int) -> np.ndarray:
    """View pixels whose centre falls exactly on a source pixel edge (nearest-neighbour ties)."""
    return np.array([(Fraction(2 * k + 1, 2 * n_out) * (hi - lo)).denominator == 1 for k in range(n_out)])


def test_masks_follow_their_pixels_through_crop_flip_and_resize():
    rng = np.random.default_rng(0)
    for _ in range(200):
        W, H = int(rng.integers(16, 90)), int(rng.integers(16, 90))
        ids = rng.integers(0, 256, (H, W)).astype(np.uint8)
        g = ViewGeometry(official_crop(W, H, rng), (int(rng.integers(4, 70)), int(rng.integers(4, 70))),
                         bool(rng.random() < 0.5))
        got = apply_mask(ids, g)
        image = np.asarray(g.apply_image(np.stack([ids] * 3, -1), Image.NEAREST))[..., 0]   # the image itself
        x0, y0, x1, y1 = g.crop
        tx, ty = _ties(g.out_size[0], x0, x1), _ties(g.out_size[1], y0, y1)
        if g.flip:
            tx = tx[::-1]
        exact = ~ty[:, None] & ~tx[None, :]
        assert np.array_equal(got[exact], image[exact])
        # on a tie the map takes one of the two pixels the edge separates (the one after it)
        centre = g.unmap_points(np.stack(np.meshgrid(np.arange(g.out_size[0]) + 0.5,
                                                     np.arange(g.out_size[1]) + 0.5), -1).reshape(-1, 2))
        cx = np.clip(np.floor(centre[:, 0] + 1e-6), 0, W - 1).astype(int)
        cy = np.clip(np.floor(centre[:, 1] + 1e-6), 0, H - 1).astype(int)
        assert np.array_equal(got.ravel(), ids[cy, cx])


def test_a_mask_stored_at_lower_resolution_maps_to_the_same_view():
    rng = np.random.default_rng(1)
    for _ in range(50):
        half = rng.integers(0, 50, (32, 48)).astype(np.uint16)       # a map stored at 48 x 32 ...
        full = np.kron(half, np.ones((2, 2), np.uint16))              # ... of a 96 x 64 image
        g = ViewGeometry(official_crop(96, 64, rng), (int(rng.integers(8, 60)),) * 2, bool(rng.random() < 0.5))
        assert np.array_equal(apply_mask(half, g, (96, 64)), apply_mask(full, g))
    g = ViewGeometry((10, 4, 50, 44), (20, 20))
    assert not np.array_equal(apply_mask(half, g), apply_mask(full, g))   # without the image size: wrong


def test_views_carry_the_mask_with_the_pixels():
    """A picture painted by its own mask: through views() (crop, flip, bilinear resize; no
    colour augmentation) every view pixel away from a block edge shows the colour of the id its
    mask holds, with one id <-> colour map shared by both views."""
    m = _tiny(view_size=48)
    m.aug = (Photometric(jitter_p=0, gray_p=0, blur_p=0),) * 2
    rng = np.random.default_rng(2)
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250], [128, 128, 128]])
    for trial in range(20):
        mask = _block_mask(64, 48, 8, rng)
        rec = {"image": palette[mask].astype(np.uint8), "masks": mask}
        v = m.views(rec, np.random.default_rng(trial))
        pairs = set()
        for name, mk in (("view1", "mask1"), ("view2", "mask2")):
            rgb = (v[name].permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN) * 255
            dist = np.abs(rgb[:, :, None, :] - palette[None, None]).max(-1)
            clean = dist.min(-1) < 1.0                      # pixels not blended across an edge
            colour = dist.argmin(-1)
            assert clean.mean() > 0.3
            pairs |= set(zip(colour[clean].tolist(), v[mk].numpy()[clean].tolist()))
        colours, labels = zip(*pairs)
        assert len(set(colours)) == len(pairs) == len(set(labels))   # a bijection over both views


def test_relabel_pair_is_one_map_for_both_views_and_wraps():
    a, b = np.array([[7, 300], [7, 9]]), np.array([[9, 1000]])
    ra, rb = relabel_pair(a, b, 256)
    assert ra.tolist() == [[0, 2], [0, 1]] and rb.tolist() == [[1, 3]] and ra.dtype == np.uint8
    ra, rb = relabel_pair(a, b, 3)           # 4 ids into 3: wrapped, as the official uint8 cast
    assert ra.tolist() == [[0, 2], [0, 1]] and rb.tolist() == [[1, 0]]


# -- the mask cache -----------------------------------------------------------------------
def _image_files(tmp_path, n=5, size=96):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(n):
        img, _ = render_image(np.random.default_rng([5, i]), size)
        p = folder / f"{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths


def test_felzenszwalb_backend_and_segments():
    assert MC.fh_backend() in ("skimage", "opencv")
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = (200, 40, 90)
    ids = MC.segment(img, scale=1000, sigma=0.8, min_size=200)
    assert ids.dtype == np.uint16 and ids.shape == (40, 60) and ids.max() == 1   # two segments, ids 0..n-1
    assert len(np.unique(ids[:, :27])) == 1 and len(np.unique(ids[:, 33:])) == 1 and ids[0, 0] != ids[0, 59]
    # the blurred edge's columns (40 px each, uniform inside) stand alone below min_size 40
    assert MC.segment(img, scale=100, sigma=0.8, min_size=20).max() > 1
    small = MC.segment(img, 1000, 0.8, 50, max_side=30)
    assert small.shape == (20, 30)
    buf, wide = MC.encode_mask(ids)
    assert not wide and np.array_equal(MC.decode_mask(buf, 60, 40, wide), ids)
    many = np.arange(600, dtype=np.uint16).reshape(20, 30)
    buf, wide = MC.encode_mask(many)
    assert wide and np.array_equal(MC.decode_mask(buf, 30, 20, wide), many)


def test_cache_key_holds_the_fh_parameters_and_a_second_call_reads_it(tmp_path, monkeypatch):
    paths = _image_files(tmp_path)
    cache = MC.compute_masks(paths, tmp_path / "c", min_size=50, num_workers=1, chunk_size=2, progress=False)
    assert cache.params == {"algorithm": "felzenszwalb", "backend": MC.fh_backend(), "scale": 1000.0,
                            "sigma": 0.8, "min_size": 50, "max_side": None, "version": MC.CACHE_VERSION}
    for i, p in enumerate(paths):
        img = np.asarray(Image.open(p).convert("RGB"))
        assert np.array_equal(cache.mask(i), MC.segment(img, 1000.0, 0.8, 50))
        assert cache.image_size(i) == cache.mask_size(i) == (96, 96)
    files = sorted(f.name for f in (tmp_path / "c").iterdir())
    assert len(files) == 2 and files[0].endswith(".bin") and files[1].endswith(".npz")   # parts removed

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(MC, "segment", boom)
    again = MC.compute_masks(paths, tmp_path / "c", min_size=50, num_workers=1, chunk_size=2, progress=False)
    assert again.path == cache.path and np.array_equal(again.mask(3), cache.mask(3))
    # every FH parameter names another cache
    for kw in ({"min_size": 51}, {"scale": 999.0, "min_size": 50}, {"sigma": 0.5, "min_size": 50},
               {"max_side": 64, "min_size": 50}):
        with pytest.raises(AssertionError, match="recomputed"):
            MC.compute_masks(paths, tmp_path / "c", num_workers=1, progress=False, **kw)
    # the memory map is reopened after a pickle (DataLoader workers), never copied into it
    blob = pickle.dumps(again)
    assert len(blob) < 4000 and np.array_equal(pickle.loads(blob).mask(4), cache.mask(4))


def test_an_interrupted_computation_resumes_with_the_missing_chunks(tmp_path, monkeypatch):
    paths = _image_files(tmp_path)
    real, calls = MC.segment, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(MC, "segment", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        MC.compute_masks(paths, tmp_path / "c", min_size=50, num_workers=1, chunk_size=2, progress=False)
    parts = list((tmp_path / "c").glob("*.parts/part-*.npz"))
    assert [p.name for p in parts] == ["part-00000.npz"] and not list((tmp_path / "c").glob("*.npz"))
    calls.clear()
    monkeypatch.setattr(MC, "segment", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cache = MC.compute_masks(paths, tmp_path / "c", min_size=50, num_workers=1, chunk_size=2, progress=False)
    assert len(calls) == 3                   # chunks 1 and 2 only
    monkeypatch.setattr(MC, "segment", real)
    fresh = MC.compute_masks(paths, tmp_path / "fresh", min_size=50, num_workers=1, chunk_size=5, progress=False)
    assert all(np.array_equal(cache.mask(i), fresh.mask(i)) for i in range(len(paths)))


def test_worker_processes_give_the_same_cache(tmp_path):
    paths = _image_files(tmp_path, n=4, size=64)
    inline = MC.compute_masks(paths, tmp_path / "a", min_size=50, num_workers=1, chunk_size=2, progress=False)
    # spawn, the product's default: a fork from the test process, whose torch and OpenCV thread
    # pools are already running, can deadlock in the child (it hung the whole suite).
    pooled = MC.compute_masks(paths, tmp_path / "b", min_size=50, num_workers=2, chunk_size=2, progress=False)
    assert pooled.path.name == inline.path.name
    assert all(np.array_equal(inline.mask(i), pooled.mask(i)) for i in range(len(paths)))


def test_bytes_per_image(tmp_path, capsys):
    """Stored bytes per image (docs/methods/detcon.md quotes these): synthetic scenes at the
    official FH parameters, 10 images per size."""
    per = {}
    for size in (64, 224, 512):
        sub = tmp_path / str(size)
        sub.mkdir()
        paths = _image_files(sub, n=10, size=size)
        cache = MC.compute_masks(paths, sub / "c", num_workers=1, chunk_size=10, progress=False)
        per[size] = cache.bytes_per_image
        assert cache.bytes_per_image < size * size / 8   # under an eighth of the raw uint8 map
    with capsys.disabled():
        print("\nmask cache bytes per image (synthetic, FH 1000/1000):",
              {s: round(b) for s, b in per.items()}, "+ 29 bytes of index")


def test_the_pretraining_stage_hands_the_cached_masks_to_views(tmp_path):
    from benchmark.data.images import ImageSource
    from benchmark.stages.pretrain import PretrainDataset
    paths = _image_files(tmp_path, n=3, size=64)
    cache = MC.compute_masks(paths, tmp_path / "c", min_size=50, num_workers=1, progress=False)
    m = _tiny()
    ds = PretrainDataset(ImageSource.from_folder(tmp_path / "images"), m, seed=0, masks=cache)
    assert np.array_equal(ds.record(1)["masks"], cache.mask(1))
    sample = ds[(0, 1)]
    assert sample["mask1"].shape == (64, 64) and sample["mask1"].dtype == torch.uint8
    with pytest.raises(KeyError, match="masks"):
        PretrainDataset(ImageSource.from_folder(tmp_path / "images"), m, seed=0)[(0, 1)]


def test_every_loader_gives_the_same_masks(tmp_path):
    from benchmark.data.images import ImageSource, render_deferred
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(render_image(np.random.default_rng([9, i]), 96)[0]).save(folder / f"{i}.jpg", quality=95)
    src = ImageSource.from_folder(folder)
    cache = MC.compute_masks([src.path(i) for i in range(2)], tmp_path / "c", min_size=50, num_workers=1,
                             progress=False)
    m = _tiny(view_size=32)
    batches = {}
    for loader in m.loaders:   # cpu, cpu_draft (DCT-reduced decode), device (DeferredView pixels)
        src.loader = loader
        samples = [m.views({**src.record(i), "masks": cache.mask(i)}, np.random.default_rng(i)) for i in range(2)]
        batches[loader] = render_deferred(m.collate(samples), "cpu")
    for b in batches.values():
        assert torch.equal(b["mask1"], batches["cpu"]["mask1"]) and torch.equal(b["mask2"], batches["cpu"]["mask2"])
        assert b["view1"].shape == (2, 3, 32, 32)


def test_forward_has_no_host_sync():
    """Nothing in the forward (mask grid, sampling, pooling, loss) reads a tensor's value back to
    the host: no op behind .item() / bool() / int(), no data-dependent shape (on CUDA each
    would wait for the device)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten._unique2.default, aten.unique_dim.default, aten.bincount.default, aten.repeat_interleave.Tensor}

    class NoSync(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for variant in ("b", "s"):
        m = _tiny(variant=variant)
        m.train()
        batch = m.collate([m.views(r, np.random.default_rng(i)) for i, r in enumerate(_records(n=2))])
        with NoSync() as mode:
            out = m(batch)
            out["loss"].backward()
        assert mode.seen == [], mode.seen
    with NoSync() as mode:   # the probe sees what it should
        torch.tensor([1.0]).item()
    assert mode.seen == ["aten._local_scalar_dense.default"]
