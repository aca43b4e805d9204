"""Shared training machinery: resumable sampling, schedules, LARS, atomic checkpoints,
JSONL logs and one generic loop used by pretraining and fine-tuning.

Determinism contract (CPU, fixed seed): the batch at step ``s`` is a pure function of
(seed, s); every RNG the step touches is saved in the checkpoint. A run stopped after
step k and resumed ends with exactly the weights of an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from benchmark.fsutil import atomic_open, atomic_write_bytes

log = logging.getLogger(__name__)

_CHECKPOINT_REQUESTED = False


def request_checkpoint(*_args) -> None:
    """Ask the running loop to write a checkpoint at the end of its current step
    (called from submitit's ``checkpoint()`` on preemption, or a SIGUSR1 handler)."""
    global _CHECKPOINT_REQUESTED
    _CHECKPOINT_REQUESTED = True


def checkpoint_pending() -> bool:
    """True from ``request_checkpoint`` until the loop has saved."""
    return _CHECKPOINT_REQUESTED


_STOP_REQUESTED = 0   # the signal (SIGINT/SIGTERM) that asked the loop to stop after its current step


def request_stop(signum, _frame=None) -> None:
    """SIGINT/SIGTERM handler: the loop saves at the end of its current step and raises
    ``Stopped``; a second signal before then interrupts at once."""
    global _STOP_REQUESTED
    if _STOP_REQUESTED:
        raise KeyboardInterrupt
    _STOP_REQUESTED = signum


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


# --------------------------------------------------------------------------- sampling
class ResumableBatchSampler:
    """Infinite batch sampler over ``n`` items yielding lists of ``(epoch, index)``.

    Epoch ``e`` is a permutation drawn from ``Generator(seed, e)``; the stream is the
    concatenation of the epochs, and batch ``s`` is items ``[s*B, (s+1)*B)`` of it, so
    starting at any step reproduces the same batches. Datasets derive their augmentation
    RNG from ``(seed, epoch, index)``: results do not depend on the DataLoader workers.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise ValueError("ResumableBatchSampler: the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.shuffle = start_step, shuffle
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_b = self.batch_size * self.world_size
        pos = self.start_step * global_b
        epoch, off = divmod(pos, self.n)
        perm = self._perm(epoch)
        while True:
            items = []
            while len(items) < global_b:
                take = min(global_b - len(items), self.n - off)
                items += [(epoch, int(i)) for i in perm[off:off + take]]
                off += take
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    perm = self._perm(epoch)
            yield items[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:  # DataLoader needs it for nothing; infinite stream
        return 2 ** 62


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


# --------------------------------------------------------------------------- schedules
@dataclass
class Schedule:
    """Learning-rate schedule: linear warmup, then cosine or step decay."""
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"                 # "cosine" | "multistep" | "constant"
    milestones: tuple[int, ...] = ()     # multistep: steps where lr *= gamma
    gamma: float = 0.1
    warmup_factor: float = 0.001         # detectron2's default start of warmup

    def __post_init__(self):
        if self.kind not in ("cosine", "multistep", "constant"):
            raise ValueError(f"schedule.kind: unknown {self.kind!r} (cosine|multistep|constant)")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            a = step / max(1, self.warmup_steps)
            f = self.warmup_factor * (1 - a) + a
        else:
            f = 1.0
        if self.kind == "cosine":
            t = min(1.0, max(0, step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * t))
            return lr * (f if step < self.warmup_steps else 1.0)
        if self.kind == "multistep":
            return self.base_lr * f * self.gamma ** sum(step >= m for m in self.milestones)
        return self.base_lr * f


# --------------------------------------------------------------------------- optimizers
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by BYOL/SoCo: SGD with momentum whose update for each
    weight matrix is scaled by eta * ||w|| / ||g + wd * w||. Biases and norm parameters
    (1-d tensors) are excluded from adaptation and weight decay (BYOL Appendix C)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, exclude_1d: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, exclude_1d=exclude_1d))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            adapt = [p for p in params if not (g["exclude_1d"] and p.ndim <= 1)]
            plain = [p for p in params if g["exclude_1d"] and p.ndim <= 1]
            # one fused kernel per operation over the group (no per-tensor host round trips)
            d = [p.grad.clone() for p in adapt]
            if adapt:
                if g["weight_decay"]:
                    torch._foreach_add_(d, adapt, alpha=g["weight_decay"])
                pn = torch.stack(torch._foreach_norm(adapt))
                dn = torch.stack(torch._foreach_norm(d))
                trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                torch._foreach_mul_(d, list(trust.unbind()))
            d += [p.grad for p in plain]
            ordered = adapt + plain
            bufs = []
            for p, dp in zip(ordered, d):
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    self.state[p]["momentum_buffer"] = dp.clone()
                else:
                    bufs.append((buf, dp))
            if bufs:
                torch._foreach_mul_([b for b, _ in bufs], g["momentum"])
                torch._foreach_add_([b for b, _ in bufs], [dp for _, dp in bufs])
            torch._foreach_add_(ordered, [self.state[p]["momentum_buffer"] for p in ordered], alpha=-g["lr"])


def build_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    fused: bool = False, nesterov: bool = False):
    """``fused``: one CUDA kernel for the whole SGD/AdamW step (same update, no host syncs).
    ``nesterov``: Nesterov momentum (SGD only)."""
    if nesterov and name != "sgd":
        raise ValueError(f"recipe.nesterov: Nesterov momentum is an SGD option, not {name!r}'s")
    fused = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                               **fused)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    raise ValueError(f"optimizer: unknown {name!r} (sgd|lars|adamw)")


# --------------------------------------------------------------------------- io
def previous_checkpoint(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".prev" + Path(path).suffix)


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill never leaves half a file.
    ``keep_previous``: the file being replaced becomes ``<name>.prev.pt`` only once the new one
    is complete, so there is always one whole checkpoint to fall back to; ``path`` itself is
    never missing (the previous one is linked under its second name, then ``path`` is replaced
    in one rename)."""
    if not keep_previous:
        with atomic_open(path) as f:
            torch.save(state, f)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    prev = previous_checkpoint(path)
    prev_tmp = prev.with_name(f".{prev.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)             # the current checkpoint under a second name, no copy
            except OSError:                         # a filesystem without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        prev_tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise RuntimeError(f"{path}: cannot read checkpoint ({e})") from e


class JsonlLogger:
    """Appends one JSON object per line. On resume, lines past the resumed step (logged after
    its checkpoint) are dropped, so the log reads as one uninterrupted run plus one
    ``{"event": "resumed"}`` record (``TrainLoop.run``); a torn last line (a kill mid-append) is
    dropped too, a bad line elsewhere is a ``ResumeError`` naming the file and the line."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """torch.distributed from the environment when the job has several processes: torchrun's
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), which the Slurm
    job wrapper exports from Slurm's through submitit. NCCL on GPU, gloo on CPU; each process
    takes GPU ``LOCAL_RANK``. Returns True when distributed (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or (int(os.environ["WORLD_SIZE"]) <= 1 and "RANK" not in os.environ):
        return False   # (torchrun with one process still takes the distributed path: RANK is set)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch "
                           f"with torchrun, `detbench ... --nproc N`, or the Slurm executor")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return True


def default_device() -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` when there is CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def distributed_env() -> dict:
    """What a run records about its processes (``env.json``)."""
    rank, world_size = world()
    on = dist.is_available() and dist.is_initialized()
    return {"world_size": world_size, "backend": dist.get_backend() if on else None}


@torch.no_grad()
def replicas_in_sync(model: torch.nn.Module) -> bool:
    """Whether every process holds the same parameters (a checksum compared across ranks):
    DDP keeps them equal; a method that updates state outside it must too."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])   # on the model's device (NCCL)
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    ``run_dir/checkpoint.pt`` every ``ckpt_every`` steps, when asked (``request_checkpoint``:
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
        import sys
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
        global _CHECKPOINT_REQUESTED, _STOP_REQUESTED
        import sys

        from tqdm.auto import tqdm
        cfg = self.cfg
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc=cfg.desc, dynamic_ncols=True,
                   disable=not (progress and is_main_process()), mininterval=1.0)
        last: dict = {}
        t0 = time.time()
        done_here = 0
        old_handlers = {}
        _STOP_REQUESTED = 0
        try:
            old_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, request_checkpoint)
            for sig in (signal.SIGINT, signal.SIGTERM):   # Ctrl-C, kill, Slurm's cancel
                old_handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not in the main thread
            pass
        if logger is not None and self.resumed_from is not None and self.step < cfg.total_steps \
                and is_main_process():
            logger.log({"step": self.step, "event": "resumed", "from": self.resumed_from.name})
        try:
            it = iter(batches)   # after the handlers: forked loader workers inherit them
            while self.step < cfg.total_steps:
                lr = self.schedule(self.step)
                for g, m in zip(self.opt.param_groups, self.group_lr_mult):
                    g["lr"] = lr * m
                batch = next(it)
                self.model.train()
                with self.autocast():
                    out = step_fn(batch)
                loss = out["loss"]
                # no host sync on ordinary steps: losses are read (and checked for NaN) only
                # on the steps that log, checkpoint or stop
                nxt = self.step + 1
                sync = (nxt % cfg.log_every == 0 or nxt % cfg.ckpt_every == 0 or nxt == cfg.total_steps
                        or _CHECKPOINT_REQUESTED or (stop_after is not None and done_here + 1 >= stop_after))
                if sync and not torch.isfinite(loss.detach()).all():
                    raise Diverged(f"loss is {loss.item()} at step {self.step}")
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.grad_clip:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                if self.after_step is not None:
                    self.after_step(self.step, out)
                self.step += 1
                done_here += 1
                bar.update(1)
                if not sync:
                    continue
                logs = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
                last = logs
                if logger is not None and (self.step % cfg.log_every == 0 or self.step == cfg.total_steps):
                    rec = {"step": self.step, "lr": lr, "time": round(time.time() - t0, 3), **logs}
                    if is_main_process():
                        logger.log(rec)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if (self.step % cfg.ckpt_every == 0 or _CHECKPOINT_REQUESTED
                        or self.step == cfg.total_steps):
                    self.save()
                    _CHECKPOINT_REQUESTED = False
                if stop_after is not None and done_here >= stop_after:
                    self.save()
                    break
                if _STOP_REQUESTED and self.step < cfg.total_steps:
                    self.save()
                    bar.close()
                    if is_main_process():
                        print(f"stopped at step {self.step}; the same command resumes", file=sys.stderr, flush=True)
                    raise Stopped(self.step)
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            _STOP_REQUESTED = 0
        return last
