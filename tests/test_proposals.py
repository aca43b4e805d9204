"""Behavioural tests for benchmark.data.proposal_cache (the selective-search cache) and methods.proposals
(SoCo's filter, sampler and random boxes)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from benchmark.data import proposal_cache as P
from methods import proposals as MP
from benchmark.data.errors import CorruptImage, DataError

W, H = 100, 100  # image used for the filter edge cases; sqrt(W*H) = 100


# --------------------------------------------------------------------------- helpers


def _scene(seed: int, w: int, h: int) -> np.ndarray:
    """A textured background with a few filled shapes: enough structure for selective search."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        x1, y1 = x0 + rng.integers(w // 4, w // 2), y0 + rng.integers(h // 4, h // 2)
        color = tuple(int(c) for c in rng.integers(80, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=color)
    return np.asarray(im)


@pytest.fixture
def images(tmp_path):
    sizes = [(64, 80), (96, 72), (88, 96)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(_scene(i, w, h)).save(p)
        paths.append(str(p))
    return paths


def _direct(path, **kw):
    img = P.load_rgb(path)
    h, w = img.shape[:2]
    return MP.filter_proposals(P.selective_search(img, mode="fast"), w, h, **kw)


def _box(cx, cy, bw, bh):
    return [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]


# --------------------------------------------------------------------------- filter


def test_default_filter_is_socos():
    assert MP.DEFAULT_FILTER == dict(min_ratio=1 / 3, max_ratio=3.0, min_scale=0.3, max_scale=0.8, min_size=32)


@pytest.mark.parametrize(
    "wh, kept",
    [
        # aspect ratio w/h in [1/3, 3] (scale kept inside [0.3, 0.8], sizes >= 32)
        ((33, 99), True),  # ratio exactly 1/3, scale 0.57
        ((33, 100), False),  # ratio 0.33 < 1/3
        ((99, 33), True),  # ratio exactly 3
        ((100, 33), False),
        # relative scale sqrt(wh)/sqrt(WH) in [0.3, 0.8]; min_size=0 isolates it
        ((30, 30), True),  # exactly 0.3
        ((29, 30), False),
        ((80, 80), True),  # exactly 0.8
        ((80, 81), False),
    ],
)
def test_filter_ratio_and_scale_edges(wh, kept):
    bw, bh = wh
    boxes = np.array([[0, 0, bw, bh]])
    out = MP.filter_proposals(boxes, W, H, min_size=0)
    assert (len(out) == 1) is kept


def test_filter_min_size_edge():
    # In a 200x200 image scale 0.3 is 60 px, so use a loose scale to isolate min_size.
    boxes = np.array([[0, 0, 32, 32], [0, 0, 31, 40], [10, 10, 50, 41]])
    out = MP.filter_proposals(boxes, 200, 200, min_scale=0.0)
    np.testing.assert_array_equal(out, boxes[[0]])
    assert len(MP.filter_proposals(boxes, 200, 200, min_scale=0.0, min_size=31)) == 3


def test_filter_preserves_order_dtype_and_handles_degenerate():
    boxes = np.array([[0, 0, 50, 50], [5, 5, 5, 60], [10, 10, 60, 60], [0, 0, 0, 0]], dtype=np.int32)
    out = MP.filter_proposals(boxes, W, H)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, boxes[[0, 2]])
    assert MP.filter_proposals(np.zeros((0, 4)), W, H).shape == (0, 4)
    with pytest.raises(ValueError):
        MP.filter_proposals(np.zeros((3, 5)), W, H)


# --------------------------------------------------------------------------- sampling


def test_sample_enough_boxes_distinct_and_deterministic():
    boxes = np.arange(40).reshape(10, 4)
    a, va = MP.sample_proposals(boxes, 4, np.random.default_rng(0))
    b, vb = MP.sample_proposals(boxes, 4, np.random.default_rng(0))
    assert a.shape == (4, 4) and a.dtype == np.float32 and va.all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(va, vb)
    assert len({tuple(r) for r in a}) == 4  # without replacement
    assert all(tuple(r) in {tuple(x) for x in boxes.astype(np.float32)} for r in a)


def test_sample_pads_by_repeating_and_marks_padding():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]])
    out, valid = MP.sample_proposals(boxes, 5, np.random.default_rng(1))
    assert out.shape == (5, 4)
    np.testing.assert_array_equal(valid, [True, True, False, False, False])
    # every original box appears among the valid rows, padding repeats originals
    assert {tuple(r) for r in out[:2]} == {tuple(r) for r in boxes.astype(np.float32)}
    assert {tuple(r) for r in out[2:]} <= {tuple(r) for r in boxes.astype(np.float32)}


def test_sample_without_boxes_falls_back_to_whole_image():
    out, valid = MP.sample_proposals(np.zeros((0, 4)), 4, np.random.default_rng(0), image_size=(64, 48))
    np.testing.assert_array_equal(out, np.tile([0, 0, 64, 48], (4, 1)))
    assert not valid.any()
    with pytest.raises(ValueError, match="image_size"):
        MP.sample_proposals(np.zeros((0, 4)), 4, np.random.default_rng(0))


# --------------------------------------------------------------------------- random proposals


@pytest.mark.parametrize("size", [(224, 224), (320, 180), (64, 96)])
def test_random_proposals_obey_filter_and_are_seeded(size):
    w, h = size
    boxes = MP.random_proposals(w, h, 50, np.random.default_rng(3))
    assert boxes.shape == (50, 4)
    np.testing.assert_array_equal(MP.filter_proposals(boxes, w, h), boxes)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    np.testing.assert_array_equal(boxes, MP.random_proposals(w, h, 50, np.random.default_rng(3)))
    # they are not all the same box: the source really is random
    assert len({tuple(b) for b in boxes}) > 40


def test_random_proposals_infeasible_returns_empty():
    assert MP.random_proposals(20, 20, 4, np.random.default_rng(0), max_tries=5).shape == (0, 4)


# --------------------------------------------------------------------------- selective search


def test_selective_search_boxes_inside_image_and_max_side_maps_back():
    img = _scene(7, 160, 120)
    full = P.selective_search(img)
    assert full.ndim == 2 and full.shape[1] == 4 and len(full) > 0
    small = P.selective_search(img, max_side=80)
    assert len(small) > 0
    for b in (full, small):
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert (b >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 120).all()
    # boxes found at half resolution reach the far side of the full-resolution image
    assert small[:, 2].max() > 100
    with pytest.raises(ValueError):
        P.selective_search(img.astype(np.float32))


def test_selective_search_feeds_opencv_bgr():
    """RGB in, BGR to OpenCV: same boxes as calling OpenCV on the channel-swapped image."""
    import cv2

    img = _scene(2, 96, 96)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img[:, :, ::-1]))
    ss.switchToSelectiveSearchFast()
    r = ss.process()
    expect = np.unique(np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1), axis=0)
    np.testing.assert_array_equal(P.selective_search(img), expect)
    # OpenCV's order is random from call to call; ours is sorted, hence reproducible
    np.testing.assert_array_equal(P.selective_search(img), P.selective_search(img))


# --------------------------------------------------------------------------- cache


def test_cache_round_trip_matches_direct_computation(images, tmp_path):
    fkw = dict(min_size=16)  # small test images: let a few more boxes through
    cache = P.compute_proposals(images, tmp_path / "cache", num_workers=0, filter_kwargs=fkw, progress=False)
    assert len(cache) == 3
    total = 0
    for i, p in enumerate(images):
        direct = _direct(p, **{**MP.DEFAULT_FILTER, **fkw})
        np.testing.assert_array_equal(cache.boxes(i), direct)
        total += len(direct)
        w, h = Image.open(p).size
        assert cache.image_size(i) == (w, h)
    assert total > 0
    # one file, compact dtype, flat layout with offsets, metadata as JSON
    files = list((tmp_path / "cache").iterdir())
    assert files == [cache.path] and cache.path.suffix == ".npz"
    with np.load(cache.path) as z:
        assert z["boxes"].dtype == np.uint16 and z["boxes"].shape == (total, 4)
        assert z["offsets"].dtype == np.int64 and len(z["offsets"]) == 4
        meta = json.loads(str(z["meta"]))
    assert meta["n_images"] == 3 and meta["n_skipped"] == 0 and meta["params"]["filter"]["min_size"] == 16
    assert {"dataset_hash", "created", "params"} <= set(meta)
    again = P.ProposalCache.load(cache.path)
    assert again.params == cache.params
    for i in range(3):
        np.testing.assert_array_equal(again.boxes(i), cache.boxes(i))


def test_cache_hit_recomputes_nothing_and_key_covers_params(images, tmp_path, monkeypatch):
    first = P.compute_proposals(images, tmp_path, num_workers=0, progress=False)
    calls = []
    orig = P._compute_chunk
    monkeypatch.setattr(P, "_compute_chunk", lambda job: calls.append(job[0]) or orig(job))
    second = P.compute_proposals(images, tmp_path, num_workers=0, progress=False)
    assert calls == [] and second.path == first.path
    other = P.compute_proposals(images, tmp_path, num_workers=0, progress=False, filter_kwargs=dict(min_size=8))
    assert other.path != first.path and calls  # new params -> new cache
    reordered = P.compute_proposals(images[::-1], tmp_path, num_workers=0, progress=False)
    assert reordered.path != first.path and reordered.dataset_hash != first.dataset_hash


def test_cache_survives_moving_the_dataset_but_not_changing_it(images, tmp_path, monkeypatch):
    import shutil
    first = P.compute_proposals(images, tmp_path / "cache", num_workers=0, progress=False)
    moved = tmp_path / "elsewhere" / "mount"
    shutil.copytree(tmp_path / "img", moved)
    calls = []
    orig = P._compute_chunk
    monkeypatch.setattr(P, "_compute_chunk", lambda job: calls.append(job[0]) or orig(job))
    again = P.compute_proposals([str(moved / f"{i}.png") for i in range(3)], tmp_path / "cache", num_workers=0,
                                progress=False)
    assert calls == [] and again.path == first.path      # same images elsewhere: the cache holds
    # same names and sizes, other pixels: another dataset
    last = moved / "2.png"
    data = bytearray(last.read_bytes())
    data[-20] ^= 0xFF
    last.write_bytes(bytes(data))
    changed = P.cache_key([str(moved / f"{i}.png") for i in range(3)], {})[0]
    assert changed != P.cache_key(images, {})[0]


def test_resume_computes_only_missing_chunks(images, tmp_path, monkeypatch):
    cdir = tmp_path / "cache"
    orig = P._compute_chunk
    calls = []

    def killed_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while working on the third chunk
        calls.append(job[0])
        return orig(job)

    monkeypatch.setattr(P, "_compute_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        P.compute_proposals(images, cdir, num_workers=0, chunk_size=1, progress=False)
    parts = sorted((p.name for p in cdir.glob("*.parts/part-*.npz")))
    assert parts == ["part-00000.npz", "part-00001.npz"]
    assert not list(cdir.glob("*.npz"))  # no final file yet

    calls.clear()
    monkeypatch.setattr(P, "_compute_chunk", lambda job: calls.append(job[0]) or orig(job))
    cache = P.compute_proposals(images, cdir, num_workers=0, chunk_size=1, progress=False)
    assert calls == [2]
    assert list(cdir.iterdir()) == [cache.path]  # parts merged and removed
    for i, p in enumerate(images):
        np.testing.assert_array_equal(cache.boxes(i), _direct(p))


def test_corrupt_part_is_recomputed(images, tmp_path, monkeypatch):
    cdir = tmp_path / "cache"
    orig = P._compute_chunk
    monkeypatch.setattr(P, "_compute_chunk", lambda job: (_ for _ in ()).throw(KeyboardInterrupt)
                        if job[0] == 1 else orig(job))
    with pytest.raises(KeyboardInterrupt):
        P.compute_proposals(images, cdir, num_workers=0, chunk_size=1, progress=False)
    (part0,) = cdir.glob("*.parts/part-00000.npz")
    part0.write_bytes(b"truncated")
    calls = []
    monkeypatch.setattr(P, "_compute_chunk", lambda job: calls.append(job[0]) or orig(job))
    cache = P.compute_proposals(images, cdir, num_workers=0, chunk_size=1, progress=False)
    assert sorted(calls) == [0, 1, 2]
    np.testing.assert_array_equal(cache.boxes(0), _direct(images[0]))


def test_corrupt_image_is_a_counted_skip(images, tmp_path, caplog):
    bad = tmp_path / "img" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = [images[0], str(bad), images[1]]
    with caplog.at_level("WARNING", logger="benchmark.data.proposal_cache"):
        cache = P.compute_proposals(paths, tmp_path / "c", num_workers=0, chunk_size=2, progress=False)
    assert cache.n_skipped == 1 and cache.meta["n_skipped"] == 1
    np.testing.assert_array_equal(cache.skipped, [1])
    assert cache.boxes(1).shape == (0, 4)
    np.testing.assert_array_equal(cache.boxes(2), _direct(images[1]))
    assert str(bad) in caplog.text
    assert cache.image_size(1) == (0, 0)   # unknown: a method samples with its decoded size
    with pytest.raises(CorruptImage, match="bad.jpg"):
        P.load_rgb(bad)
    assert issubclass(CorruptImage, ValueError)


def test_missing_image_is_an_error_naming_it(images, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png"):
        P.compute_proposals([images[0], missing], tmp_path / "c", num_workers=0, progress=False)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing written


def test_parallel_spawn_workers_match_inline(images, tmp_path):
    inline = P.compute_proposals(images, tmp_path / "a", num_workers=0, chunk_size=1, progress=False)
    par = P.compute_proposals(images, tmp_path / "b", num_workers=2, chunk_size=1, progress=False)
    assert par.path.name == inline.path.name
    for i in range(len(images)):
        np.testing.assert_array_equal(par.boxes(i), inline.boxes(i))


def test_load_rejects_non_cache(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.npz"):
        P.ProposalCache.load(p)


def test_two_concurrent_computations_share_one_cache(images, tmp_path, monkeypatch):
    """Two runs starting at once (the local executor runs two SoCo pretrainings in parallel):
    the second waits on the first's lock and loads its file; no chunk is computed twice."""
    import threading
    cdir = tmp_path / "cache"
    orig = P._compute_chunk
    calls = []
    monkeypatch.setattr(P, "_compute_chunk", lambda job: calls.append(job[0]) or orig(job))
    out = [None, None]

    def go(i):
        out[i] = P.compute_proposals(images, cdir, num_workers=0, chunk_size=1, progress=False)
    ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(calls) == list(range(len(images)))
    assert out[0].path == out[1].path and list(cdir.iterdir()) == [out[0].path]


def test_opencv_without_ximgproc_is_a_clear_error_before_any_work(images, tmp_path, monkeypatch):
    import sys
    import types
    fake = types.ModuleType("cv2")
    fake.__version__ = "4.x (no contrib)"
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(RuntimeError, match="no ximgproc.*opencv-contrib-python-headless"):
        P.compute_proposals(images, tmp_path, num_workers=0, progress=False)
    assert not list(tmp_path.glob("proposals-*.npz"))
