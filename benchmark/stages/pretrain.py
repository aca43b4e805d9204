"""The pretraining stage: any registered method, one loop, resumable, exporting weights.pt."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.common.fs import sha256_file
from benchmark.common.paths import cache_root
from benchmark.data.errors import CorruptImage, DataError, note_unreadable
from benchmark.data.images import ImageSource, render_deferred
from benchmark.data.mask_cache import compute_masks
from benchmark.data.proposal_cache import compute_proposals
from benchmark.data.pseudo_class_cache import compute_pseudo_classes
from benchmark.data.resolve import resolve_data
from benchmark.detectors import build_detector, get_detector, load_pretrained
from methods.config import ConfigError
from methods.sync_bn import convert_sync_batchnorm
from methods.weights import read_state_dict
from benchmark.engine.checkpoint import save_checkpoint, seed_everything
from benchmark.engine.distributed import init_distributed_from_env, is_main_process, replicas_in_sync, world
from benchmark.engine.loop import JsonlLogger, last_logged, LoopConfig, TrainLoop
from benchmark.engine.optim import build_optimizer, Schedule
from benchmark.engine.sampling import ResumableBatchSampler, sample_rng
from benchmark.stages.base import register_stage, Stage, StageContext
from methods import build_method, get_method
from methods.base import PretrainRecipe

log = logging.getLogger(__name__)


class PretrainDataset(torch.utils.data.Dataset):
    """Items are ``(epoch, index)`` pairs from ``ResumableBatchSampler``; the views of item
    ``index`` in ``epoch`` are drawn with ``sample_rng(seed, epoch, index)``. A corrupt image
    is a logged skip recorded in the run's ``SkipLog`` (counted across DataLoader workers):
    the next image takes its place (same rng stream)."""

    def __init__(self, source, method, seed: int, labels: dict | None = None, proposals=None,
                 pseudo_classes=None, masks=None):
        self.source, self.method, self.seed = source, method, seed
        self.labels, self.proposals, self.pseudo_classes = labels, proposals, pseudo_classes
        self.masks = masks
        self.view_source = source if method.needs_source else None   # what ``views`` may draw from
        self.skipped: set[str] = set()   # this process's, for logging once per file

    def __len__(self) -> int:
        return len(self.source)

    def record(self, index: int) -> dict:
        rec = self.source.record(index)
        if self.labels is not None:
            rec["labels"] = self.labels[rec["image_id"]]
        if self.proposals is not None:
            rec["proposals"] = self.proposals.boxes(index)
        if self.pseudo_classes is not None:
            rec["pseudo_classes"] = self.pseudo_classes.labels(index)
        if self.masks is not None:
            rec["masks"] = self.masks.mask(index)
        return rec

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        rng = sample_rng(self.seed, epoch, index)
        for j in range(len(self.source)):
            i = (index + j) % len(self.source)
            try:
                rec = self.record(i)
            except CorruptImage as e:
                note_unreadable(e, len(self.source), self.skipped, log)
                continue
            return self.method.views(rec, rng, self.view_source)
        raise DataError(getattr(self.source, "root", "") or "<image source>", "images",
                        f"all {len(self.source)} images are unreadable")


def _image_labels(ann_file: str, num_classes: int | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Multi-hot image-level labels from a COCO json (the Supervised baseline at tiny)."""
    d = json.loads(Path(ann_file).read_text())
    cats = sorted(c["id"] for c in d["categories"])
    idx = {c: i for i, c in enumerate(cats)}
    out = {im["id"]: np.zeros(len(cats), np.float32) for im in d["images"]}
    for a in d["annotations"]:
        if not a.get("iscrowd", 0):
            out[a["image_id"]][idx[a["category_id"]]] = 1.0
    return out, len(cats)


def resolve_steps(recipe: PretrainRecipe, n_images: int) -> tuple[int, int]:
    """(total steps, warmup steps). Paper scale: epochs x ceil(N / batch). Scales may fix
    ``steps_per_epoch`` instead (tiny: one paper epoch = a few steps)."""
    spe = recipe.steps_per_epoch or math.ceil(n_images / recipe.batch_size)
    total = max(1, int(round(recipe.epochs * spe)))
    warm = int(round(recipe.warmup_epochs * spe))
    return total, min(warm, total)


def per_process_batch(batch: int, world_size: int, field: str = "recipe.batch_size") -> int:
    """The global ``batch`` split evenly over ``world_size`` processes, or a ConfigError."""
    if batch % world_size:
        raise ConfigError(f"{field}: the global batch {batch} cannot be split evenly over {world_size} "
                          f"processes (choose a process count that divides it)")
    return batch // world_size


def build_for_pretrain(config: dict):
    """The method with its config, plus the data and image labels it reads."""
    mcfg = dict(config["method"])
    name = mcfg.pop("name")
    data = resolve_data(config["data"])
    cls = get_method(name)
    if cls.pretrain_images != "pretrain":   # AlignDet: the detection training images, labels unread
        if cls.pretrain_images not in data:
            raise ValueError(f"data.{cls.pretrain_images}: missing: {name} pretrains on the "
                             f"{cls.pretrain_images} images (the config's data has {', '.join(data)})")
        data = {**data, "pretrain": data[cls.pretrain_images]}
    labels = None
    if cls.needs_labels and not mcfg.get("weights"):
        labels, n_cls = _image_labels(data["pretrain"]["ann_file"])
        if "num_classes" in mcfg and not mcfg["num_classes"]:   # 0: from the pretraining set
            mcfg["num_classes"] = n_cls
    method = build_method(name, **mcfg)
    return method, data, labels


# The detector's own classifiers are replaced by the method's embedding heads and dropped at
# export: any class count builds the parts it pretrains.
PRETRAIN_NUM_CLASSES = 2


def attach_detector(method, config: dict, parent_weights: str | Path | None) -> None:
    """Build ``config["detector"]`` with the fine-tuning builder, load the parent run's
    backbone into it (every backbone key, or an error) and hand it to the method."""
    name = config["method"]["name"]
    if not config.get("parent"):
        raise ValueError(f"parent: missing: {name} pretrains {config['detector']['name']} over the backbone "
                         f"of an image-domain run (the config's 'parent' run key)")
    if parent_weights is None:
        raise ValueError(f"parent: {config['parent']}: no weights file given for the parent run")
    spec = method.detector_spec()
    if spec is None or spec["name"] != config["detector"]["name"]:
        raise ValueError(f"detector.name: {config['detector']['name']!r} is not the detector {name} "
                         f"pretrains ({spec and spec['name']!r})")
    det = build_detector(config["detector"], PRETRAIN_NUM_CLASSES)
    report = load_pretrained(det, read_state_dict(parent_weights), get_detector(spec["name"]),
                             require=("backbone",), source=str(parent_weights))
    log.info("%s: backbone of parent %s: %s", name, config["parent"], report.summary())
    method.attach_detector(det)


def run_pretrain(config: dict, run_dir: Path, *, resume: bool = True, stop_after: int | None = None,
                 device: str | None = None, num_workers: int = 0, progress: bool = True,
                 parent_weights: str | Path | None = None) -> dict:
    """Pretrain ``config["method"]`` on ``config["data"]``; writes ``checkpoint.pt`` (every
    ``ckpt_every`` steps), ``log.jsonl`` and at the end ``weights.pt`` (canonical keys).
    A config with a ``detector`` (AlignDet) pretrains that detector over the backbone of its
    ``parent`` run, whose ``weights.pt`` is ``parent_weights``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(config["seed"])
    recipe = PretrainRecipe.from_dict(config["recipe"])
    runtime = config.get("runtime", {})
    seed_everything(seed)
    distributed = init_distributed_from_env()
    rank, world_size = world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    method, data, labels = build_for_pretrain(config)
    if config.get("detector") is not None:
        attach_detector(method, config, parent_weights)   # before .to(device), the optimizer and resume
    method.to(device)
    given = method.given_weights()
    if given is not None:
        return _export_given_weights(given, config["method"], run_dir)
    if distributed and method.sync_bn:
        method = convert_sync_batchnorm(method)   # BN over the global batch, as in one process
    fast = fast_path(runtime, device)
    if fast["channels_last"]:
        method.to(memory_format=torch.channels_last)
    pre = data["pretrain"]
    source = (ImageSource.from_coco(pre["image_root"], pre["ann_file"]) if pre.get("ann_file")
              else ImageSource.from_folder(pre["image_root"]))
    source.loader = recipe.loader   # where images are decoded and augmented
    proposals = None
    search_params = method.proposal_params()
    if search_params is not None:
        proposals = compute_proposals([source.path(i) for i in range(len(source))],
                                      cache_root() / "proposals", **search_params)
    masks = None
    fh_params = method.mask_params()
    if fh_params is not None:   # DetCon: Felzenszwalb-Huttenlocher id maps, once per dataset, cached
        masks = compute_masks([source.path(i) for i in range(len(source))], cache_root() / "masks", **fh_params)
    classes = None
    class_params = method.pseudo_class_params()
    if class_params is not None:   # AlignDet's DETR: k-means of the proposals on the parent's backbone, cached
        if proposals is None or parent_weights is None:
            raise ValueError(f"{config['method']['name']}: pseudo-classes need the proposal cache and the "
                             f"parent run's weights (config 'parent')")
        classes = compute_pseudo_classes(method, source, proposals, cache_root() / "pseudo_classes",
                                         weights_sha256=sha256_file(Path(parent_weights)),
                                         params={**class_params, "seed": seed}, device=device)
    dataset = PretrainDataset(source, method, seed, labels, proposals, classes, masks)

    # the recipe's batch is the global one at every process count: steps, lr and schedules follow it
    total, warmup = resolve_steps(recipe, len(source))
    batch = per_process_batch(recipe.batch_size, world_size)
    method.check_split(batch)
    lr = recipe.base_lr * recipe.batch_size / recipe.lr_batch   # linear scaling rule (global batch)
    opt = build_optimizer(method.param_groups(), recipe.optimizer, lr, recipe.weight_decay,
                                  recipe.momentum, fused=fast["fused"] and recipe.optimizer != "lars",
                                  nesterov=recipe.nesterov, lars_eps=recipe.lars_eps)
    milestones = tuple(round(f * total) for f in recipe.milestones or ())
    sched = Schedule(lr, total, warmup, kind=recipe.schedule, milestones=milestones,
                     warmup_factor=recipe.warmup_start_factor, min_lr=recipe.min_lr,
                     steps_per_epoch=total / recipe.epochs if recipe.cosine_per_epoch else None)
    model = method
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)
    loop = TrainLoop(model, opt, sched,
                             LoopConfig(total_steps=total, ckpt_every=runtime.get("ckpt_every", 100),
                                                log_every=runtime.get("log_every", 10), amp=runtime.get("amp", True),
                                                grad_clip=recipe.grad_clip,
                                                desc=f"pretrain {config['method']['name']}"),
                             run_dir, after_step=lambda s, logs: method.momentum_update((s + 1) / total))
    start = loop.try_resume() if resume else 0
    logger = JsonlLogger(run_dir / "log.jsonl", resume_step=start if resume else None)
    sampler = ResumableBatchSampler(len(dataset), recipe.batch_size, seed, start_step=start, rank=rank,
                                    world_size=world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=method.collate,
        num_workers=num_workers, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="fork" if num_workers else None)

    step_model = torch.compile(model) if fast["compile"] else model

    def step_fn(batch):
        batch = render_deferred(batch, device)   # loader "device": its pixels are made here, on the device
        return step_model(to_device(batch, device, channels_last=fast["channels_last"]))

    last = loop.run(loader, step_fn, logger, stop_after=stop_after, progress=progress)
    if not last and loop.step >= total:   # killed after its last checkpoint: the log has the last values
        last = last_logged(run_dir / "log.jsonl")
    metrics = {"steps": loop.step, "total_steps": total, "final": last,
               "world_size": world_size, "batch_per_process": batch, "batch": recipe.batch_size, "lr": lr,
               "samples_seen": loop.step * recipe.batch_size, "fast_path": fast}
    if distributed:
        metrics["replicas_in_sync"] = replicas_in_sync(method)
    if loop.step >= total and is_main_process():
        export = {"state_dict": method.export(), "method": config["method"]["name"]}
        save_checkpoint(run_dir / "weights.pt", export)
        metrics["weights_sha256"] = sha256_file(run_dir / "weights.pt")
    return metrics


def _export_given_weights(state: dict, method_cfg: dict, run_dir: Path) -> dict:
    save_checkpoint(run_dir / "weights.pt", {"state_dict": state, "method": method_cfg["name"]})
    return {"steps": 0, "total_steps": 0, "weights_from": method_cfg.get("weights"),
            "weights_sha256": sha256_file(run_dir / "weights.pt")}


def fast_path(runtime: dict, device: torch.device) -> dict:
    """Speed settings that leave the training the same to float tolerance:
    channels-last memory format, fused optimizer kernels (CUDA), ``torch.compile``.
    ``runtime.*`` keys, so never part of a run's identity; the paper scale turns them on."""
    cuda = device.type == "cuda"
    return {"channels_last": bool(runtime.get("channels_last", False)),
            "fused": bool(runtime.get("fused_optimizer", cuda)) and cuda,
            "compile": bool(runtime.get("compile", False))}


def to_device(x: Any, device, channels_last: bool = False) -> Any:
    if torch.is_tensor(x):
        x = x.to(device, non_blocking=True)
        if channels_last and x.ndim == 4 and x.is_floating_point():
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, channels_last) for v in x)
    return x




@register_stage("pretrain")
class PretrainStage(Stage):
    output = ("weights.pt", "weights_sha256")

    def run(self, ctx: StageContext) -> tuple[dict, bool]:
        parent_weights = ctx.parent_dir / "weights.pt" if ctx.parent_dir else None
        m = run_pretrain(ctx.config, ctx.run_dir, resume=ctx.resume, stop_after=ctx.stop_after, device=ctx.device,
                         num_workers=ctx.runtime.get("num_workers", 0), progress=ctx.progress,
                         parent_weights=parent_weights)
        return m, m["steps"] >= m["total_steps"]
