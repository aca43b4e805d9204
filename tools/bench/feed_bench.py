"""Benchmark (not a test): is the training step fed? The pretraining step with its real input
pipeline (DataLoader workers decoding JPEGs and building views, ``recipe.loader`` cpu,
device or dali) against the same step on one batch held in memory, measured in the same process.

    python -m tools.bench.feed_bench --method moco_v2 --device cuda --amp --batch 64 --workers 12
    python -m tools.bench.feed_bench --method soco --random-proposals --loaders cpu,device,dali --workers 4 --amp --fast

Images: synthetic 500x375 JPEGs (ImageNet's typical size) written once to a temp folder.
"fed" = (img/s with loading) / (img/s of the step alone): 1.0 means the loader keeps up.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests import inputs
from benchmark.experiments.config import load_scale
from benchmark.data.images import ImageSource, render_deferred
from benchmark.stages.pretrain import PretrainDataset, fast_path, to_device
from benchmark.engine.sampling import ResumableBatchSampler
from benchmark.engine.optim import build_optimizer
from methods import build_method, get_method


def write_jpegs(folder: Path, n: int, size=(500, 375), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth noise compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def run(method_name: str, scale: str, folder: Path, *, loader: str, batch: int, steps: int, workers: int,
        device: str, amp: bool, fast: bool, random_proposals: bool = False) -> dict:
    torch.manual_seed(0)
    cls = get_method(method_name)
    sc = load_scale(scale)
    cfg = inputs.method_config(method_name, cls.scales.get(sc.get("method_scale", scale)))
    if random_proposals:   # SoCo: random boxes instead of the selective-search cache (same views, same cost)
        cfg = {**cfg, "proposal_source": "random"}
    method = build_method(method_name, **cfg)
    method.to(device)
    fp = fast_path({"channels_last": fast, "fused_optimizer": fast}, torch.device(device))
    if fp["channels_last"]:
        method.to(memory_format=torch.channels_last)
    opt = build_optimizer(method.param_groups(), cls.recipe.optimizer, 0.01, cls.recipe.weight_decay,
                          fused=fp["fused"] and cls.recipe.optimizer != "lars", nesterov=cls.recipe.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device == "cuda")
    source = ImageSource.from_folder(folder)
    source.loader = loader
    if method.proposal_params() is not None:
        raise SystemExit(f"{method_name} reads cached proposals: --random-proposals, or time it with "
                         f"step_bench/loader_bench")
    if method.mask_params() is not None:
        raise SystemExit(f"{method_name} reads cached masks: time it with step_bench/loader_bench")
    dataset = PretrainDataset(source, method, seed=0)
    sampler = ResumableBatchSampler(len(dataset), batch, seed=0)
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=method.collate,
                                     num_workers=workers, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers else None, pin_memory=device == "cuda",
                                     multiprocessing_context="fork" if workers else None)

    def step(b):
        b = to_device(render_deferred(b, device), device, channels_last=fp["channels_last"])
        inputs.amp_step(lambda: method(b)["loss"], opt, scaler, device, amp)
        method.momentum_update(0.5)

    it = iter(dl)
    first = next(it)
    # warm-up: cuDNN, allocator and the loader's workers; then the same step fed by the loader,
    # and on one batch held in memory
    loaded = inputs.seconds_per_step(lambda: step(next(it)), steps, device, warmup=3)
    alone = inputs.seconds_per_step(lambda: step(first), steps, device, warmup=0)
    return {"method": method_name, "loader": loader, "workers": workers, "batch": batch,
            "img_per_s_step_alone": batch / alone, "img_per_s_with_loading": batch / loaded,
            "fed": alone / loaded}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="moco_v2")
    p.add_argument("--scale", default="paper")
    p.add_argument("--loaders", default="cpu,device,dali",
                   help="comma-separated recipe.loader values compared in this run (dali: pip install -e '.[dali]')")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--fast", action="store_true", help="channels-last + fused optimizer (the paper runtime)")
    p.add_argument("--random-proposals", action="store_true",
                   help="method.proposal_source=random (SoCo without a selective-search cache)")
    p.add_argument("--out", default="results/benchmarks/feed_bench.json")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), a.images)
        for loader in a.loaders.split(","):
            r = run(a.method, a.scale, Path(tmp), loader=loader, batch=a.batch, steps=a.steps, workers=a.workers,
                    device=a.device, amp=a.amp, fast=a.fast, random_proposals=a.random_proposals)
            rows.append(r)
            print(f"{r['method']:8s} loader={loader:9s} workers={a.workers:2d}: step alone "
                  f"{r['img_per_s_step_alone']:7.1f} img/s, with loading {r['img_per_s_with_loading']:7.1f} img/s "
                  f"(fed {r['fed']:.2f})", flush=True)
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "amp": a.amp, "fast": a.fast,
                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
