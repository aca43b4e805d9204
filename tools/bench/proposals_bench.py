"""Throughput of the proposal cache vs. a bare OpenCV selective-search loop.

    python -m tools.bench.proposals_bench --n 50 --size 224 [--images DIR] [--workers 2]
        [--mode soco] [--modes soco,fast,single]

Without ``--images`` it draws ``--n`` random textured scenes with filled shapes (no dataset
needed). It times (1) the bare loop ``cv2.imread -> selective search (--mode)`` over the
images in this process and (2) :func:`benchmark.data.proposal_cache.compute_proposals` on the same
images into a fresh cache directory (``--workers`` processes, process start-up, filtering,
part files and the final merge included). Then, for each of ``--modes``, it counts the
regions per image that selective search returns (raw) and that pass SoCo's filter (kept),
with the seconds per image: "soco" (SoCo's default: one strategy, Felzenszwalb 300/0.9/100)
against OpenCV's presets. It prints tables and writes ``results/benchmarks/proposals.json``:
images/s of each, the ratio ours/bare, the cache size in bytes per image and the per-mode
region counts.

The cache runs selective search at ``--max-side`` (default ``DEFAULT_MAX_SIDE``, 500 px: boxes
are scaled back). ``--compare-max-side`` also builds the cache at full resolution and reports
what the downscale changes in the boxes kept: boxes per image at each size, the time ratio,
and how many full-resolution boxes a downscaled box covers at IoU >= 0.5 / 0.7 (recall).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmark.data.proposal_cache import MODES, load_rgb, opencv_selective_search, selective_search
from methods.proposals import filter_proposals


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        # low-frequency colour noise (upsampled) plus pixel noise: a textured background
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
        bg = np.clip(bg + rng.integers(-20, 21, size=bg.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = rng.integers(3)
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            if shape == 0:
                d.rectangle(box, fill=color)
            elif shape == 1:
                d.ellipse(box, fill=color)
            else:
                d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
        p = folder / f"{i:05d}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def region_counts(paths: list[str], mode: str) -> dict:
    """Raw regions (OpenCV's output) and kept boxes (after SoCo's filter) per image, and the
    seconds per image of the selective search alone, for one mode."""
    raw, kept, seconds = [], [], 0.0
    for p in paths:
        img = load_rgb(p)
        t0 = time.perf_counter()
        boxes = selective_search(img, mode=mode)
        seconds += time.perf_counter() - t0
        raw.append(len(boxes))
        kept.append(len(filter_proposals(boxes, img.shape[1], img.shape[0])))
    return {"raw_per_image": float(np.mean(raw)), "raw_min": int(np.min(raw)), "raw_max": int(np.max(raw)),
            "kept_per_image": float(np.mean(kept)), "seconds_per_image": seconds / len(paths)}


def bare_loop(paths: list[str], mode: str = "soco") -> tuple[float, int]:
    import cv2

    t0 = time.perf_counter()
    n_boxes = 0
    for p in paths:
        bgr = cv2.imread(p, cv2.IMREAD_COLOR)
        n_boxes += len(opencv_selective_search(bgr, mode))
    return time.perf_counter() - t0, n_boxes


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def compare_caches(down, full, n: int) -> dict:
    """Boxes kept per image by each cache, and the share of full-resolution boxes that some
    downscaled box overlaps at IoU >= 0.5 and >= 0.7 (over all images' boxes)."""
    hit50 = hit70 = total = 0
    for i in range(n):
        f, d = full.boxes(i).astype(np.float64), down.boxes(i).astype(np.float64)
        total += len(f)
        if len(f) and len(d):
            best = _iou(f, d).max(axis=1)
            hit50 += int((best >= 0.5).sum())
            hit70 += int((best >= 0.7).sum())
    return {"kept_per_image_downscaled": int(down.offsets[-1]) / n, "kept_per_image_full": int(full.offsets[-1]) / n,
            "recall_iou50": hit50 / max(total, 1), "recall_iou70": hit70 / max(total, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="number of generated images")
    ap.add_argument("--size", type=int, default=224, help="side of generated images (px)")
    ap.add_argument("--images", type=Path, default=None, help="use the images of this folder instead")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=None, help="default: about 4 chunks per worker")
    ap.add_argument("--mode", default="soco", choices=list(MODES), help="mode of the throughput comparison")
    ap.add_argument("--modes", default="soco,fast,single",
                    help="comma-separated modes whose region counts per image are reported")
    ap.add_argument("--max-side", type=int, default=None, help="default: DEFAULT_MAX_SIDE (500 px)")
    ap.add_argument("--compare-max-side", action="store_true",
                    help="also at full resolution: what the downscale changes in the boxes kept")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/proposals.json"))
    args = ap.parse_args(argv)

    from benchmark.data.proposal_cache import DEFAULT_MAX_SIDE, compute_proposals
    max_side = args.max_side or DEFAULT_MAX_SIDE

    with tempfile.TemporaryDirectory(prefix="proposals_bench_") as tmp:
        tmp = Path(tmp)
        if args.images is not None:
            exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
            paths = sorted(str(p) for p in args.images.iterdir() if p.suffix.lower() in exts)[: args.n]
            source = str(args.images)
        else:
            paths = make_images(tmp / "images", args.n, args.size)
            source = f"generated {args.size}x{args.size} textured scenes"
        if not paths:
            raise SystemExit(f"no images found in {args.images}")
        n = len(paths)
        chunk = args.chunk_size or max(1, math.ceil(n / (4 * max(1, args.workers))))

        bare_s, bare_boxes = bare_loop(paths, args.mode)
        t0 = time.perf_counter()
        cache = compute_proposals(paths, tmp / "cache", mode=args.mode, num_workers=args.workers,
                                  chunk_size=chunk, progress=False, max_side=max_side)
        ours_s = time.perf_counter() - t0
        cache_bytes = os.path.getsize(cache.path)
        kept = int(cache.offsets[-1])
        compare = None
        if args.compare_max_side:
            t0 = time.perf_counter()
            full = compute_proposals(paths, tmp / "cache_full", mode=args.mode, num_workers=args.workers,
                                     chunk_size=chunk, progress=False, max_side=1 << 16)
            full_s = time.perf_counter() - t0
            compare = compare_caches(cache, full, n)
            compare.update({"max_side": max_side, "seconds_downscaled": ours_s, "seconds_full": full_s,
                            "speedup": full_s / ours_s})
        modes = [m for m in args.modes.split(",") if m]
        bad = set(modes) - set(MODES)
        if bad:
            raise SystemExit(f"--modes: unknown {sorted(bad)} (known: {', '.join(MODES)})")
        counts = {m: region_counts(paths, m) for m in modes}

    res = {
        "source": source,
        "n_images": n,
        "mode": args.mode,
        "workers": args.workers,
        "chunk_size": chunk,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "bare": {"seconds": bare_s, "images_per_s": n / bare_s, "raw_boxes_per_image": bare_boxes / n},
        "ours": {"seconds": ours_s, "images_per_s": n / ours_s, "kept_boxes_per_image": kept / n},
        "ratio_ours_over_bare": (n / ours_s) / (n / bare_s),
        "cache_bytes": cache_bytes,
        "cache_bytes_per_image": cache_bytes / n,
        "max_side": max_side,
        "downscale_vs_full": compare,
        "regions_by_mode": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"proposals benchmark: {n} images ({source}), mode={args.mode}")
    print(f"{'':24s}{'seconds':>10s}{'images/s':>12s}{'boxes/img':>12s}")
    print(f"{'bare OpenCV loop':24s}{bare_s:10.2f}{n / bare_s:12.2f}{bare_boxes / n:12.1f}  (raw)")
    print(f"{'compute_proposals x' + str(args.workers):24s}{ours_s:10.2f}{n / ours_s:12.2f}{kept / n:12.1f}  (filtered)")
    print(f"ratio ours/bare (images/s): {res['ratio_ours_over_bare']:.2f}")
    print(f"cache: {cache_bytes} bytes, {res['cache_bytes_per_image']:.1f} bytes/image")
    if compare:
        print(f"max side {max_side} vs full resolution: {compare['speedup']:.2f}x faster; kept boxes per image "
              f"{compare['kept_per_image_downscaled']:.1f} vs {compare['kept_per_image_full']:.1f}; full-resolution "
              f"boxes covered at IoU>=0.5: {compare['recall_iou50']:.1%}, IoU>=0.7: {compare['recall_iou70']:.1%}")
    print(f"\nregions per image by mode ({n} images, one process)")
    print(f"{'mode':10s}{'raw':>10s}{'raw min-max':>14s}{'kept':>10s}{'s/image':>10s}")
    for m, c in counts.items():
        print(f"{m:10s}{c['raw_per_image']:10.1f}{c['raw_min']:>7d}-{c['raw_max']:<6d}"
              f"{c['kept_per_image']:10.1f}{c['seconds_per_image']:10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
