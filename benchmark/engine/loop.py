"""The one generic training loop (pretraining and fine-tuning), its JSONL log, and the
ways a run ends early (diverged, stopped, not resumable)."""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from benchmark.common.fs import atomic_write_bytes
from benchmark.engine.checkpoint import (load_checkpoint, previous_checkpoint, rng_state, save_checkpoint,
                                         set_rng_state)
from benchmark.engine.distributed import is_main_process
from benchmark.engine.signals import REQUESTS

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run stops and its table cells read 'diverged'."""


class Stopped(KeyboardInterrupt):
    """The loop stopped on SIGINT/SIGTERM after saving a checkpoint: the same command resumes."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}; the same command resumes")
        self.step = step


class ResumeError(RuntimeError):
    """A run's saved state (checkpoint, log) cannot be resumed from; the message names the
    file and the remedy."""


def last_logged(path: Path) -> dict:
    """The last logged step's values, as ``TrainLoop.run`` returns them (a run resumed after
    its last step logs nothing more)."""
    if not path.exists():
        return {}
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    rows = [r for r in map(json.loads, lines) if "event" not in r]
    return {k: v for k, v in rows[-1].items() if k not in ("step", "lr", "time")} if rows else {}


class JsonlLogger:
    """Appends one JSON object per line. On resume, lines past the resumed step (logged after
    its checkpoint) are dropped, so the log reads as one uninterrupted run plus one
    ``{"event": "resumed"}`` record (``TrainLoop.run``); a torn last line (a kill mid-append) is
    dropped too, a bad line elsewhere is a ``ResumeError`` naming the file and the line.

    Each record's scalars also go to TensorBoard event files beside the log
    (``benchmark.engine.tb``; ``tensorboard=False`` turns that off)."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from benchmark.engine.tb import TBWriter
        self.tb = TBWriter(self.path.parent, resume_step) if tensorboard else None
        if resume_step is not None and self.path.exists():
            lines = [l for l in self.path.read_text(errors="replace").splitlines() if l.strip()]
            keep = []
            for n, line in enumerate(lines, 1):
                try:
                    rec = json.loads(line)
                except ValueError:
                    if n == len(lines):   # the line a kill tore in half: dropped
                        log.warning("%s: dropped a torn last line (%d characters)", self.path, len(line))
                        break
                    raise ResumeError(f"{self.path}: line {n} is not JSON ({line[:60]!r}); delete that line "
                                      f"to resume, or start the run over with --no-resume") from None
                if rec.get("step", -1) <= resume_step:
                    keep.append(line)
            atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.tb is not None:
            try:
                self.tb.log(record)
            except OSError as e:   # the event files are a view of the log: never the run's failure
                log.warning("TensorBoard logs off for %s: %s", self.path.parent, e)
                self.tb = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------- loop
@dataclass
class LoopConfig:
    total_steps: int
    ckpt_every: int = 100
    log_every: int = 10
    amp: bool = True                 # used only on CUDA
    grad_clip: float | None = None
    desc: str = "train"


class TrainLoop:
    """One generic loop: ``step_fn(batch) -> dict`` (with a ``loss`` tensor) is called for
    steps ``[start, total)``; checkpoints (model, optimizer, scaler, RNG, step) go to
    ``run_dir/checkpoint.pt`` every ``ckpt_every`` steps, when asked (``REQUESTS.checkpoint``:
    preemption) and at the end; only rank 0 writes, every rank resumes from it.

    ``after_step(step, out)`` runs after the optimizer step (momentum updates); ``out`` holds
    the step's tensors, unread (reading them would sync the host with the GPU).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Callable[[int], float], cfg: LoopConfig, run_dir: Path,
                 after_step: Callable[[int, dict], None] | None = None):
        self.model, self.opt, self.schedule, self.cfg = model, optimizer, schedule, cfg
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.after_step = after_step
        self.device = next(model.parameters()).device
        use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.autocast = lambda: torch.autocast(self.device.type, enabled=use_amp)
        self.step = 0
        self.resumed_from: Path | None = None
        # per-group multipliers of the scheduled lr (e.g. LARS lr scaling per group)
        self.group_lr_mult = [g.get("lr_mult", 1.0) for g in self.opt.param_groups]

    # -- checkpoint
    def state_dict(self) -> dict:
        model = self.model.module if hasattr(self.model, "module") else self.model
        return {"step": self.step, "model": model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state()}

    def save(self) -> None:
        if is_main_process():
            save_checkpoint(self.ckpt_path, self.state_dict(), keep_previous=True)

    def try_resume(self) -> int:
        """Resume from ``checkpoint.pt``, or from the previous one (``checkpoint.prev.pt``) when
        it is unreadable; says so on stderr (rank 0). No checkpoint: step 0."""
        candidates = [p for p in (self.ckpt_path, previous_checkpoint(self.ckpt_path)) if p.exists()]
        errors = []
        model = self.model.module if hasattr(self.model, "module") else self.model
        for path in candidates:
            try:
                s = load_checkpoint(path)
                model.load_state_dict(s["model"])
                self.opt.load_state_dict(s["optimizer"])
                self.scaler.load_state_dict(s["scaler"])
                set_rng_state(s["rng"])
                step = int(s["step"])
            except Exception as e:  # noqa: BLE001 — truncated, foreign or mismatched: try the previous
                errors.append(f"{path}: {e}")
                log.warning("cannot resume from %s (%s)%s", path, e,
                            "; trying the previous checkpoint" if path == self.ckpt_path else "")
                continue
            self.step, self.resumed_from = step, path
            if is_main_process():
                print(f"resumed from {path} at step {step}", file=sys.stderr, flush=True)
            return step
        if errors:
            raise ResumeError("cannot resume: " + "; ".join(errors) + " -- rerun with --no-resume to start "
                              "over, or delete the file(s)")
        return 0

    # -- loop
    def run(self, batches: Iterable, step_fn: Callable[[Any], dict], logger: JsonlLogger | None,
            stop_after: int | None = None, progress: bool = True) -> dict:
        """Train until ``total_steps`` (or ``stop_after`` steps, for tests and preemption).
        ``batches`` must yield the batch of step ``self.step`` first."""
        from tqdm.auto import tqdm
        cfg, req = self.cfg, REQUESTS
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc=cfg.desc, dynamic_ncols=True,
                   disable=not (progress and is_main_process()), mininterval=1.0)
        last: dict = {}
        t0 = time.time()
        done_here = 0
        if logger is not None and self.resumed_from is not None and self.step < cfg.total_steps \
                and is_main_process():
            logger.log({"step": self.step, "event": "resumed", "from": self.resumed_from.name})
        with req.handlers(), bar:
            it = iter(batches)   # after the handlers: forked loader workers inherit them
            while self.step < cfg.total_steps:
                lr, out = self._forward(next(it), step_fn)
                # no host sync on ordinary steps: losses are read (and checked for NaN) only
                # on the steps that log, checkpoint or stop (a request made during this step counts)
                nxt = self.step + 1
                sync = (nxt % cfg.log_every == 0 or nxt % cfg.ckpt_every == 0 or nxt == cfg.total_steps
                        or req.checkpoint or req.stop or (stop_after is not None and done_here + 1 >= stop_after))
                self._update(out, check_finite=sync)
                done_here += 1
                bar.update(1)
                if not sync:
                    continue
                last = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
                if logger is not None and (self.step % cfg.log_every == 0 or self.step == cfg.total_steps):
                    if is_main_process():
                        logger.log({"step": self.step, "lr": lr, "time": round(time.time() - t0, 3), **last})
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                if self.step % cfg.ckpt_every == 0 or req.checkpoint or self.step == cfg.total_steps:
                    self.save()
                    req.checkpoint = False
                if stop_after is not None and done_here >= stop_after:
                    self.save()
                    break
                if req.stop and self.step < cfg.total_steps:
                    self.save()
                    bar.close()
                    if is_main_process() and req.announce:
                        print(f"stopped at step {self.step}; the same command resumes", file=sys.stderr, flush=True)
                    raise Stopped(self.step)
        return last

    def _forward(self, batch, step_fn: Callable[[Any], dict]) -> tuple[float, dict]:
        """The step's forward at the scheduled lr; returns (lr, the step's outputs, unread)."""
        lr = self.schedule(self.step)
        for g, m in zip(self.opt.param_groups, self.group_lr_mult):
            g["lr"] = lr * m
        self.model.train()
        with self.autocast():
            return lr, step_fn(batch)

    def _update(self, out: dict, check_finite: bool) -> None:
        """Backward and optimizer step (then ``after_step``: momentum updates)."""
        loss = out["loss"]
        if check_finite and not torch.isfinite(loss.detach()).all():
            raise Diverged(f"loss is {loss.item()} at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step(self.step, out)
        self.step += 1
