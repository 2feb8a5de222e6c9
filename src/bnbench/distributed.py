"""Distributed: N processes, one run. The launch checks, the accelerator, cross-process BN.

    ./launch.sh --nproc 2 --cpu --epochs 1                       # 2 CPU processes, DDP over gloo
    accelerate launch --multi_gpu --num_processes 4 -m bnbench run --sync-bn   # 4 GPUs, NCCL
    torchrun --nproc_per_node 2 -m bnbench run                   # launching yourself works too

Semantics (the same at any world size W):
  --batch-size B is the global batch; rank r trains every member on its slice
  [r*B/W, (r+1)*B/W) of each global batch, and DDP averages the gradients, so a
  no-BN member follows the one-process trajectory up to summation order.
  BN without --sync-bn normalises each slice by its own statistics (what plain
  DDP does); the running statistics evaluated are rank 0's. With --sync-bn the
  statistics are those of the global batch, on every rank.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError
from .launch import LaunchError, launched_rank, launched_world


def make_accelerator(cpu: bool = False, timeout_s: float = 600.0):
    """The Accelerator of a run.

    Without a visible GPU, cpu=True is forced: otherwise a torchrun/accelerate
    launch of N processes gives N lone processes (DistributedType.NO) that each
    train on all the data. The timeout bounds process-group set-up and every
    collective, so a lost rank ends the run instead of hanging it.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = cpu or not torch.cuda.is_available()
    handlers = [
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s)),
        # BN buffers are made consistent where it matters (before evaluation), not every step.
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    try:
        return Accelerator(cpu=cpu, kwargs_handlers=handlers)
    except dist.DistError as e:  # DistStoreError: not every rank arrived in time
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise LaunchError(
            f"process-group set-up failed after at most {timeout_s:g} s at {where} "
            f"(rank {launched_rank()} of {launched_world()}): {e}. Were all ranks started, "
            "with the same --main_process_ip/--main_process_port?"
        ) from None


def check_world(accelerator) -> int:
    """The number of processes, after refusing launches bnbench would run incorrectly."""
    from accelerate.utils import DistributedType

    world_size = accelerator.num_processes
    launched = launched_world()
    if launched != world_size:
        # N launched processes that each think they are alone would each train on all the data.
        raise ConfigError(
            f"the launcher started {launched} processes but Accelerate sees {world_size}: "
            "each would train alone on all the data. On CPUs use Accelerator(cpu=True) or "
            "ACCELERATE_USE_CPU=true (bnbench's own launches do)."
        )
    ok = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}
    if accelerator.distributed_type not in ok:
        raise ConfigError(
            f"bnbench trains with DDP; Accelerate is configured for {accelerator.distributed_type.value}. "
            "Run `accelerate config` for multi-GPU/multi-CPU DDP, or launch with --multi_gpu."
        )
    return world_size


def backend_name() -> str:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def active_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# -- cross-process batch norm --------------------------------------------------------
def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode BN of x [b, C] with the statistics of every process's x together.

    Each rank takes its slice's mean and (biased) variance with one torch.var_mean,
    then ONE differentiable all-reduce of (n, n*(m - s), n*(v + (m - s)^2)) combines
    them (Chan's parallel variance, about the running mean s, identical on every rank:
    no catastrophic cancellation once s tracks the mean). Its backward all-reduces the
    gradients, so with DDP's gradient averaging every parameter gets the gradient of
    the global-batch loss. Works on gloo and NCCL, CPU and GPU (torch.nn.SyncBatchNorm
    needs a GPU). Updates the running statistics like F.batch_norm (unbiased variance).
    """
    import torch.distributed._functional_collectives as funcol  # differentiable all_reduce

    c = x.shape[1]
    shift = running_mean.detach().clone()
    v, m = torch.var_mean(x, dim=0, correction=0)
    n_local = x.shape[0]
    dm = m - shift
    count = torch.full((1,), n_local, dtype=x.dtype, device=x.device)
    stats = torch.cat([n_local * dm, n_local * (v + dm * dm), count])
    if dist.get_world_size() > 1:  # a group of one (torchrun --nproc_per_node 1) has nobody to ask
        stats = funcol.wait_tensor(funcol.all_reduce(stats, "sum", dist.group.WORLD))
    n = stats[2 * c]
    m1 = stats[:c] / n
    var = (stats[c : 2 * c] / n - m1 * m1).clamp_min(0)
    mean = shift + m1
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
        return torch.addcmul(bias, x - mean, scale)  # [C]-sized work first, two passes over x
    return (x - mean) * scale


class CrossProcessBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics span all processes (gloo or NCCL, CPU or GPU).

    Same parameters, buffers and state_dict keys as BatchNorm1d; evaluation and
    one-process training are BatchNorm1d's own code.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.momentum, self.eps)


def convert_sync_bn(model: nn.Module, backend: str) -> nn.Module:
    """Every BatchNorm1d of model made cross-process: torch's SyncBatchNorm on NCCL, ours elsewhere."""
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            new = CrossProcessBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                device=child.running_mean.device, dtype=child.running_mean.dtype,
            )
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_bn(child, backend)
    return model


# -- consistency and exact reductions ------------------------------------------------
def broadcast_buffers(modules: list[nn.Module]) -> None:
    """Rank 0's buffers (BN running statistics) to every rank, so all ranks evaluate one model."""
    if active_world() == 1:
        return
    for m in modules:
        for buf in m.buffers():
            dist.broadcast(buf, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); integer counts stay exact."""
    if active_world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous share of n items: shares are disjoint, cover all n, differ in size by <= 1."""
    return slice(n * rank // world, n * (rank + 1) // world)

