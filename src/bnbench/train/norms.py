"""The normalizations a variant puts after each hidden Linear, before the activation.

    bn    BatchNorm1d: per channel, over the batch (running mean and variance for evaluation)
    nobn  none: the plain MLP
    ln    LayerNorm: per sample, over the layer's channels
    gn    GroupNorm: per sample, over groups of channels (--gn-groups; Config.gn_groups_for's default)
    rms   RMSNorm: per sample, the channels scaled by their root mean square (no centring, no shift)
    brn   Batch Renormalization (Ioffe 2017, Algorithm 1): BN whose batch statistics are corrected
          towards the running ones by r, d (clipped to r_max, d_max; no gradient through them)

Each with torch's default affine parameters (scale 1, shift 0; rms: scale only) and torch's eps
(1e-5; rms: the dtype's machine epsilon, as nn.RMSNorm with eps=None). Two forms of each: one
member's module on [B, C] (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, and
BatchRenorm1d below, written from the paper: the reference engine), and the stacked form on
[n, C, B] (several members at once, each with its own parameters and statistics: StackedMLP),
proved equal to the first in float64 (tests/test_norms.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import VARIANTS

NORMS = VARIANTS  # config.py declares them (its choices for --variants)
BATCH_NORMS = ("bn", "brn")  # statistics over the batch: at least 2 samples, synchronised by --sync-bn
EPS = 1e-5  # torch's BatchNorm1d, LayerNorm, GroupNorm


@dataclass(frozen=True)
class Renorm:
    """Batch Renormalization's limits and their warm-up, in steps. Defaults: Ioffe (2017), section 4
    (Inception v3 on ImageNet): r_max = 1, d_max = 0 (plain BN) for the first 5,000 steps, then
    relaxed linearly to r_max = 3 at 40,000 steps and d_max = 5 at 25,000 steps."""

    r_max: float = 3.0
    d_max: float = 5.0
    warmup: int = 5000
    r_full: int = 40_000
    d_full: int = 25_000

    def limits(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) in force at the training step `step` (a tensor, 0-based: the step about to
        be taken), as tensors on its device: no host synchronisation, so a CUDA graph can hold it."""
        def ramp(top: float, start: float, full: int) -> torch.Tensor:
            if full <= self.warmup:  # no ramp: the full limit from step `full` on
                frac = (step >= full).to(torch.float64)
            else:
                frac = ((step.to(torch.float64) - self.warmup) / (full - self.warmup)).clamp(0.0, 1.0)
            return start + (top - start) * frac

        return ramp(self.r_max, 1.0, self.r_full), ramp(self.d_max, 0.0, self.d_full)


def batch_renorm(x: torch.Tensor, running_mean: torch.Tensor, running_std: torch.Tensor, weight, bias,
                 limits: tuple[float, float], momentum: float, eps: float, training: bool,
                 moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Ioffe (2017), Algorithm 1, on x [B, C] (per channel over the batch):
        mu_B, sigma_B = sqrt(var_B + eps)            (moments: the batch's mean and biased variance,
        r = clip(sigma_B / sigma, 1/r_max, r_max)     from other processes too with --sync-bn)
        d = clip((mu_B - mu) / sigma, -d_max, d_max)  r, d: no gradient
        x_hat = (x - mu_B) / sigma_B * r + d;  y = weight * x_hat + bias
        mu += momentum (mu_B - mu);  sigma += momentum (sigma_B - sigma)   (after r, d)
    In evaluation: y = weight * (x - mu) / sigma + bias."""
    if training:
        var_b, mean_b = moments if moments is not None else torch.var_mean(x, dim=0, correction=0)
        std_b = torch.sqrt(var_b + eps)
        r_max, d_max = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in limits)
        with torch.no_grad():
            r = torch.clamp(std_b / running_std, min=1.0 / r_max, max=r_max)
            d = torch.clamp((mean_b - running_mean) / running_std, min=-d_max, max=d_max)
            running_mean.add_(momentum * (mean_b - running_mean))
            running_std.add_(momentum * (std_b - running_std))
        x_hat = (x - mean_b) / std_b * r + d
    else:
        x_hat = (x - running_mean) / running_std
    return x_hat * weight + bias if weight is not None else x_hat


class BatchRenorm1d(nn.Module):
    """One member's Batch Renormalization on [B, C], as the paper writes it (the reference engine's)."""

    def __init__(self, num_features: int, renorm: Renorm = Renorm(), eps: float = EPS, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_features, self.renorm, self.eps, self.momentum = num_features, renorm, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_std", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.process_group = None  # set for --sync-bn: the batch's moments over the data-parallel group
        self.sync = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = None
        if self.training:
            limits = self.renorm.limits(self.num_batches_tracked)
            self.num_batches_tracked.add_(1)
            if self.sync:
                from ..dist.groups import global_moments

                moments = global_moments(x, self.running_mean, self.process_group)[:2]
        else:
            limits = (1.0, 0.0)
        return batch_renorm(x, self.running_mean, self.running_std, self.weight, self.bias, limits, self.momentum,
                            self.eps, self.training, moments)


def norm_module(kind: str, channels: int, dtype, gn_groups: int, renorm: Renorm) -> nn.Module | None:
    """One member's normalization module for a hidden layer of `channels` units (None for nobn)."""
    if kind == "bn":
        return nn.BatchNorm1d(channels, momentum=0.1, eps=EPS, dtype=dtype)
    if kind == "ln":
        return nn.LayerNorm(channels, eps=EPS, dtype=dtype)
    if kind == "gn":
        return nn.GroupNorm(gn_groups, channels, eps=EPS, dtype=dtype)
    if kind == "rms":
        return nn.RMSNorm(channels, eps=None, dtype=dtype)
    if kind == "brn":
        return BatchRenorm1d(channels, renorm, dtype=dtype)
    return None


# -- stacked: h [n, C, B], n members of one kind, each its own scale and shift [n, C, 1] -----------
def layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)
    return (h - mean) * torch.rsqrt(var + eps) * weight + bias


def group_norm(h: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    n, c, b = h.shape
    g = h.reshape(n, groups, c // groups, b)
    var, mean = torch.var_mean(g, dim=2, keepdim=True, correction=0)
    return ((g - mean) * torch.rsqrt(var + eps)).reshape(n, c, b) * weight + bias


def rms_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(h.dtype).eps  # nn.RMSNorm(eps=None)
    return h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + eps) * weight
