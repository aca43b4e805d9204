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

import torch

from benchmark.bench import inputs
from benchmark.config import load_scale
from benchmark.pretrain import to_device
from benchmark.trainer import build_optimizer
from methods import build_method, get_method


def time_method(name: str, scale: str, batch: int, steps: int, device: str, amp: bool,
                image_size: int) -> dict:
    torch.manual_seed(0)
    cls = get_method(name)
    sc = load_scale(scale)
    m = build_method(name, **inputs.method_config(name, cls.scales.get(sc.get("method_scale", scale)))).to(device)
    b = to_device(m.collate(inputs.samples(m, batch, image_size)), device)
    opt = build_optimizer(m.param_groups(), cls.recipe.optimizer, 0.01, cls.recipe.weight_decay)
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
    p.add_argument("--methods", default="moco_v2,supervised,soco,insloc")
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
