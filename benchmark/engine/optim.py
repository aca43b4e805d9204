"""Optimizers (SGD, LARS, AdamW) and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """Learning-rate schedule: linear warmup from ``warmup_factor`` x ``base_lr`` to
    ``base_lr``, then cosine (to ``min_lr``) or step decay.

    ``steps_per_epoch`` (cosine only): the cosine moves once per epoch, holding each epoch's
    lr for all its steps (mmcv ``CosineAnnealingLrUpdaterHook(by_epoch=True)``: lr of epoch e
    = min_lr + (base - min_lr)(1 + cos(pi e / E)) / 2); None: every step (SoCo/PixPro
    ``CosineAnnealingLR`` stepped per iteration)."""
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"                 # "cosine" | "multistep" | "constant"
    milestones: tuple[int, ...] = ()     # multistep: steps where lr *= gamma
    gamma: float = 0.1
    warmup_factor: float = 0.001         # detectron2's default start of warmup
    min_lr: float = 0.0                  # cosine: the lr it ends at (an absolute lr)
    steps_per_epoch: float | None = None

    def __post_init__(self):
        if self.kind not in ("cosine", "multistep", "constant"):
            raise ValueError(f"schedule.kind: unknown {self.kind!r} (cosine|multistep|constant)")
        if self.steps_per_epoch is not None and not self.steps_per_epoch > 0:
            raise ValueError(f"schedule.steps_per_epoch: expected > 0 or None, got {self.steps_per_epoch!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            a = step / max(1, self.warmup_steps)
            f = self.warmup_factor * (1 - a) + a
        else:
            f = 1.0
        if self.kind == "cosine":
            if step < self.warmup_steps:
                return self.base_lr * f
            done = step - self.warmup_steps
            if self.steps_per_epoch is not None:   # the first step of the current epoch
                done = math.floor(done / self.steps_per_epoch + 1e-9) * self.steps_per_epoch
            t = min(1.0, done / max(1, self.total_steps - self.warmup_steps))
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "multistep":
            return self.base_lr * f * self.gamma ** sum(step >= m for m in self.milestones)
        return self.base_lr * f


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by BYOL/SoCo: SGD with momentum whose update for each
    weight matrix is scaled by eta * ||w|| / (||g + wd * w|| + eps). Biases and norm
    parameters (1-d tensors) are excluded from adaptation and weight decay (BYOL Appendix C).
    ``eps``: 0 by default (the runs stored before it); SoCo's and PixPro's official LARS add
    1e-8 (``recipe.lars_eps``)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, exclude_1d: bool = True, eps: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, exclude_1d=exclude_1d, eps=eps))

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
                # official SoCo/PixPro contrast/lars.py: eta ||w|| / (||g + wd w|| + eps), eps 1e-8
                trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / (dn + g.get("eps", 0.0)),
                                    torch.ones_like(pn))
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
                    fused: bool = False, nesterov: bool = False, lars_eps: float = 0.0):
    """``fused``: one CUDA kernel for the whole SGD/AdamW step (same update, no host syncs).
    ``nesterov``: Nesterov momentum (SGD only). ``lars_eps``: LARS's trust-ratio eps."""
    if nesterov and name != "sgd":
        raise ValueError(f"recipe.nesterov: Nesterov momentum is an SGD option, not {name!r}'s")
    if lars_eps and name != "lars":
        raise ValueError(f"recipe.lars_eps: a LARS option, not {name!r}'s")
    fused = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                               **fused)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=lars_eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    raise ValueError(f"optimizer: unknown {name!r} (sgd|lars|adamw)")
