"""Benchmark (not a test): how many CPU cores one GPU needs to be fed, per method.

For each method and image size it times, in CPU seconds of one core (one torch thread, as
in a DataLoader worker; CPU time, so other load on the machine does not count), what a
worker does per sample: read + decode the file and build the views. Paths:
  before     the code before recipe.loader existed (PIL decode, PIL views, TF.to_tensor +
             TF.normalize): the baseline, measured in this process
  cpu        recipe.loader=cpu (the default; same pixels as before)
  cpu_draft  recipe.loader=cpu_draft (JPEG DCT-scaled decode where every view allows it)
  device     recipe.loader=device, worker part: read the bytes, draw every parameter
  dali       recipe.loader=dali, worker part: the same as device
plus, for ``device`` and ``dali``, the other half on ``--device``: batched decode (nvJPEG on
CUDA) and photometric (``render``, samples/s of batches of ``--batch``; for dali the DALI
pipeline, on CPU its CPU backend, in CPU seconds of all its threads). Cores per GPU = the step's
img/s (``--step``, default the README's H100 AMP batch-64 figures) / worker samples/s per
core. Sizes: ``tiny`` = the method's tiny config on 128-px PNGs (the synthetic set);
``paper`` = its paper config on 500x375 JPEGs (ImageNet's typical size); ``large`` = the
paper config on 1000x750 JPEGs (where DCT-scaled decode can apply); images are written to
a temporary folder and read from the page cache. ``reduced``: the fraction of samples that
``cpu_draft`` decoded at 1/2 or less.

    python -m tools.bench.loader_bench
    python -m tools.bench.loader_bench --methods moco_v2,soco,pixpro --step pixpro=700 --device cuda
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.data.images import ImageSource, render_deferred
from benchmark.data.io import read_rgb
from methods import augment, build_method, get_method, list_methods

# H100, AMP, batch 64: python -m tools.bench.step_bench --scale paper --batch 64 --device cuda --amp
DEFAULT_STEP = {"moco_v2": 1544.0, "soco": 490.0}
SIZES = {"tiny": ((128, 128), ".png"), "paper": ((500, 375), ".jpg"),
         "large": ((1000, 750), ".jpg")}   # large: where DCT-scaled decode can pay


def _before_to_tensor(img):
    """to_tensor as it was before recipe.loader (the baseline)."""
    import torchvision.transforms.functional as TF
    return TF.normalize(TF.to_tensor(img), augment.IMAGENET_MEAN, augment.IMAGENET_STD)


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def method_config(name: str, size: str) -> dict:
    cls = get_method(name)
    cfg = dict(cls.scales.get("tiny", {}).get("method", {})) if size == "tiny" else {}
    cfg.pop("weights", None)
    if getattr(cls, "needs_labels", False):
        cfg["num_classes"] = 8
    return cfg


def write_images(folder: Path, n: int, size: tuple[int, int], ext: str) -> ImageSource:
    """Smooth random scenes with some texture, so that JPEGs have a natural size (~50 KB)."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}{ext}", **({"quality": 90} if ext == ".jpg" else {}))
    return ImageSource.from_folder(folder)


def _record(method, source: ImageSource, i: int, rng: np.random.Generator, before: bool = False) -> dict:
    if before:   # the record as it was built before recipe.loader: read_rgb -> np.asarray
        rec = {"index": i, "image_id": source.image_ids[i], "path": source.paths[i],
               "image": np.asarray(read_rgb(source.path(i)), dtype=np.uint8)}
    else:
        rec = source.record(i)
    if getattr(method, "needs_labels", False):
        rec["labels"] = (rng.random(8) > 0.5).astype(np.float32)
    reads_proposals = getattr(method, "needs_proposals", False) or (
        hasattr(method, "proposal_params") and method.proposal_params() is not None)
    if reads_proposals:   # stand-in for the selective-search cache: 64 random boxes
        W, H = read_size_of(rec)
        xy = rng.random((64, 2)) * [W * 0.7, H * 0.7]
        wh = (0.1 + 0.3 * rng.random((64, 2))) * [W, H]
        rec["proposals"] = np.concatenate([xy, np.minimum(xy + wh, [W, H])], 1)
    return rec


def read_size_of(rec: dict) -> tuple[int, int]:
    im = rec["image"]
    return (im.shape[1], im.shape[0]) if isinstance(im, np.ndarray) else im.size


def time_worker(method, source: ImageSource, loader: str, n: int) -> tuple[float, list]:
    """Samples/s of one core doing ``record + views`` for ``n`` samples, the samples, and
    the fraction of them whose image was decoded at reduced size."""
    before = loader == "before"
    source.loader = "cpu" if before else loader
    saved = augment.to_tensor
    if before:
        augment.to_tensor = _before_to_tensor
    try:
        def one(k):
            rng = np.random.default_rng([0, k])
            i = k % len(source)
            rec = _record(method, source, i, rng, before)
            sample = method.views(rec, rng, source if getattr(method, "needs_source", False) else None)
            reduced.append(getattr(rec["image"], "_reduce", 1) > 1)
            return sample
        reduced: list[bool] = []
        for k in range(2):
            one(k)
        reduced.clear()
        t0 = time.process_time()     # CPU seconds: robust to other processes on the machine
        samples = [one(k) for k in range(n)]
        return n / (time.process_time() - t0), samples, float(np.mean(reduced))
    finally:
        augment.to_tensor = saved


def time_render(method, samples: list, batch: int, device: str, reps: int) -> float:
    """Samples/s of ``render_deferred`` (decode + crops + photometric) on ``device``."""
    b = method.collate((samples * (batch // len(samples) + 1))[:batch])
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time    # GPU: wall time; CPU: CPU time
    render_deferred(b, device)
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(reps):
        render_deferred(b, device)
    if cuda:
        torch.cuda.synchronize()
    return batch * reps / (clock() - t0)


def run(methods: list[str], sizes: list[str], n: int, batch: int, device: str, step: dict,
        reps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for s in sizes:
            (Path(tmp) / s).mkdir()
            sources[s] = write_images(Path(tmp) / s, 16, *SIZES[s])
        for name in methods:
            for s in sizes:
                torch.manual_seed(0)
                m = build_method(name, **method_config(name, s))
                supported = getattr(m, "loaders", ("cpu",))
                paths = ["before", "cpu"] + [p for p in ("cpu_draft", "device", "dali") if p in supported
                                             and (p != "dali" or _has_dali())]
                row = {"method": name, "size": s, "image": "x".join(map(str, SIZES[s][0])),
                       "step_img_s": step.get(name)}
                for p in paths:
                    rate, samples, reduced = time_worker(m, sources[s], p, n)
                    row[f"{p}_per_core"] = rate
                    if p == "cpu_draft":
                        row["draft_reduced_frac"] = reduced    # samples decoded at 1/2..1/8
                    if p in ("device", "dali"):
                        row[f"{p}_render_per_s"] = time_render(m, samples, batch, device, reps)
                base = row["before_per_core"]
                for p in paths:
                    row[f"{p}_vs_before"] = row[f"{p}_per_core"] / base
                    if row["step_img_s"]:
                        row[f"{p}_cores_per_gpu"] = row["step_img_s"] / row[f"{p}_per_core"]
                rows.append(row)
    return rows


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.split(".")[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="moco_v2,soco",
                   help="comma-separated registered method names (any of: %s)" % ", ".join(list_methods()))
    p.add_argument("--sizes", default="tiny,paper,large")
    p.add_argument("--samples", type=int, default=48, help="samples timed per path")
    p.add_argument("--batch", type=int, default=64, help="batch size of the device render")
    p.add_argument("--reps", type=int, default=3, help="device render repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--step", action="append", default=[], metavar="METHOD=IMG_PER_S",
                   help="the training step's img/s per GPU (default moco_v2=1544, soco=490: H100, AMP, batch 64)")
    p.add_argument("--out", default="results/benchmarks/loader_bench.json")
    a = p.parse_args(argv)
    step = dict(DEFAULT_STEP)
    for s in a.step:
        k, _, v = s.partition("=")
        step[k] = float(v)
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        get_method(m)                   # unknown names fail here, listing the registered ones
    sizes = a.sizes.split(",")
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown {s!r} ({' | '.join(SIZES)})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # one DataLoader worker = one core
    rows = run(methods, sizes, a.samples, a.batch, a.device, step, a.reps)
    torch.set_num_threads(threads)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu, 1 thread"
    print(f"worker samples/s per core (1 thread); device render on {dev}; cores/GPU at the step's img/s")
    hdr = (f"{'method':10s} {'size':6s} {'before':>7s} {'cpu':>7s} {'draft':>7s} {'device':>7s} "
           f"{'render':>7s} {'dali':>7s} {'render':>7s} {'step':>6s} {'cores before':>12s} {'cpu':>5s} "
           f"{'draft':>5s} {'device':>6s} {'dali':>6s} {'reduced':>7s}")
    print(hdr)
    for r in rows:
        print(f"{r['method']:10s} {r['size']:6s} {_fmt(r.get('before_per_core'), '7.0f')} "
              f"{_fmt(r.get('cpu_per_core'), '7.0f')} {_fmt(r.get('cpu_draft_per_core'), '7.0f')} "
              f"{_fmt(r.get('device_per_core'), '7.0f')} {_fmt(r.get('device_render_per_s'), '7.0f')} "
              f"{_fmt(r.get('dali_per_core'), '7.0f')} {_fmt(r.get('dali_render_per_s'), '7.0f')} "
              f"{_fmt(r['step_img_s'], '6.0f')} {_fmt(r.get('before_cores_per_gpu'), '12.1f')} "
              f"{_fmt(r.get('cpu_cores_per_gpu'), '5.1f')} {_fmt(r.get('cpu_draft_cores_per_gpu'), '5.1f')} "
              f"{_fmt(r.get('device_cores_per_gpu'), '6.2f')} {_fmt(r.get('dali_cores_per_gpu'), '6.2f')} "
              f"{_fmt(r.get('draft_reduced_frac'), '7.0%')}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "samples": a.samples,
                               "batch": a.batch, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
