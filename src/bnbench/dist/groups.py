"""Distributed: N processes, one run. The launch checks, the accelerator, the mesh, cross-process BN.

    ./launch.sh --nproc 8 --cpu --epochs 1                       # 8 CPU processes: 8 seed groups
    ./launch.sh --nproc 2 --cpu --dp 2 --sync-bn                 # one DDP group of 2 over gloo
    accelerate launch --multi_gpu --num_processes 4 -m bnbench run --dp 2 --sync-bn   # 2 x 2 on GPUs
    torchrun --nproc_per_node 2 -m bnbench run                   # launching yourself works too

The W processes form a mesh of seed groups x data-parallel groups (layout.py). Inside a
data-parallel group of dp processes (the same at any dp):
  --batch-size B is the group's global batch; its process p trains each of the group's
  members on the slice [p*B/dp, (p+1)*B/dp) of each global batch, and DDP averages the
  gradients over the group, so a no-BN member follows the one-process trajectory up to
  summation order. BN without --sync-bn normalises each slice by its own statistics
  (what plain DDP does); the running statistics evaluated are those of the group's first
  process. With --sync-bn the statistics are those of the group's global batch.
Seed groups never communicate while they train; their rows meet at rank 0 after each window.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from .launch import LAUNCH_ENV, LaunchError, launched_rank, launched_world
from .layout import Layout


def make_accelerator(cpu: bool = False, timeout_s: float = 600.0, log_with=None, project_dir=None):
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
        return Accelerator(cpu=cpu, kwargs_handlers=handlers, log_with=log_with or None,
                           project_dir=str(project_dir) if project_dir else None)
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
    same_launch(world_size)
    return world_size


def same_launch(world_size: int) -> None:
    """Every machine was started with rank 0's --nproc and --num_machines (./launch.sh puts them in LAUNCH_ENV).
    Torch's launcher accepts machines of different sizes and a world none of them asked for (--nproc 1 and 2:
    3 processes), and each machine's launcher printed a layout that is not the run's. Before any layout is
    chosen: a layout's own refusal would name the wrong problem."""
    if world_size == 1 or not dist.is_initialized():
        return
    every = [None] * world_size
    dist.all_gather_object(every, os.environ.get(LAUNCH_ENV))  # every rank, set or not: all take part
    differ = [r for r, x in enumerate(every) if x != every[0]]
    if differ:
        _all_know()

        def how(x):
            return x or "another launcher than ./launch.sh"

        raise ConfigError(f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} started with "
                          f"{how(every[differ[0]])}, rank 0 with {how(every[0])}: start every machine with the same "
                          "--nproc and --num_machines")


@dataclass
class Mesh:
    """This process's place in a layout, and the process group its collectives use."""

    layout: Layout
    rank: int
    # The data-parallel group's ProcessGroup; None when there is nobody to talk to (no process
    # group at all, or a seed group of one process among several).
    group: object = None

    @property
    def seed_group(self) -> int:
        return self.layout.group_of_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def members(self) -> slice:
        return self.layout.share(self.seed_group)

    @property
    def leads(self) -> bool:
        """First process of its data-parallel group: its rows speak for the group."""
        return self.dp_rank == 0


_GROUPS: dict[tuple[int, int], object] = {}  # (world, dp) -> this rank's group: made once per process


def make_mesh(layout: Layout, rank: int) -> Mesh:
    """The mesh of a launch. Every rank calls it with the same layout (new_group is collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Mesh(layout, 0)
    if dist.get_world_size() != layout.world:
        raise LaunchError(f"a layout of {layout.world} processes in a process group of {dist.get_world_size()}")
    if layout.dp == layout.world:
        # One data-parallel group: the world (also a process group of one, as bench/ sets up).
        return Mesh(layout, rank, dist.group.WORLD)
    if layout.dp == 1:
        return Mesh(layout, rank)  # seed groups of one process: each holds its whole batch
    key = (layout.world, layout.dp)
    if key not in _GROUPS:
        for g in range(layout.seed_groups):  # every rank creates every group, in the same order
            ranks = list(range(g * layout.dp, (g + 1) * layout.dp))
            group = dist.new_group(ranks)
            if rank in ranks:
                _GROUPS[key] = group
    return Mesh(layout, rank, _GROUPS[key])


def same_settings(settings: dict, mesh: Mesh) -> None:
    """Every rank runs what rank 0 runs. Machines started with other options (a typo on one of them)
    stop here, right after set-up and before anything is written, with one line naming the difference
    (otherwise rank 0 finished and hung while the other died with gloo's `Connection closed by peer`).
    A ConfigError (exit status 2): the settings are refused, as the launcher refuses what it can check."""
    if mesh.layout.world == 1 or not dist.is_initialized():
        return
    every = [None] * mesh.layout.world
    dist.all_gather_object(every, settings)
    first = every[0]
    differ = {r: [k for k in sorted(set(s) | set(first)) if s.get(k) != first.get(k)] for r, s in enumerate(every)}
    differ = {r: keys for r, keys in differ.items() if keys}
    if differ:
        _all_know()
        r, keys = next(iter(differ.items()))
        what = ", ".join(f"{k} = {every[r].get(k)!r} (rank 0: {first.get(k)!r})" for k in keys[:4])
        raise ConfigError(f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} started with other "
                          f"settings than rank 0: rank {r}: {what}. Start every machine with the same options.")


def _all_know() -> None:
    """Every rank refuses together: none leaves before all have the comparison (one that left early made
    a slower one fail with gloo's `Connection closed by peer` instead of naming the difference)."""
    try:
        dist.barrier()
    except RuntimeError:  # a peer gone after it compared: the refusal stands
        pass


def from_first(obj, mesh: Mesh):
    """Rank 0's obj on every rank (the run id that every row carries, whichever group wrote it)."""
    if mesh.layout.world == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_first(obj, mesh: Mesh) -> list | None:
    """Rank 0: the objects of every group's first process, in group order; other ranks: None.
    A launch of one seed group needs no gather: every process already holds the group's rows."""
    if mesh.layout.seed_groups == 1:
        return [obj]
    got = [None] * mesh.layout.world if mesh.rank == 0 else None
    dist.gather_object(obj if mesh.leads else None, got, dst=0)
    return None if got is None else [got[g * mesh.layout.dp] for g in range(mesh.layout.seed_groups)]


def backend_name() -> str:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


# -- cross-process batch norm --------------------------------------------------------
def global_moments(x: torch.Tensor, shift_from: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(biased variance [C], mean [C], samples) of x [b, C] over every process's x in `group`
    (default: the world), differentiable. Each rank takes its slice's mean and variance with one
    torch.var_mean, then ONE differentiable all-reduce of (n, n*(m - s), n*(v + (m - s)^2)) combines
    them (Chan's parallel variance about s = shift_from, identical on every rank: no catastrophic
    cancellation once s tracks the mean, as a running mean does)."""
    import torch.distributed._functional_collectives as funcol  # differentiable all_reduce

    c = x.shape[1]
    shift = shift_from.detach().clone()
    v, m = torch.var_mean(x, dim=0, correction=0)
    n_local = x.shape[0]
    dm = m - shift
    count = torch.full((1,), n_local, dtype=x.dtype, device=x.device)
    stats = torch.cat([n_local * dm, n_local * (v + dm * dm), count])
    group = group or dist.group.WORLD
    if dist.get_world_size(group) > 1:  # a group of one (torchrun --nproc_per_node 1) has nobody to ask
        stats = funcol.wait_tensor(funcol.all_reduce(stats, "sum", group))
    n = stats[2 * c]
    m1 = stats[:c] / n
    var = (stats[c : 2 * c] / n - m1 * m1).clamp_min(0)
    return var, shift + m1, n


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    group=None,
) -> torch.Tensor:
    """Training-mode BN of x [b, C] with the statistics of every process's x in `group`
    (default: the world) together.

    Each rank takes its slice's mean and (biased) variance with one torch.var_mean,
    then ONE differentiable all-reduce of (n, n*(m - s), n*(v + (m - s)^2)) combines
    them (Chan's parallel variance, about the running mean s, identical on every rank:
    no catastrophic cancellation once s tracks the mean). Its backward all-reduces the
    gradients, so with DDP's gradient averaging every parameter gets the gradient of
    the global-batch loss. Works on gloo and NCCL, CPU and GPU (torch.nn.SyncBatchNorm
    needs a GPU). Updates the running statistics like F.batch_norm (unbiased variance).
    """
    var, mean, n = global_moments(x, running_mean, group)
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

    process_group = None  # set by convert_sync_bn; None: the world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.momentum, self.eps,
                               self.process_group)


def convert_sync_bn(model: nn.Module, backend: str, group=None) -> nn.Module:
    """Every BatchNorm1d of model made cross-process over `group` (default the world): torch's
    SyncBatchNorm on NCCL or for a module on a GPU (it runs on CUDA tensors only, over gloo too),
    ours on the CPU."""
    if backend == "nccl" or any(p.is_cuda for p in model.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            new = CrossProcessBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                device=child.running_mean.device, dtype=child.running_mean.dtype,
            )
            new.load_state_dict(child.state_dict())
            new.process_group = group
            setattr(model, name, new)
        else:
            convert_sync_bn(child, backend, group)
    return model


# -- consistency and exact reductions ------------------------------------------------
def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def broadcast_buffers(modules: list[nn.Module], group=None) -> None:
    """The group's first process's buffers (BN running statistics) to the group, so that its
    processes evaluate one model."""
    if _size(group) == 1:
        return
    for m in modules:
        for buf in m.buffers():
            dist.broadcast(buf, group=group, group_src=0)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the group's processes (in place, returned); integer counts stay exact."""
    if _size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def shard(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous share of n items: shares are disjoint, cover all n, differ in size by <= 1."""
    return slice(n * rank // world, n * (rank + 1) // world)

