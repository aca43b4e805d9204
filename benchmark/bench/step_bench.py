"""Benchmark (not a test): time of one pretraining step (forward, backward, optimizer,
momentum update) of each method, reported as a ratio against MoCo v2 measured in the same
process, at a scale's method config. Views are built once and reused, so only the model
is timed.

    python -m benchmark.bench.step_bench --scale tiny --batch 16 --steps 10
    python -m benchmark.bench.step_bench --scale paper --batch 64 --device cuda --amp
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmark.config import load_scale
from benchmark.trainer import build_optimizer
from methods import build_method, get_method


def method_config(name: str, scale: str) -> dict:
    sc = load_scale(scale)
    cfg = dict(get_method(name).scales.get(sc.get("method_scale", scale), {}).get("method", {}))
    cfg.pop("weights", None)
    if name == "soco":
        cfg["proposal_source"] = "random"     # no selective-search cache needed to time the model
    if name == "supervised":
        cfg["num_classes"] = 8
    return cfg


def time_method(name: str, scale: str, batch: int, steps: int, device: str, amp: bool,
                image_size: int) -> dict:
    torch.manual_seed(0)
    m = build_method(name, **method_config(name, scale)).to(device)
    rng = np.random.default_rng(0)
    recs = [{"index": i, "image_id": i + 1,
             "image": (rng.random((image_size, image_size, 3)) * 255).astype(np.uint8),
             "labels": (rng.random(8) > 0.5).astype(np.float32)} for i in range(batch)]
    samples = [m.views(r, np.random.default_rng(i)) for i, r in enumerate(recs)]
    b = m.collate(samples)
    b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
    rec = get_method(name).recipe
    opt = build_optimizer(m.param_groups(), rec["optimizer"], 0.01, rec["weight_decay"])
    scaler = torch.amp.GradScaler(device, enabled=amp and device == "cuda")

    def step():
        with torch.autocast(device, enabled=amp and device == "cuda"):
            loss = m(b)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        m.momentum_update(0.5)

    for _ in range(2):      # warm-up (cuDNN autotune, allocator)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"method": name, "s_per_step": dt, "images_per_s": batch / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--methods", default="moco_v2,supervised,soco")
    p.add_argument("--out", default="results/benchmarks/step_bench.json")
    a = p.parse_args(argv)
    names = a.methods.split(",")
    if "moco_v2" not in names:
        names = ["moco_v2"] + names
    rows = [time_method(n, a.scale, a.batch, a.steps, a.device, a.amp, a.image_size) for n in names]
    base = next(r for r in rows if r["method"] == "moco_v2")["s_per_step"]
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"scale {a.scale}, batch {a.batch}, {dev}, amp={a.amp}")
    print(f"{'method':12s} {'s/step':>9s} {'img/s':>8s} {'vs MoCo v2':>11s}")
    for r in rows:
        r["ratio_vs_moco_v2"] = r["s_per_step"] / base
        print(f"{r['method']:12s} {r['s_per_step']:9.4f} {r['images_per_s']:8.1f} {r['ratio_vs_moco_v2']:10.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scale": a.scale, "batch": a.batch, "device": dev, "amp": a.amp,
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
