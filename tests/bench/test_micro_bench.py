"""Micro-benchmarks of the hot pieces, each against a baseline timed in the same process.

    make bench-micro                        # timed; stored in results/benchmarks/pytest-benchmark/
    python -m pytest -q tests/bench         # once each, no timing (the default suite)

Each test checks what the benchmarked function returns (in the default suite too) and, when
timed, stores ``ratio_vs_<baseline>`` in the run's ``extra_info`` and asserts a loose bound
on it: about 2-3x the ratio measured on the 2-core machine, so a real regression fails and
the load of a shared machine does not.
"""
import json
import math
import time

import numpy as np
import pytest
import torch


# the benchmark fixture times only under --benchmark-enable / --benchmark-only (kept in this
# module, not a tests/bench/conftest.py: that name would shadow tests/conftest.py for imports)
def timed(config) -> bool:
    return bool(config.getoption("benchmark_enable") or config.getoption("benchmark_only"))


@pytest.fixture
def benchmark(benchmark, request):
    """pytest-benchmark's fixture, timing only under ``--benchmark-enable``/``--benchmark-only``
    (otherwise it calls the function once, as ``--benchmark-disable`` does)."""
    if not timed(request.config):
        benchmark.disabled = True
    return benchmark


def _per_call(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


class Ratio:
    """``ratio(ours, baseline, name=..., rounds=..., number=...)``: seconds per call of
    ``ours`` over ``baseline``, each the best of ``rounds`` rounds of ``number`` calls, the
    rounds interleaved so that the machine's load falls on both alike (one warm-up call of
    each first). Stored in ``benchmark.extra_info``: ``ratio_vs_<name>``, ``ours_s``,
    ``<name>_s``; returned."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(self, ours, baseline, *, name: str, rounds: int = 5, number: int = 1) -> float:
        ours(), baseline()
        mine, theirs = [], []
        for _ in range(rounds):
            mine.append(_per_call(ours, number))
            theirs.append(_per_call(baseline, number))
        value = min(mine) / min(theirs)
        self.benchmark.extra_info.update({f"ratio_vs_{name}": value, "ours_s": min(mine), f"{name}_s": min(theirs)})
        return value


@pytest.fixture
def ratio(benchmark):
    """A :class:`Ratio` when the benchmarks are timed, None in the default suite (one call of
    each benchmarked function, no timing: nothing to compare)."""
    return Ratio(benchmark) if benchmark.enabled else None



# ---------------------------------------------------------------------------- RoIAlign backward
def _roi_align_inputs():
    """The box head's RoIAlign in a tiny Mask R-CNN step: 64 channels, P2 of four 160-px
    images, 256 RoIs (at 128 px nearly every RoI maps to P2), 7x7 bins, 2x2 samples
    (as ``tools.bench.finetune_bench.roi_align_ratio``)."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(4, 64, 40, 40, generator=g, requires_grad=True)
    xy = torch.rand(256, 2, generator=g) * 120
    rois = torch.cat([torch.randint(0, 4, (256, 1), generator=g).float(), xy,
                      xy + 8 + torch.rand(256, 2, generator=g) * 60], 1)
    return feat, rois, g


def test_roi_align_backward_vs_torchvision(benchmark, ratio):
    from benchmark.detectors.rcnn import roi_align, tv_roi_align
    feat, rois, g = _roi_align_inputs()
    ours_out = roi_align(feat, rois, (7, 7), 0.25, 2, False)
    tv_out = tv_roi_align(feat, rois, (7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=False)
    grad = torch.randn(ours_out.shape, generator=g)

    def ours():
        return torch.autograd.grad(ours_out, feat, grad, retain_graph=True)[0]

    def torchvision_kernel():
        return torch.autograd.grad(tv_out, feat, grad, retain_graph=True)[0]

    got = benchmark.pedantic(ours, rounds=10, warmup_rounds=1)
    assert torch.equal(ours_out, tv_out)
    assert torch.equal(got, torchvision_kernel())        # bit for bit (benchmark/detectors/rcnn.py)
    if ratio:
        # 2-core machine: ~0.25 (docs/performance.md "Fine-tuning step": 22 vs 53 ms in a step)
        assert ratio(ours, torchvision_kernel, name="torchvision", rounds=10) < 0.8


# ---------------------------------------------------------------------------- FPN level assignment
def _step_boxes(n: int = 512, seed: int = 0) -> torch.Tensor:
    """xyxy boxes of sizes 8..800 px (log-uniform) in an 800-px image: a step's sampled RoIs
    of two images."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(8), math.log(800), generator=g))
    xy = torch.rand(n, 2, generator=g) * (800 - side)
    return torch.cat([xy, xy + side], 1)


def fpn_paper_levels(boxes: torch.Tensor, k0: int = 4, canonical: float = 224.0, k_min: int = 2,
                     k_max: int = 5) -> torch.Tensor:
    """FPN (Lin et al. 2017) Eq. 1: k = floor(k0 + log2(sqrt(wh) / 224)), clamped to the
    pyramid's levels; returned as an index from ``k_min`` (0 = P2)."""
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return (torch.floor(k0 + torch.log2(size / canonical)).clamp(k_min, k_max) - k_min).long()


def test_detector_fpn_level_assignment_vs_the_paper_formula(benchmark, ratio):
    """The detectors' RoIPooler (benchmark/detectors/rcnn.py: torchvision's level mapper,
    canonical size 224 at P4, as detectron2's ROIPooler) on a step's 2 x 256 RoIs."""
    from benchmark.detectors.rcnn import RoIPooler
    pooler = RoIPooler(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
    feats = {f"p{k}": torch.zeros(1, 1, 800 // 2 ** k, 800 // 2 ** k) for k in range(2, 6)}
    boxes = _step_boxes()
    pooler(feats, [boxes[:1]], [(800, 800)])       # sets up its scales and level mapper
    per_image = [boxes[:256], boxes[256:]]

    got = benchmark.pedantic(lambda: pooler.map_levels(per_image), rounds=20, iterations=20, warmup_rounds=1)
    want = fpn_paper_levels(boxes)
    # the mapper adds eps 1e-6 before the floor: only a box within 1e-5 of a boundary may differ
    exact = torch.log2(torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / 224) + 4
    near = (exact - exact.round()).abs() < 1e-5
    assert torch.equal(got[~near], want[~near]) and int(near.sum()) <= 2
    assert set(got.tolist()) == {0, 1, 2, 3}        # every level used: 8..800 px spans P2..P5
    if ratio:
        # 2-core machine: ~1.8 (the same tensor ops plus a concatenation and the eps)
        assert ratio(lambda: pooler.map_levels(per_image), lambda: fpn_paper_levels(boxes),
                     name="paper_formula", rounds=20, number=50) < 4.0


def test_soco_level_assignment_vs_the_official_rule(benchmark, ratio):
    """SoCo's scale-aware assignment (methods/roi.py ``assign_levels``; official
    ``assign_bboxs_to_feature_map``: the first level j with sqrt(wh) <= aware_range[j], else
    P5) on a tiny batch's boxes (16 images x 3 pairs x 4 proposals)."""
    from methods.roi import assign_levels
    boxes = _step_boxes(16 * 12, seed=1).reshape(16, 12, 4) / 4
    thresholds = (48.0, 96.0, 192.0)

    def official(b):
        size = torch.sqrt((b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0))
        return (size[..., None] > torch.tensor(thresholds)).sum(-1)

    got = benchmark.pedantic(lambda: assign_levels(boxes, thresholds), rounds=20, iterations=50, warmup_rounds=1)
    assert torch.equal(got, official(boxes)) and got.shape == (16, 12)
    on_edge = torch.tensor([[0.0, 0.0, 48.0, 48.0], [0.0, 0.0, 48.0, 48.5]])   # <= is inclusive
    assert assign_levels(on_edge, thresholds).tolist() == [0, 1]
    if ratio:
        # 2-core machine: ~0.9
        assert ratio(lambda: assign_levels(boxes, thresholds), lambda: official(boxes),
                     name="official_rule", rounds=20, number=100) < 4.0


# ---------------------------------------------------------------------------- SoCo proposal sampler
def test_soco_proposal_sampler_per_sample(benchmark, ratio):
    """How one sample's proposals are chosen (methods/soco.py: ``draw_views`` = views drawn
    until each pair sees enough candidates, ``sample_boxes`` = K per pair, jittered, padded,
    mapped into both views), against the whole ``views`` call of the same sample (render,
    augmentation, cutout included): a regression shows as a larger share."""
    from benchmark.experiments.config import pretrain_config
    from methods import build_method
    from methods.proposals import random_proposals
    cfg = pretrain_config("soco", scale="tiny")["method"]
    method = build_method("soco", **{k: v for k, v in cfg.items() if k != "name"})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    cand = random_proposals(128, 128, 24, rng).astype(np.float64)   # tiny: ~24 kept per image
    record = {"image": image, "proposals": cand, "index": 0}

    def sampler(seed=1):
        r = np.random.default_rng(seed)
        geoms, picks = method.draw_views(cand, 128, 128, r)
        return geoms, method.sample_boxes(picks, geoms, 128, 128, r)

    geoms, boxes = benchmark.pedantic(sampler, rounds=20, iterations=10, warmup_rounds=1)
    k = method.cfg.num_proposals
    for v in method.pair_views:
        for side, g in ((f"boxes_v1_{v}", geoms["v1"]), (f"boxes_{v}", geoms[v])):
            b = boxes[side]
            assert b.shape == (k, 4) and b.dtype == np.float32
            assert (b[:, 2] - b[:, 0] >= 1).all() and (b[:, 3] - b[:, 1] >= 1).all()
            assert (b >= 0).all() and (b[:, [0, 2]] <= g.out_size[0]).all() and (b[:, [1, 3]] <= g.out_size[1]).all()
        assert boxes[f"valid_{v}"].any()
    again = sampler()[1]
    assert all(np.array_equal(again[key], boxes[key]) for key in boxes)     # the rng decides it all
    if ratio:
        share = ratio(sampler, lambda: method.views(record, np.random.default_rng(1)), name="views",
                      rounds=10, number=10)
        benchmark.extra_info["samples_per_s"] = 1.0 / benchmark.extra_info["ours_s"]
        # 2-core machine: ~0.2 of a tiny sample's views
        assert share < 0.5


# ---------------------------------------------------------------------------- selective search
def test_selective_search_per_image_vs_the_bare_opencv_call(benchmark, ratio):
    """``benchmark.data.proposal_cache.selective_search`` (SoCo's ``soco`` mode) on the
    smallest shipped photo (tests/data/coco_excerpt, 352x230) against the bare OpenCV call on
    the same pixels (what the function adds: dedupe, rounding, clipping, sorting)."""
    import cv2
    from benchmark.data.proposal_cache import load_rgb, opencv_selective_search, require_selective_search, \
        selective_search
    from tests.conftest import TINY_COCO
    require_selective_search()
    image = load_rgb(TINY_COCO / "val2017" / "000000037777.jpg")
    h, w = image.shape[:2]
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    cv2.setNumThreads(1)

    boxes = benchmark.pedantic(lambda: selective_search(image, mode="soco"), rounds=5, warmup_rounds=1)
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 10
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all() and (boxes >= 0).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    if ratio:
        benchmark.extra_info["boxes"] = int(len(boxes))
        # 2-core machine: ~1.0 (OpenCV is all of it)
        assert ratio(lambda: selective_search(image, mode="soco"), lambda: opencv_selective_search(bgr, "soco"),
                     name="bare_opencv", rounds=5) < 1.5


# ---------------------------------------------------------------------------- COCO evaluation
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def synthetic_coco(n_images: int = 1000, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth (1-5 boxes per image, 3 categories, small to large) and detections: each
    object found with probability 0.8 (its box shifted and rescaled by up to 20 %), a random
    category at times, plus 0-3 false positives per image; scores random."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"})
        for _ in range(rng.integers(1, 6)):
            bw, bh = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            x, y = rng.uniform(0, 640 - bw), rng.uniform(0, 480 - bh)
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": float(bw * bh), "iscrowd": 0})
            if rng.random() < 0.8:
                dx, dy, sx, sy = rng.uniform(-0.2, 0.2, 4)
                dets.append({"image_id": i, "category_id": cat if rng.random() < 0.9 else int(rng.integers(1, 4)),
                             "bbox": [x + dx * bw, y + dy * bh, bw * (1 + sx), bh * (1 + sy)],
                             "score": float(rng.random())})
        for _ in range(rng.integers(0, 4)):
            bw, bh = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            dets.append({"image_id": i, "category_id": int(rng.integers(1, 4)),
                         "bbox": [float(rng.uniform(0, 640 - bw)), float(rng.uniform(0, 480 - bh)), bw, bh],
                         "score": float(rng.random())})
    for d in dets:
        d["bbox"] = [float(v) for v in d["bbox"]]
    for a in anns:
        a["bbox"] = [float(v) for v in a["bbox"]]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, dets


def test_coco_evaluation_of_1000_images_vs_pycocotools(benchmark, ratio, tmp_path):
    """The project's evaluator (benchmark/stages/evaluate.py ``coco_summary``: faster-coco-eval)
    against pycocotools' COCOeval (the same function, ``backend="pycocotools"``) on 1,000
    synthetic images: the same six APs, in a fraction of the time."""
    from benchmark.stages.evaluate import coco_summary, METRIC_NAMES
    gt, dets = synthetic_coco()
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(gt))

    ours = benchmark.pedantic(lambda: coco_summary(ann, dets, "bbox"), rounds=3, warmup_rounds=0)
    reference = coco_summary(ann, dets, "bbox", backend="pycocotools")
    assert set(ours) == set(METRIC_NAMES) and 5 < ours["AP"] < 95
    assert ours == pytest.approx(reference, abs=1e-9)
    if ratio:
        benchmark.extra_info.update({"images": len(gt["images"]), "detections": len(dets), "AP": ours["AP"]})
        # 2-core machine: ~0.45 (the ground truth read from its file by both, in each call)
        assert ratio(lambda: coco_summary(ann, dets, "bbox"),
                     lambda: coco_summary(ann, dets, "bbox", backend="pycocotools"),
                     name="pycocotools", rounds=2) < 0.85


# ---------------------------------------------------------------------------- run planning
def test_planning_a_1000_run_grid(benchmark, ratio, isolated):
    """``plan_table`` of tools/bench/slurm_bench.py's generated grid at 1,000 runs (500 Scratch
    rows x fine-tune -> evaluate) against two baselines: the run keys of its 1,000 configs
    (the hashing every plan needs: a per-run cost such as reading and checking the scale
    file once per config, which planning had until issue 27, shows here) and 10 x planning
    the 100-run grid (planning must stay linear in the runs); the 1,000-run plan also has an
    absolute bound (issue 27: planning + submitting 1,000 runs in 10 s)."""
    from benchmark.experiments.plan import plan_table
    from benchmark.runs.identity import run_key
    from tools.bench.slurm_bench import grid_spec
    big = str(grid_spec(isolated / "grid_1000.yaml", 500))
    small = str(grid_spec(isolated / "grid_100.yaml", 50))

    plan = benchmark.pedantic(lambda: plan_table(big, scale="micro"), rounds=3, warmup_rounds=0)
    assert len(plan.jobs) == 1000 and len({j.key for j in plan.jobs}) == 1000
    assert [j.stage for j in plan.jobs] == ["finetune"] * 500 + ["evaluate"] * 500
    assert all(c.eval_key for c in plan.cells) and len(plan.cells) == 500
    if ratio:
        t0 = time.perf_counter()
        plan_table(big, scale="micro")
        benchmark.extra_info["plan_1000_s"] = time.perf_counter() - t0
        configs = [j.config for j in plan.jobs]
        # 2-core machine: ~45 (reading and checking the scale file per config, before issue 27: ~700)
        assert ratio(lambda: plan_table(big, scale="micro"), lambda: [run_key(c) for c in configs],
                     name="run_keys", rounds=3) < 150
        # 2-core machine: ~1.0 (linear)
        assert ratio(lambda: plan_table(big, scale="micro"), lambda: [plan_table(small, scale="micro") for _ in range(10)],
                     name="10x_100_run_grid", rounds=3) < 2.0
        # 2-core machine: ~0.5 s (7.7 s before issue 27)
        assert benchmark.extra_info["plan_1000_s"] < 5.0
