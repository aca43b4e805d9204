"""Fine-tuning a detector from pretrained weights (the transfer half of every table).

``run_finetune`` builds the detector the config names (``benchmark.detectors``), loads a
method's ``weights.pt`` (canonical keys), and trains with the shared ``TrainLoop`` under the
detector's own optimizer and lr schedule (SGD with warm-up and steps for the R-CNNs and
one-stage detectors, AdamW for DETR), horizontal-flip + multi-scale augmentation, crowd
regions dropped from the targets. Resumable and bit-exact on CPU: the batch of step ``s``
and its flips are pure functions of (seed, s); every other RNG is in the checkpoint. With
``recipe.precise_bn_iters`` (detectron2's PreciseBN) the BN statistics of the final model are
recomputed over the batches that follow the last step before ``model_final.pt`` is saved.

The run's label space is recorded before the first step: ``classes`` in the run folder's
``config.json``, the training json's categories ``[{"id", "name"}, ...]`` in label order (entry
k is label k + 1; 0 is the background). Evaluation maps the model's labels to the val json's
categories by these names (``benchmark.stages.evaluate.map_by_name``). The record is not part of
the run's key (``benchmark.runs.identity.NON_IDENTITY``): it follows from the training data.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from benchmark.common.device import resolve_device
from benchmark.common.fs import atomic_write_json
from benchmark.data.coco import CocoDetection, collate_fn
from benchmark.data.errors import DataError
from benchmark.data.resolve import resolve_data
from benchmark.detectors import detector_config, load_pretrained, maybe_sync_bn
from methods.weights import read_state_dict
from benchmark.engine.checkpoint import save_checkpoint, seed_everything
from benchmark.engine.distributed import is_main_process, world
from benchmark.engine.loop import last_logged, JsonlLogger, LoopConfig, TrainLoop
from benchmark.engine.sampling import ResumableBatchSampler, sample_rng
from benchmark.stages.base import register_stage, Stage, StageContext
from methods.config import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data
def open_coco(split: dict, where: str, *, with_masks: bool):
    """``CocoDetection`` for ``data[<split>] = {"image_root", "ann_file"}``."""
    if not isinstance(split, dict):
        raise ValueError(f"{where}: expected a mapping with image_root and ann_file, got {split!r}")
    for k in ("image_root", "ann_file"):
        if k not in split:
            raise ValueError(f"{where}.{k}: missing")
    unknown = sorted(set(split) - {"image_root", "ann_file"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: ann_file, image_root)")
    return CocoDetection(split["image_root"], split["ann_file"], with_masks=with_masks)


def class_list(classes, limit: int = 8) -> str:
    """``N classes [a, b, ...]`` for a message: the first ``limit`` names, then how many more."""
    names = [str(c["name"]) if isinstance(c, dict) else str(c) for c in classes]
    shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
    return f"{len(names)} classes [{shown}]"


def record_classes(run_dir: Path, classes: list[dict]) -> None:
    """Record the training classes (``[{"id", "name"}]``, label order) as ``classes`` in
    ``run_dir/config.json``, every other field kept (the file is created outside a run store).
    A resumed run finds them there; a run whose training data now has other classes is refused:
    its checkpoint learnt the recorded ones."""
    p = Path(run_dir) / "config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    classes = [{"id": int(c["id"]), "name": str(c["name"])} for c in classes]
    old = cfg.get("classes")
    if old == classes:
        return
    if old is not None:
        raise DataError(p, "classes", f"this run was trained on {class_list(old)}, its training data now has "
                                      f"{class_list(classes)} (remove {Path(run_dir)} to train it again)")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, {**cfg, "classes": classes})


def trained_classes(run_dir: Path) -> list[dict] | None:
    """The classes a fine-tuning run recorded (``record_classes``); None for a run stored before
    the record existed (or a model outside a run folder)."""
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        return None
    classes = json.loads(p.read_text()).get("classes")
    if classes is None:
        return None
    if not (isinstance(classes, list) and classes and all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in classes)):
        raise DataError(p, "classes", f"expected a non-empty list of {{id, name}}, got {str(classes)[:80]}")
    return classes


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image [3,H,W] with its xyxy boxes and [N,H,W] masks."""
    w = image.shape[-1]
    target = dict(target)
    image = image.flip(-1)
    if "boxes" in target:
        b = target["boxes"].clone()
        b[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        target["boxes"] = b
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


class TrainSet(torch.utils.data.Dataset):
    """Wraps a ``CocoDetection`` for training: indexed by the sampler's ``(epoch, index)``;
    flip drawn from ``sample_rng(seed, epoch, index)``; crowd and degenerate boxes removed."""

    def __init__(self, base, seed: int, hflip_prob: float):
        self.base, self.seed, self.hflip_prob = base, seed, hflip_prob

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        image, target = self.base[index]
        keep = torch.ones(len(target["boxes"]), dtype=torch.bool)
        if "iscrowd" in target:
            keep &= torch.as_tensor(target["iscrowd"]) == 0
        b = target["boxes"]
        if len(b):
            keep &= (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        out = {"boxes": b[keep].float().reshape(-1, 4), "labels": target["labels"][keep].long()}
        if "masks" in target:
            out["masks"] = target["masks"][keep]
        rng = sample_rng(self.seed, epoch, index)
        if rng.random() < self.hflip_prob:
            image, out = hflip(image, out)
        return image, out


def precise_bn(model: torch.nn.Module, batches, forward, iters: int) -> int:
    """detectron2's PreciseBN (``TEST.PRECISE_BN``; fvcore ``update_bn_stats``): the running
    mean and variance of every BatchNorm in training mode become the plain averages of its
    batch means and (unbiased) batch variances over ``iters`` batches, instead of the
    momentum averages of training. ``forward(batch)`` runs the model in training mode
    without gradients; weights and every other state are left as they were. Returns the
    number of batches used (fewer than ``iters`` when ``batches`` runs out)."""
    bns = [m for m in model.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not bns or iters <= 0:
        return 0
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None           # cumulative average: stat_k = mean of the k batch stats
    n = 0
    with torch.no_grad():
        for batch in batches:
            if n == iters:
                break
            forward(batch)
            n += 1
    for m, (momentum, tracked) in zip(bns, kept):
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)
    return n


# --------------------------------------------------------------------------- run
def run_finetune(detector: dict, recipe: dict, data: dict, *, run_dir: Path, weights: str | None,
                 seed: int, resume: bool = True, stop_after: int | None = None,
                 device: str | None = "auto", progress: bool = True) -> dict:
    """Fine-tune the detector ``detector`` names (``{"name", **config}``); writes ``log.jsonl``, ``checkpoint.pt``, ``load_report.json``
    (when ``weights``) and, once all steps are done, ``model_final.pt``.
    Returns ``{"final_loss", "steps"}``. ``Diverged`` propagates."""
    run_dir = Path(run_dir)
    det, det_cfg = detector_config(detector)
    rec = det.Recipe.from_dict(recipe)
    if not isinstance(data, dict) or "train" not in data:
        raise ValueError("data.train: missing (expected {'train': {'image_root', 'ann_file'}, 'val': ...})")
    dev = resolve_device(device)
    rank, world_size = world()
    if rec.batch_size % world_size:
        raise ConfigError(f"recipe.batch_size: {rec.batch_size} is not divisible by {world_size} processes")

    train_base = open_coco(data["train"], "data.train", with_masks=det.with_masks)
    num_classes = train_base.num_classes + 1   # + background
    if is_main_process():   # the label space, before the first step (a killed run has it too)
        record_classes(run_dir, train_base.categories)
    seed_everything(seed)
    model = det.build(det_cfg, num_classes).to(dev)
    if weights:
        report = load_pretrained(model, read_state_dict(weights), det, drop=rec.drop_groups, source=str(weights))
        if is_main_process():
            report.save(run_dir / "load_report.json")
    model = maybe_sync_bn(model)
    opt = det.optimizer(model, rec)
    schedule = det.schedule(rec)
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loop = TrainLoop(net, opt, schedule,
                     LoopConfig(total_steps=rec.steps, ckpt_every=rec.ckpt_every, log_every=rec.log_every,
                                amp=rec.amp, grad_clip=rec.grad_clip, desc="finetune"),
                     run_dir)
    start = loop.try_resume() if resume else 0
    logger = JsonlLogger(run_dir / "log.jsonl", resume_step=start if resume else None)

    def loader_from(step: int):
        sampler = ResumableBatchSampler(len(train_base), rec.batch_size, seed, start_step=step,
                                        rank=rank, world_size=world_size)
        return torch.utils.data.DataLoader(
            TrainSet(train_base, seed, rec.hflip_prob), batch_sampler=sampler, num_workers=rec.num_workers,
            collate_fn=collate_fn, pin_memory=dev.type == "cuda",
            generator=torch.Generator().manual_seed(seed))   # iterator creation leaves the global RNG alone

    def losses_of(batch) -> dict:
        images, targets = batch
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in targets]
        return net(images, targets)

    def step_fn(batch):
        losses = losses_of(batch)
        out = {"loss": sum(losses.values())}
        out.update({k: v.detach() for k, v in losses.items()})
        return out

    last = (loop.run(loader_from(start), step_fn, logger, stop_after=stop_after, progress=progress)
            if start < rec.steps else {})
    if "loss" not in last:
        last = last_logged(run_dir / "log.jsonl")
    if loop.step >= rec.steps and rec.precise_bn_iters:
        # every rank (SyncBN gathers across them), on the training batches after the last step
        net.train()
        n = precise_bn(net, loader_from(rec.steps), losses_of, rec.precise_bn_iters)
        log.info("precise BN: BatchNorm statistics recomputed over %d batches", n)
    if loop.step >= rec.steps and is_main_process():
        save_checkpoint(run_dir / "model_final.pt", {"state_dict": model.state_dict(), "num_classes": num_classes,
                                                     "detector": {"name": det.name, **det_cfg.to_dict()}})
    return {"final_loss": last.get("loss"), "steps": loop.step}


@register_stage("finetune")
class FinetuneStage(Stage):
    output = ("model_final.pt", "model_sha256")

    def run(self, ctx: StageContext) -> tuple[dict, bool]:
        cfg = ctx.config
        weights = str(ctx.parent_dir / "weights.pt") if ctx.parent_dir else None
        runtime = {k: ctx.runtime[k] for k in ("num_workers",) if k in ctx.runtime}   # what the recipe reads
        m = run_finetune(cfg["detector"], {**cfg["recipe"], **runtime}, resolve_data(cfg["data"]),
                         run_dir=ctx.run_dir, weights=weights, seed=cfg["seed"], resume=ctx.resume,
                         stop_after=ctx.stop_after, device=ctx.device)
        return m, (ctx.run_dir / "model_final.pt").exists()
