"""Benchmark (not a test): time of one pretraining step (forward, backward, optimizer,
momentum update) of each method, reported as a ratio against MoCo v2 measured in the same
process, at a scale's method config. Views are built once and reused, so only the model
is timed.

    python -m tools.bench.step_bench --scale tiny --batch 16 --steps 10
    python -m tools.bench.step_bench --scale paper --batch 64 --device cuda --amp [--fast [--compile]]
    python -m tools.bench.step_bench --methods aligndet:fcos,aligndet:retinanet,aligndet:mask_rcnn,aligndet:detr

``--profile`` adds, per method, where the step's time goes: the share of self time (GPU
kernels on cuda, CPU ops otherwise) by kernel family (convolution, matmul, normalisation,
element-wise, reduction/softmax, copies, optimizer, RoI ops, other), from torch.profiler over
three steps after timing.

``--fast`` times each method again with the fast path of ``runtime`` (channels-last, fused
optimizer) and reports its speed-up over the plain step; ``--compile`` adds a third timing with
torch.compile on top of the fast path (after three warm-up steps, so compilation is not timed).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tests import inputs
from benchmark.experiments.config import load_scale
from benchmark.stages.pretrain import to_device
from benchmark.engine.optim import build_optimizer
from methods import build_method, get_method


def time_method(name: str, scale: str, batch: int, steps: int, device: str, amp: bool,
                image_size: int, fast: bool = False, compile: bool = False, profile: bool = False) -> dict:
    torch.manual_seed(0)
    name, _, detector = name.partition(":")     # "aligndet:fcos": AlignDet pretraining FCOS
    cls = get_method(name)
    sc = load_scale(scale)
    cfg = inputs.method_config(name, cls.scales.get(sc.get("method_scale", scale)))
    if detector:
        cfg["detector"] = detector
    m = build_method(name, **cfg)
    spec = m.detector_spec()
    if spec is not None:    # AlignDet pretrains the scale's detector: inject it as the pretraining stage will
        from benchmark.experiments.config import finetune_config
        from benchmark.detectors import build_detector
        det_cfg = finetune_config(scale=scale, schedule="1x", parent=None, detector=spec["name"])["detector"]
        m.attach_detector(build_detector({**det_cfg, **spec}, num_classes=2))
    m = m.to(device)
    if fast:
        m.to(memory_format=torch.channels_last)
    b = to_device(m.collate(inputs.samples(m, batch, image_size)), device, channels_last=fast)
    fused = fast and device == "cuda" and cls.recipe.optimizer != "lars"
    opt = build_optimizer(m.param_groups(), cls.recipe.optimizer, 0.01, cls.recipe.weight_decay, fused=fused,
                          nesterov=cls.recipe.nesterov)
    fwd = torch.compile(m) if compile else m
    scaler = torch.amp.GradScaler(device, enabled=amp and device == "cuda")

    def step():
        inputs.amp_step(lambda: fwd(b)["loss"], opt, scaler, device, amp)
        m.momentum_update(0.5)

    dt = inputs.seconds_per_step(step, steps, device, warmup=3 if compile else 2)
    row = {"method": f"{name}:{detector}" if detector else name, "s_per_step": dt, "images_per_s": batch / dt,
           "fast": fast, "compile": compile}
    if profile:
        row["profile"] = profile_step(step, device)
    return row


# kernel families by name (first match wins): aten ops on CPU, CUDA kernel names on the GPU
FAMILIES = [
    ("roi", ("roi_align", "roialign", "roi_pool", "nms")),
    ("optimizer", ("sgd", "lars", "adam", "foreach", "multi_tensor", "_fused_")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "winograd", "fprop", "dgrad", "wgrad", "xmma")),
    ("matmul", ("gemm", "mm", "matmul", "linear", "addmm", "bmm", "cutlass", "sm80_", "sm90_")),
    ("normalisation", ("batch_norm", "batchnorm", "bn_", "layer_norm", "norm")),
    ("reduction/softmax", ("softmax", "reduce", "sum", "mean", "max", "log_softmax", "nll", "cross_entropy")),
    ("copies", ("copy", "memcpy", "memset", "cat", "contiguous", "to_copy", "clone", "index")),
    ("element-wise", ("elementwise", "vectorized", "add", "mul", "relu", "threshold", "div", "sub", "where",
                      "fill", "exp", "sigmoid", "clamp")),
]


def family(op_name: str) -> str:
    n = op_name.lower()
    return next((f for f, keys in FAMILIES if any(k in n for k in keys)), "other")


def profile_step(step, device: str, steps: int = 3, top: int = 8) -> dict:
    """Share of the step's self time per kernel family, and the top ops, over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0.0)) for e in prof.key_averages()]
    # on cuda the CPU-side aten ops carry no device time: only kernels count
    events = [(k, t) for k, t in events if t > 0]
    total = sum(t for _, t in events) or 1.0
    by_family: dict[str, float] = {}
    for k, t in events:
        by_family[family(k)] = by_family.get(family(k), 0.0) + t
    return {"time": attr, "ms_per_step": total / 1e3 / steps,
            "share": {f: round(t / total, 4) for f, t in sorted(by_family.items(), key=lambda kv: -kv[1])},
            "top": [{"op": k, "share": round(t / total, 4)} for k, t in sorted(events, key=lambda kv: -kv[1])[:top]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--methods", default="moco_v2,supervised,soco,pixpro,insloc")
    p.add_argument("--fast", action="store_true",
                   help="also time the fast path (channels-last, fused optimizer) of each method")
    p.add_argument("--compile", action="store_true", help="with --fast: time the fast path once more with torch.compile")
    p.add_argument("--profile", action="store_true", help="also report each timed step's time by kernel family")
    p.add_argument("--out", default="results/benchmarks/step_bench.json")
    a = p.parse_args(argv)
    names = a.methods.split(",")
    if "moco_v2" not in names:
        names = ["moco_v2"] + names
    rows, failed = [], []
    for n in names:
        rows.append(time_method(n, a.scale, a.batch, a.steps, a.device, a.amp, a.image_size, profile=a.profile))
        plain = rows[-1]["s_per_step"]
        for compile in ([False, True] if a.compile else [False]) if a.fast else []:
            label = f"{n}+fast" + ("+compile" if compile else "")
            try:
                fast = time_method(n, a.scale, a.batch, a.steps, a.device, a.amp, a.image_size, True, compile,
                                   profile=a.profile)
            except Exception as e:   # torch.compile may fail on a torch version: say so, time the rest
                if not compile:
                    raise
                failed.append({"method": label, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"})
                print(f"{label}: failed ({failed[-1]['error']})")
                continue
            fast["method"] = label
            fast["speedup_vs_plain"] = plain / fast["s_per_step"]
            rows.append(fast)
    base = next(r for r in rows if r["method"] == "moco_v2")["s_per_step"]
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"scale {a.scale}, batch {a.batch}, {dev}, amp={a.amp}")
    print(f"{'method':22s} {'s/step':>9s} {'img/s':>8s} {'vs MoCo v2':>11s}")
    for r in rows:
        r["ratio_vs_moco_v2"] = r["s_per_step"] / base
        print(f"{r['method']:22s} {r['s_per_step']:9.4f} {r['images_per_s']:8.1f} {r['ratio_vs_moco_v2']:10.2f}x")
        if "profile" in r:
            print(" " * 23 + ", ".join(f"{f} {v:.0%}" for f, v in r["profile"]["share"].items() if v >= 0.01))
    for r in failed:
        print(f"{r['method']:22s} failed: {r['error']}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scale": a.scale, "batch": a.batch, "device": dev, "amp": a.amp,
                               "torch": torch.__version__, "rows": rows, "failed": failed}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
