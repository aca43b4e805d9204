"""Synchronised BatchNorm on every device: torch's ``SyncBatchNorm`` on GPUs, and on CPU
(gloo, which torch's has no kernel for) ``CpuSyncBatchNorm``, the same statistics over the
global batch: mean and biased variance for the normalisation, the unbiased variance into the
running estimate (Ioffe & Szegedy 2015; torch ``SyncBatchNorm``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from methods.dist import distributed


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


class _SyncBN(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * w + b with mean and var over the batch of every
    process. Backward: the input gradient uses the global sums of dy and dy * x_hat; the
    weight and bias gradients are this process's (DDP averages them, as with torch's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        n = _all_sum(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64))
        mean = _all_sum(x.sum(dims, dtype=torch.float64)) / n
        var = _all_sum(((x - mean.to(x.dtype).view(shape)) ** 2).sum(dims, dtype=torch.float64)) / n
        invstd = (var + eps).rsqrt()
        x_hat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        ctx.save_for_backward(x_hat, weight, invstd.to(x.dtype), n.to(x.dtype))
        ctx.dims, ctx.shape = dims, shape
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(mean, var, n)
        return x_hat * weight.view(shape) + bias.view(shape), mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        x_hat, weight, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * x_hat).sum(dims)
        g_dy, g_dy_xhat = _all_sum(sum_dy), _all_sum(sum_dy_xhat)
        dx = (weight * invstd).view(shape) * (dy - (g_dy / n).view(shape) - x_hat * (g_dy_xhat / n).view(shape))
        return dx, sum_dy_xhat, sum_dy, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch on CPU processes (gloo); a plain BatchNorm in eval mode,
    in one process, or without affine parameters or running statistics."""

    def _check_input_dim(self, input):
        if input.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {input.ndim}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed() and self.affine and self.track_running_stats):
            return super().forward(x)
        y, mean, var, n = _SyncBN.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp(min=1), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm1d/2d/3d`` of ``module`` synchronised across processes (torch's on
    GPUs, ``CpuSyncBatchNorm`` on CPU), parameters, buffers, mode and ``requires_grad`` kept."""
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        like = next(iter(module.parameters()), None)
        if like is None and module.track_running_stats:
            like = module.running_mean
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
