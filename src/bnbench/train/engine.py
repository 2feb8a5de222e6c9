"""Engine: train every member of a config, evaluate exactly, emit one row per member per epoch.

    bnbench run                      # the lab: 5 seeds x {bn, nobn}, 15 epochs, MNIST
    bnbench run --engine reference   # one nn.Sequential per member, stepped like the lab

Engines
  stacked    all members in one StackedMLP (one per variant with --bn-drop-bias or
             --instrument): a first-layer GEMM per seed for its BN and no-BN members,
             one baddbmm per later layer, one F.batch_norm per BN layer; one backward
             and one fused Adam (elementwise, so = one Adam per member). How the backward
             and the update are computed is step.py's choice (--step-impl).
  reference  one torch.nn.Sequential + optimizer per member, the lab's loop.
Both see the same batches: per seed and epoch one permutation, shared by the
bn and nobn members of that seed, drop_last like the lab.

A Trainer is built in two steps: plan_stacks (pure: which members go into which stack, and
which rows of a step's batch each reads) and construction (modules, optimizers, wrappers).
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..dist.groups import (
    Mesh,
    all_reduce_sum,
    backend_name,
    broadcast_buffers,
    convert_sync_bn,
    make_mesh,
    shard,
)
from ..dist.layout import Layout
from . import step as seam
from .data import Splits
from .models import StackedMLP, init_linears, reference_mlp
from .norms import BATCH_NORMS, BatchRenorm1d, Renorm
from .optim import make_optimizer


def shuffle_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (member seed, epoch), independent of the init stream."""
    h = hashlib.sha256(f"bnbench-shuffle:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which members of `seed` see the n training samples in `epoch` (CPU, int64)."""
    g = torch.Generator().manual_seed(shuffle_seed(seed, epoch))
    return torch.randperm(n, generator=g)


# -- planning: which members go into which stack (no tensors) --------------------------------------
@dataclass(frozen=True)
class StackSpec:
    """One stack as planned."""

    variant: str  # its variant, or e.g. "bn,nobn" when it holds several variants of each of its seeds
    members: slice  # positions in Trainer.members (contiguous by construction)
    rows: slice  # its seeds' rows of a step's batch (Trainer.batch_at)
    seeds: tuple[int, ...]  # the seeds of its members, in its order
    variants: tuple[str, ...]  # the variants it holds (train/norms.py), in its order
    stacked: bool  # one StackedMLP; else one member's nn.Sequential (the reference engine)


def plan_stacks(cfg: Config, members: list[tuple[str, int]]) -> tuple[list[int], list[StackSpec]]:
    """(the seeds whose batches a step draws, in row order; the stacks) for one process's members
    (variant, seed), in the run's order. Every variant of one process shares a seed list when it
    can (one batch for every variant of a seed, as the lab's bn and nobn), and then consecutive
    variants go into ONE StackedMLP (one first-layer GEMM per seed for all of them), bn and nobn
    apart from the other normalizations, so that they keep the hand-written step (step.py). Not
    with drop_bias (the variants' layers differ) nor with instruments (they measure a stack of one
    variant): one stack per variant then."""
    by_variant = {v: [s for w, s in members if w == v] for v in cfg.variants}
    lists = [x for x in by_variant.values() if x]
    shared = all(x == lists[0] for x in lists)
    batch_seeds = lists[0] if shared else [s for x in lists for s in x]
    stacked = cfg.engine == "stacked"
    if stacked and shared and not cfg.bn_drop_bias and not cfg.instrument:
        present = [v for v in by_variant if by_variant[v]]
        runs: list[list[str]] = []
        for v in present:  # consecutive variants of one kind: bn/nobn, or the others
            if runs and (v in ("bn", "nobn")) == (runs[-1][0] in ("bn", "nobn")):
                runs[-1].append(v)
            else:
                runs.append([v])
        specs = []
        for run in runs:
            start = members.index((run[0], batch_seeds[0]))
            specs.append(StackSpec(",".join(run), slice(start, start + len(run) * len(batch_seeds)),
                                   slice(0, len(batch_seeds)), tuple(batch_seeds), tuple(run), True))
        return batch_seeds, specs
    specs, row = [], 0
    for v, seeds in by_variant.items():
        if not seeds:
            continue
        base = members.index((v, seeds[0]))
        if stacked:
            specs.append(StackSpec(v, slice(base, base + len(seeds)), slice(row, row + len(seeds)), tuple(seeds),
                                   (v,), True))
        else:
            specs += [StackSpec(v, slice(base + j, base + j + 1), slice(row + j, row + j + 1), (s,), (v,), False)
                      for j, s in enumerate(seeds)]
        if not shared:
            row += len(seeds)
    return batch_seeds, specs


# -- what a Trainer holds ---------------------------------------------------------------------------
@dataclass
class Stack:
    """What one module computes: a StackedMLP of its members, or one member's Sequential."""

    spec: StackSpec
    net: nn.Module  # the bare module: evaluation, state, buffers
    losses_module: seam.Losses  # (x, labels) -> [members] losses; its .through(...) for other weights
    model: nn.Module  # what training calls: losses_module, DDP-wrapped when its data-parallel group has several processes
    losses: Callable  # (model, xb, yb) -> [members] losses; torch.compile'd with --compile
    optimizer: torch.optim.Optimizer

    @property
    def variant(self) -> str:
        return self.spec.variant

    @property
    def members(self) -> slice:
        return self.spec.members

    @property
    def rows(self) -> slice:
        return self.spec.rows

    @property
    def step_impl(self) -> str:
        return self.losses_module.step_impl


@dataclass
class OptimizerGroup:
    """One optimizer and the stacks it steps: one backward and one update per training step."""

    optimizer: torch.optim.Optimizer
    zero_grad: Callable[[], None]
    update: Callable[[], None]  # step.update_of: the optimizer's step, or Adam's kernel called directly
    stacks: list[Stack] = field(default_factory=list)


class Trainer:
    """Holds one process's members of a config on one device and moves them through epochs. Its
    members are its seed group's share (all of them in one process)."""

    def __init__(self, cfg: Config, splits: Splits, accelerator, mesh: Mesh | None = None):
        self.cfg, self.splits, self.accelerator = cfg, splits, accelerator
        self.device = accelerator.device
        self.dtype = getattr(torch, cfg.dtype)
        all_members = [(v, s) for v in cfg.variants for s in cfg.seeds]
        self.mesh = mesh or make_mesh(Layout(1, 1, len(all_members)), 0)  # one process (in a group of one, if any)
        layout, self.dp_group = self.mesh.layout, self.mesh.group
        self.world_size, self.dp, self.rank = layout.world, layout.dp, self.mesh.dp_rank
        self.batch = cfg.global_batch(self.dp)  # global: every member, every step, over the data-parallel group
        self.local_batch = self.batch // self.dp  # this process's slice of it
        self._check(splits)
        # Any data-parallel process group (even of one process, as in bench/) runs the cross-process
        # path; a seed group of one process among several holds its whole batch: plain BN is sync BN.
        self.sync_bn = cfg.sync_bn and self.dp_group is not None
        self.backend = backend_name()
        self.members = all_members[self.mesh.members]  # this seed group's share, in the run's order
        self.batch_seeds, specs = plan_stacks(cfg, self.members)
        nets = [self._build(spec) for spec in specs]
        self.optimizer_groups = self._optimizer_groups(nets)
        for group, members in zip(self.optimizer_groups, self._grouping(nets)):
            group.stacks += [self._make_stack(specs[i], nets[i], group.optimizer) for i in members]
            # The direct Adam call only where a stack's self-check verified it (it steps the call against
            # Adam.step): a failed check, or a group of autograd stacks alone, takes the optimizer's own step.
            verified = any(u.step_impl == "fused" for u in group.stacks)
            group.update = seam.update_of(self.cfg, group.optimizer, verified)
        self.stacks: list[Stack] = [u for g in self.optimizer_groups for u in g.stacks]
        self.steps_done = 0
        self.instruments = None
        if cfg.instrument:
            from .instruments import Instruments

            self.instruments = Instruments(cfg, self.members, splits.test_x, sync=self._sync)
        self.diverged = torch.zeros(len(self.members), dtype=torch.bool)

    def _check(self, splits: Splits) -> None:
        cfg, n = self.cfg, splits.train_x.shape[0]
        if self.batch > n:
            raise ConfigError(f"global batch {self.batch} exceeds the {n} training samples")
        # With sync BN the statistics span the global batch; without, each process's slice.
        bn_batch = self.batch if cfg.sync_bn else self.local_batch
        if set(cfg.variants) & set(BATCH_NORMS) and bn_batch < 2:
            raise ConfigError(f"BatchNorm needs at least 2 samples per batch; it would see {bn_batch}")
        if cfg.instrument and self.world_size > 1:
            # Its extra forwards and backwards would have to run in lock-step on every rank.
            raise ConfigError(f"--instrument measures in one process; this launch has {self.world_size}. "
                              "Launch it without --nproc / several processes.")

    def _build(self, spec: StackSpec, alone: bool = False) -> nn.Module:
        """The module of a planned stack, on the device (fused optimizers want their parameters placed first).
        alone: without sync BN or a process group, whatever the run's (cost.py times one process's compute:
        a loop bounded by its own clock must not enter a collective the other processes may not)."""
        cfg = self.cfg
        sync_bn, group = (False, None) if alone else (self.sync_bn, self.dp_group)
        inits = [[(w.to(self.dtype), b.to(self.dtype)) for w, b in init_linears(s, cfg.layer_sizes)] for s in spec.seeds]
        norm_kw = dict(gn_groups=cfg.gn_groups_for(),
                       renorm=Renorm(cfg.brn_r_max, cfg.brn_d_max, cfg.brn_warmup, cfg.brn_r_full, cfg.brn_d_full))
        if spec.stacked:
            net = StackedMLP(inits, spec.variants, activation=cfg.activation, sync_bn=sync_bn,
                             drop_bias=cfg.bn_drop_bias, process_group=group, **norm_kw)
        else:
            (norm,) = spec.variants
            net = reference_mlp(inits[0], norm, activation=cfg.activation, drop_bias=cfg.bn_drop_bias,
                                **norm_kw).to(self.device)
            if sync_bn and norm == "bn":
                net = convert_sync_bn(net, self.backend, group)
            if sync_bn and norm == "brn":
                for m in net.modules():
                    if isinstance(m, BatchRenorm1d):
                        m.sync, m.process_group = True, group
        return net.to(self.device)

    def _grouping(self, nets: list[nn.Module]) -> list[list[int]]:
        """Which nets each optimizer steps: the stacked engine ONE optimizer for every stack (Adam and
        SGD are elementwise, so that is the update of one optimizer per stack, in one fused call and
        one autograd pass per step); the reference engine one per net (the lab's, one per member)."""
        return [list(range(len(nets)))] if self.cfg.engine == "stacked" else [[i] for i in range(len(nets))]

    def _optimizer_groups(self, nets: list[nn.Module]) -> list[OptimizerGroup]:
        groups = []
        for members in self._grouping(nets):
            opt = make_optimizer(self.cfg, [p for i in members for p in nets[i].parameters()],
                                 fused=self.cfg.engine == "stacked")
            if self.mesh.layout.seed_groups == 1:  # Accelerate's optimizer over the world's models (as prepare(net, opt))
                opt = self.accelerator.prepare(opt)
            # update: set once its stacks are made, from their self-checks (__init__)
            groups.append(OptimizerGroup(opt, seam.zero_grad_of(opt), seam.update_of(self.cfg, opt, verified=False)))
        return groups

    def _make_stack(self, spec: StackSpec, net: nn.Module, opt: torch.optim.Optimizer) -> Stack:
        losses_module = seam.Losses(net, seam.hand_written(self.cfg, net, self.sync_bn))
        with warnings.catch_warnings():
            # DDP's broadcast_buffers=False, which torch now calls deprecated in favour of
            # forward_sync_buffers; both skip the per-step buffer broadcast we avoid.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            if self.mesh.layout.seed_groups == 1:
                model = self.accelerator.prepare(losses_module)  # Accelerate's DDP over the world (none alone)
            elif self.dp > 1:
                # Accelerate's DDP spans the world and cannot take a subgroup: a data-parallel
                # group of a mesh is wrapped here, as Accelerate would wrap the world.
                ids = [self.device.index] if self.device.type == "cuda" else None
                model = nn.parallel.DistributedDataParallel(losses_module, device_ids=ids,
                                                            process_group=self.dp_group, broadcast_buffers=False)
            else:
                model = losses_module  # a seed group of one process has no gradients to average
        losses = torch.compile(seam.call) if self.cfg.compile else seam.call
        return Stack(spec, net, losses_module, model, losses, opt)

    def warm_up(self) -> float:
        """With --compile: compile every stack's forward and backward on the first batch, then
        restore every parameter and buffer, so that training is unchanged. Returns the seconds
        spent (reported apart from training). Without --compile: 0.0, nothing done."""
        if not self.cfg.compile:
            return 0.0
        self._sync()
        t0 = time.perf_counter()
        xb, yb = self.batch_at(self.epoch_order(1), 0)
        for u in self.stacks:
            saved = {k: v.detach().clone() for k, v in u.net.state_dict().items()}
            u.model.train()
            self.accelerator.backward(u.losses(u.model, xb[u.rows], yb[u.rows]).sum())
            u.optimizer.zero_grad(set_to_none=True)
            u.net.load_state_dict(saved)
        self._sync()
        return time.perf_counter() - t0

    # -- training -----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.splits.train_x.shape[0] // self.batch  # drop_last, as the lab

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """[S, N] permutations, one per seed of self.batch_seeds, on the device."""
        n = self.splits.train_x.shape[0]
        return torch.stack([epoch_permutation(s, epoch, n) for s in self.batch_seeds]).to(self.device)

    def local_indices(self, order: torch.Tensor, t: int) -> torch.Tensor:
        """[S, b]: the samples this rank trains on in step t, its slice of the global batch."""
        start = t * self.batch + self.rank * self.local_batch
        return order[:, start : start + self.local_batch]

    def batch_at(self, order: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step t's inputs [S, b, 784] and labels [S, b] for every seed: one index_select each."""
        idx = self.local_indices(order, t).reshape(-1)
        s = len(self.batch_seeds)
        # index_select is ~3x faster than x[idx] on the CPU.
        xb = self.splits.train_x.index_select(0, idx).view(s, self.local_batch, -1)
        yb = self.splits.train_y.index_select(0, idx).view(s, self.local_batch)
        return xb, yb

    def step(self, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One optimizer step of every member; adds each member's batch loss to loss_sum (on the device).
        One backward and one update per optimizer (the stacked engine has one for all its stacks)."""
        probe = self.instruments
        for group in self.optimizer_groups:
            group.zero_grad()
            stacks = group.stacks
            losses = [u.losses(u.model, xb[u.rows], yb[u.rows]) for u in stacks]  # views of the batch
            total = losses[0].sum()
            for more in losses[1:]:
                total = total + more.sum()
            # Summing member losses keeps each member's gradient its own.
            self.accelerator.backward(total)
            if probe is not None:
                for u in stacks:
                    probe.before_step(u, xb[u.rows], yb[u.rows], self.steps_done)
            group.update()
            for u, lost in zip(stacks, losses):
                if probe is not None:
                    probe.after_step(u, xb[u.rows], yb[u.rows], self.steps_done)
                loss_sum[u.members] += lost.detach()

    def train_steps(self, stop: int, on_step=None) -> tuple[torch.Tensor, float]:
        """Step every member from step self.steps_done up to `stop` (a window of an epoch or
        across epochs). Returns (mean mini-batch loss per member over the window, seconds).

        Global step g is step g % S of epoch g // S + 1 (S steps per epoch). Every rank draws
        the same permutation; rank r takes [r*b, (r+1)*b) of each global batch of B = W*b
        samples, so ranks see disjoint slices that together are exactly the one-process batch.
        Instruments' time is taken out of the seconds.
        """
        start, per_epoch = self.steps_done, self.steps_per_epoch()
        # Accumulated on the device: no host synchronisation inside the step loop.
        loss_sum = torch.zeros(len(self.members), dtype=torch.float64, device=self.device)
        for u in self.stacks:
            u.model.train()
        measured = self.instruments.seconds if self.instruments else 0.0
        self._sync()
        t0 = time.perf_counter()
        order_of = (None, None)
        for g in range(start, stop):
            epoch, t = g // per_epoch + 1, g % per_epoch
            if order_of[0] != epoch:  # shuffling is part of an epoch's cost, as in a DataLoader
                order_of = (epoch, self.epoch_order(epoch))
            self.step(*self.batch_at(order_of[1], t), loss_sum)
            self.steps_done = g + 1
            if on_step is not None:
                on_step(g + 1 - start)
        # Equal slices: the mean of the group's slice losses is the global-batch loss.
        all_reduce_sum(loss_sum, self.dp_group)
        if not self.sync_bn:
            # Each process's BN running statistics followed its own slice: from here on, all hold the first's.
            broadcast_buffers([u.net for u in self.stacks], self.dp_group)
        self._sync()
        seconds = time.perf_counter() - t0 - ((self.instruments.seconds - measured) if self.instruments else 0.0)
        return (loss_sum / ((stop - start) * self.dp)).cpu(), seconds

    def train_epoch(self, epoch: int, on_step=None) -> tuple[torch.Tensor, float]:
        """Epoch `epoch` for every member (the next one): train_steps to its last step."""
        per_epoch = self.steps_per_epoch()
        if self.steps_done != (epoch - 1) * per_epoch:
            raise ValueError(f"epoch {epoch} starts at step {(epoch - 1) * per_epoch}; {self.steps_done} steps are done")
        return self.train_steps(epoch * per_epoch, on_step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Eval mode over every sample of (x, y), each scored exactly once over the data-parallel
        group (contiguous shares, no padding): per member the mean loss (float64), the number
        correct (int64), and the number of samples scored. Every process of the group returns the same."""
        m = len(self.members)
        loss_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
        correct = torch.zeros(m, dtype=torch.int64, device=self.device)
        for u in self.stacks:
            u.net.eval()
        mine = shard(x.shape[0], self.rank, self.dp)
        for start in range(mine.start, mine.stop, self.cfg.eval_batch):
            stop = min(start + self.cfg.eval_batch, mine.stop)
            xc, yc = x[start:stop], y[start:stop]
            for u in self.stacks:
                logits = u.net(xc)
                if logits.dim() == 2:
                    logits = logits.unsqueeze(0)
                k, n, _ = logits.shape
                by_class = logits.transpose(1, 2)  # [k, 10, n]: contiguous for the stacked engine
                per_sample = F.cross_entropy(by_class, yc.expand(k, n), reduction="none")  # [k, n]
                loss_sum[u.members] += per_sample.sum(1, dtype=torch.float64)
                # max(1).indices is argmax(1) (the first maximal class, NaN counting as maximal), in a
                # kernel that reads the strided class axis 6x faster: 5 vs 30 ms per 10,000 x 10 members.
                correct[u.members] += (by_class.max(1).indices == yc).sum(1)
        all_reduce_sum(loss_sum, self.dp_group)
        all_reduce_sum(correct, self.dp_group)
        total = x.shape[0]
        return (loss_sum / total).cpu(), correct.cpu(), total

    # -- member access (tests, checkpoints) ---------------------------------------
    def _stack(self, variant: str, seed: int) -> tuple[Stack, int]:
        i = self.members.index((variant, seed))
        for u in self.stacks:
            if u.members.start <= i < u.members.stop:
                return u, i - u.members.start
        raise KeyError((variant, seed))

    def step_impl(self, variant: str, seed: int) -> str:
        """How the member's training step is computed (step.py): fused (hand-written) / autograd."""
        return self._stack(variant, seed)[0].step_impl

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]:
        """The member's weights and BN buffers under nn.Sequential's keys, whatever the engine."""
        u, k = self._stack(variant, seed)
        if isinstance(u.net, StackedMLP):
            return u.net.member_state_dict(k)
        return {key: v.detach().clone() for key, v in u.net.state_dict().items()}

    def load_member_state(self, variant: str, seed: int, state: dict[str, torch.Tensor]) -> None:
        u, k = self._stack(variant, seed)
        if isinstance(u.net, StackedMLP):
            u.net.load_member_state_dict(k, state)
        else:
            u.net.load_state_dict(state)

    def mark_diverged(self, *values: torch.Tensor) -> None:
        bad = torch.zeros_like(self.diverged)
        for v in values:
            bad |= ~torch.isfinite(v)
        self.diverged |= bad
