"""Optimizers (SGD, LARS, AdamW) and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
