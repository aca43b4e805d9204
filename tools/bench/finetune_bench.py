"""Benchmark (not a test): a scale's fine-tuning run end to end (its real data, DataLoader
workers, torch threads, logging and checkpoints: ``run_finetune`` for ``--steps`` steps from
scratch), its wall time per step, and a digest of the weights it ends with, so that two
checkouts timed by this script can be shown to train the same numbers:

    python -m tools.bench.finetune_bench --scale tiny --steps 30 --repeats 3
    PYTHONPATH=/path/to/other/checkout python -m tools.bench.finetune_bench ...   # the "before"
    python -m tools.bench.finetune_bench --profile     # where a step's time goes, by component
    python -m tools.bench.finetune_bench --option box_batch_size_per_image=32 --option batch_size=2

In the same process it also times RoIAlign's backward on CPU (``benchmark.detectors.rcnn``)
against torchvision's kernel on the pooled shapes of one step, as a ratio. ``--option``
(repeatable; ``field=value[;field=value]``, detector fields or ``batch_size``) times the training step (forward, backward,
SGD) of the scale's detector changed so, on the same real training batches, against the
scale's own detector in the same process: the options that would change run keys, measured.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
import yaml
from collections import defaultdict
from pathlib import Path

import torch

from benchmark.experiments.config import finetune_config, load_scale

# forward: the modules of torchvision's R-CNNs (the one-stage detectors and DETR show as "other")
FORWARD_PARTS = ("transform", "backbone.body", "backbone.fpn", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head",
                 "roi_heads.box_predictor", "roi_heads.mask_roi_pool", "roi_heads.mask_head",
                 "roi_heads.mask_predictor")
# backward: autograd nodes by the op they differentiate
BACKWARD_PARTS = (("conv", "Convolution"), ("RoIAlign", "roi_align"), ("RoIAlign", "RoIAlign"),
                  ("BatchNorm", "BatchNorm"))


def weights_digest(run_dir: Path) -> str:
    """sha256 over the model tensors of the run's checkpoint, in key order."""
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_once(cfg: dict, steps: int, num_workers: int, run_dir: Path) -> float:
    from benchmark.data.resolve import resolve_data
    from benchmark.stages.finetune import run_finetune
    data = resolve_data(cfg["data"])
    t0 = time.perf_counter()
    run_finetune(cfg["detector"], {**cfg["recipe"], "num_workers": num_workers}, data, run_dir=run_dir,
                 weights=None, seed=cfg["seed"], resume=False, stop_after=steps, device="cpu", progress=False)
    return time.perf_counter() - t0


class _Labels:
    """Forward hooks that wrap the named submodules in profiler ranges ``fwd:<name>``."""

    def __init__(self, names):
        self.names, self.open, self.handles = names, {}, []

    def attach(self, model):
        mods = dict(model.named_modules())
        for name in self.names:
            if name in mods:
                self.handles.append(mods[name].register_forward_pre_hook(self._enter(name)))
                self.handles.append(mods[name].register_forward_hook(self._exit(name)))

    def _enter(self, name):
        def hook(*_):
            self.open[name] = torch.autograd.profiler.record_function(f"fwd:{name}")
            self.open[name].__enter__()
        return hook

    def _exit(self, name):
        def hook(*_):
            self.open.pop(name).__exit__(None, None, None)
        return hook


def profile(cfg: dict, steps: int, num_workers: int) -> dict:
    """Seconds per step by component: forward per module, backward per op kind, optimizer,
    waiting for data, and the rest (loss sums, logging, checkpoints, the loop)."""
    import benchmark.stages.finetune as ft
    labels = _Labels(FORWARD_PARTS)
    build = ft.detector_config

    def labelled(detector):   # the run's model gets the profiler ranges as it is built
        det, det_cfg = build(detector)

        class Labelled(det):
            @classmethod
            def build(cls, c, n):
                model = det.build(c, n)
                labels.attach(model)
                return model
        return Labelled, det_cfg

    ft.detector_config = labelled
    try:
        with tempfile.TemporaryDirectory() as d, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            wall = run_once(cfg, steps, num_workers, Path(d))
    finally:
        ft.detector_config = build
    parts: dict[str, float] = defaultdict(float)
    for e in p.key_averages():
        t = e.cpu_time_total / 1e6 / steps
        if e.key.startswith("fwd:"):
            parts["forward " + e.key[4:]] += t
        elif e.key.startswith("autograd::engine::evaluate_function"):
            kind = next((k for k, pat in BACKWARD_PARTS if pat in e.key), "other")
            parts[f"backward {kind}"] += t
        elif e.key.startswith("Optimizer."):
            parts["optimizer"] += t
        elif e.key.startswith("enumerate(DataLoader)"):
            parts["data (wait)"] += t
    fwd_parts = sum(v for k, v in parts.items() if k.startswith("forward "))
    parts["rest (losses, loop, log, checkpoints, model build)"] = wall / steps - sum(parts.values())
    return {"wall_s_per_step": wall / steps, "forward_in_parts": fwd_parts,
            "parts_s_per_step": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def roi_align_ratio(repeats: int = 10) -> dict | None:
    """RoIAlign backward of ``benchmark.detectors.rcnn`` vs torchvision's, on the box head's
    shapes in a tiny step (64 channels, P2 of four 160-px images, 256 RoIs: at 128 px nearly
    every RoI maps to P2; 7x7 bins, 2x2 samples)."""
    try:
        from benchmark.detectors.rcnn import roi_align, tv_roi_align
    except ImportError:   # a checkout without it (the "before")
        return None
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(4, 64, 40, 40, generator=g, requires_grad=True)
    xy = torch.rand(256, 2, generator=g) * 120
    rois = torch.cat([torch.randint(0, 4, (256, 1), generator=g).float(), xy,
                      xy + 8 + torch.rand(256, 2, generator=g) * 60], 1)

    def seconds(fn):
        out = fn(feat, rois, (7, 7), 0.25, 2, False)
        grad = torch.randn(out.shape, generator=g)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.autograd.grad(out, feat, grad, retain_graph=True)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    ours = seconds(roi_align)
    theirs = seconds(lambda f, r, o, s, sr, al: tv_roi_align(f, r, o, spatial_scale=s, sampling_ratio=sr, aligned=al))
    return {"ours_ms": ours * 1e3, "torchvision_ms": theirs * 1e3, "speedup": theirs / ours}


def option_ratios(scale: str, detector: str, schedule: str, options: list[str], steps: int, rounds: int = 3) -> list[dict]:
    """Seconds per training step of the scale's detector and of each ``field=value[;...]`` variant,
    on the first batches of the scale's training set (loaded once), round-robin over
    ``rounds`` so that the machine's load falls on every variant alike; medians."""
    from benchmark.data.coco import collate_fn
    from benchmark.data.resolve import resolve_data
    from benchmark.detectors import detector_config
    from benchmark.stages.finetune import TrainSet, open_coco
    from benchmark.engine.sampling import ResumableBatchSampler
    base = finetune_config(scale=scale, detector=detector, schedule=schedule, parent=None)
    train = open_coco(resolve_data(base["data"])["train"], "data.train", with_masks=True)
    variants = []
    for opt in [""] + options:
        over = {}
        for part in filter(None, opt.split(";")):   # "field=value;field=value": several at once
            key, _, val = part.partition("=")
            over[key.strip()] = yaml.safe_load(val)
        batch = over.pop("batch_size", base["recipe"]["batch_size"])
        cfg = finetune_config(scale=scale, detector=detector, schedule=schedule, parent=None, detector_overrides=over)
        det, det_cfg = detector_config(cfg["detector"])
        torch.manual_seed(0)
        model = det.build(det_cfg, train.num_classes + 1).train()
        sampler = iter(ResumableBatchSampler(len(train), batch, 0))
        data = TrainSet(train, 0, det.Recipe.from_dict(cfg["recipe"]).hflip_prob)
        batches = [collate_fn([data[k] for k in next(sampler)]) for _ in range(steps)]
        if not det.with_masks:
            batches = [(ims, [{k: v for k, v in t.items() if k != "masks"} for t in tg]) for ims, tg in batches]
        variants.append({"option": opt or "(the scale's)", "batch": batch, "model": model, "batches": batches,
                         "opt": det.optimizer(model, det.Recipe.from_dict(cfg["recipe"])), "times": []})
    for _ in range(rounds):
        for v in variants:
            t0 = time.perf_counter()
            for ims, tg in v["batches"]:
                loss = sum(v["model"](ims, tg).values())
                v["opt"].zero_grad(set_to_none=True)
                loss.backward()
                v["opt"].step()
            v["times"].append((time.perf_counter() - t0) / steps)
    base_s = statistics.median(variants[0]["times"])
    return [{"option": v["option"], "s_per_step": statistics.median(v["times"]),
             "ratio": statistics.median(v["times"]) / base_s,
             "s_per_image_ratio": statistics.median(v["times"]) / v["batch"] / (base_s / variants[0]["batch"])}
            for v in variants]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--detector", default="mask_rcnn")
    p.add_argument("--schedule", default="1x")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="one run under torch.profiler, split by component")
    p.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                   help="time the step with this detector field (or batch_size) changed, as a ratio")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = p.parse_args(argv)
    runtime = load_scale(a.scale).get("runtime", {})
    torch.set_num_threads(int(runtime.get("torch_threads") or torch.get_num_threads()))
    workers = int(runtime.get("num_workers", 0))
    cfg = finetune_config(scale=a.scale, detector=a.detector, schedule=a.schedule, parent=None)
    import benchmark
    res = {"code": str(Path(benchmark.__file__).parent.parent), "scale": a.scale, "detector": a.detector,
           "steps": a.steps, "torch_threads": torch.get_num_threads(), "num_workers": workers}
    if a.option:
        res["options"] = option_ratios(a.scale, a.detector, a.schedule, a.option, a.steps, a.repeats)
        for r in res["options"]:
            print(f"  {r['option']:44s} {r['s_per_step']:7.3f} s/step  x{r['ratio']:.2f}  "
                  f"(per image x{r['s_per_image_ratio']:.2f})")
    elif a.profile:
        res["profile"] = profile(cfg, a.steps, workers)
        for k, v in res["profile"]["parts_s_per_step"].items():
            print(f"  {k:52s} {v * 1e3:8.1f} ms/step")
        print(f"  {'wall':52s} {res['profile']['wall_s_per_step'] * 1e3:8.1f} ms/step")
    else:
        walls, digests = [], set()
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as d:
                walls.append(run_once(cfg, a.steps, workers, Path(d)))
                digests.add(weights_digest(Path(d)))
        res.update(walls_s=[round(w, 2) for w in walls], median_s_per_step=statistics.median(walls) / a.steps,
                   weights_digest=sorted(digests))
        print(f"{res['code']}: {a.detector} {a.scale} {a.steps} steps x{a.repeats}: median "
              f"{res['median_s_per_step']:.3f} s/step (runs {res['walls_s']} s), weights {res['weights_digest']}")
    ratio = roi_align_ratio()
    if ratio:
        res["roi_align_backward"] = ratio
        print(f"RoIAlign backward: {ratio['ours_ms']:.2f} ms vs torchvision {ratio['torchvision_ms']:.2f} ms "
              f"({ratio['speedup']:.2f}x)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
