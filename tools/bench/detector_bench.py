"""Benchmark (not a test): time of one fine-tuning step (forward, backward, the detector's own
optimizer step) of each registered detector at a scale's detector config, reported as a
ratio against Mask R-CNN FPN measured in the same process. One fixed batch of synthetic
scenes (boxes and masks) is reused, so only the model is timed.

    python -m tools.bench.detector_bench --scale tiny --steps 5
    python -m tools.bench.detector_bench --scale paper --device cuda --amp --batch 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tests import inputs
from benchmark.experiments.config import finetune_config, load_scale
from benchmark.detectors import detector_config, list_detectors

BASELINE = "mask_rcnn"


def synthetic_batch(batch: int, image_size: int, num_classes: int, seed: int = 0):
    """``batch`` images with 1-4 random boxes each and their box masks."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, image_size, image_size, generator=g))
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * image_size * 0.6
        wh = 8 + torch.rand(n, 2, generator=g) * image_size * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=image_size - 1)], 1)
        masks = torch.zeros(n, image_size, image_size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), generator=g),
                        "masks": masks})
    return images, targets


def time_detector(name: str, scale: str, batch: int, steps: int, device: str, amp: bool,
                  image_size: int, num_classes: int = 9) -> dict:
    cfg = finetune_config(scale=scale, detector=name, parent=None)
    det, det_cfg = detector_config(cfg["detector"])
    recipe = det.Recipe.from_dict(cfg["recipe"])
    torch.manual_seed(0)
    model = det.build(det_cfg, num_classes).to(device).train()
    opt = det.optimizer(model, recipe)
    images, targets = synthetic_batch(batch, image_size, num_classes)
    images = [im.to(device) for im in images]
    keep = ("boxes", "labels", "masks") if det.with_masks else ("boxes", "labels")
    targets = [{k: t[k].to(device) for k in keep} for t in targets]
    scaler = torch.amp.GradScaler(device, enabled=amp and device == "cuda")

    def step():
        inputs.amp_step(lambda: sum(model(images, targets).values()), opt, scaler, device, amp,
                        grad_clip=recipe.grad_clip, params=model.parameters())

    dt = inputs.seconds_per_step(step, steps, device)
    return {"detector": name, "s_per_step": dt, "images_per_s": batch / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--detectors", default=",".join(list_detectors()))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default: the scale's runtime.torch_threads, 1 at tiny: two "
                        "threads on a busy 2-core machine spin in OpenMP and time nothing but contention)")
    p.add_argument("--out", default="results/benchmarks/detector_bench.json")
    a = p.parse_args(argv)
    threads = a.threads or load_scale(a.scale).get("runtime", {}).get("torch_threads")
    if a.device == "cpu" and threads:
        torch.set_num_threads(int(threads))
    names = [BASELINE] + [n for n in a.detectors.split(",") if n != BASELINE]
    rows = [time_detector(n, a.scale, a.batch, a.steps, a.device, a.amp, a.image_size) for n in names]
    base = rows[0]["s_per_step"]
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"scale {a.scale}, batch {a.batch}, {a.image_size} px, {dev}, amp={a.amp}")
    print(f"{'detector':16s} {'s/step':>9s} {'img/s':>8s} {'vs Mask R-CNN':>14s}")
    for r in rows:
        r["ratio_vs_mask_rcnn"] = r["s_per_step"] / base
        print(f"{r['detector']:16s} {r['s_per_step']:9.4f} {r['images_per_s']:8.1f} {r['ratio_vs_mask_rcnn']:13.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scale": a.scale, "batch": a.batch, "image_size": a.image_size, "device": dev,
                               "amp": a.amp, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
