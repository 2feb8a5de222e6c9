"""The cost probe: what each normalization costs to train, measured in the run, beside what it buys.

The variants of a run train together (bn and nobn in one stack, the others in stacks that share one
optimizer and one backward: engine.Trainer.step), so the run's own clock (samples_per_s) cannot be cut
into a time per variant. Before training, for each variant this process trains, the probe builds a
stack of that variant alone with the run's shape (all the run's seeds of that variant as members, whatever
share this process trains, so that every variant is timed at one shape; the run's batch per process, the engine's grouping of optimizers), takes the step the run takes for it
(step.py's choice: hand-written or autograd, Adam's direct call where verified) and times a few steps:
member-samples per second of that variant trained alone on this process (rows: variant_samples_per_s).

Training is untouched, bit for bit: the probe's modules are fresh ones built from the members' initial
weights (init_linears forks the global RNG), its batch is drawn from the training data by a generator of
its own, and the global RNG is restored after it (reference_mlp's nn.Linear draws from it). It times
computation only: no DDP all-reduce, no sync-BN collective (a loop bounded by one process's clock
must not enter a collective the other processes may not). With --compile it is skipped (null):
compiling one more stack per variant would cost more than the run's first windows.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import step as seam
from .engine import StackSpec, Trainer
from .optim import make_optimizer

WARM_STEPS = 3  # untimed: the first makes Adam's state and the allocator's blocks
ROUNDS = 11  # timed rounds at most; the rate is from the median round
ROUND_S = 0.005  # a round holds enough steps to last about this long: one clock read (and CUDA sync) per round
BUDGET_S = 0.25  # per variant: no round starts after this much timed time (one round at least)
BATCH_SEED = 20261207  # the probe's batch rows: its own generator, never the run's streams


def probe(trainer: Trainer, budget_s: float = BUDGET_S) -> tuple[dict[str, float | None], float]:
    """({variant: member-samples/s of that variant trained alone, or None where not measured}, the seconds
    the probe took) for every variant among trainer's members."""
    t0 = time.perf_counter()
    variants = list(dict.fromkeys(v for v, _ in trainer.members))
    if trainer.cfg.compile:
        return dict.fromkeys(variants), 0.0
    rates: dict[str, float | None] = {}
    # Nothing here draws from a CUDA generator (modules are built on the CPU, then moved), so the
    # CPU's is the one to restore.
    with torch.random.fork_rng(devices=[]):
        for v in variants:
            # Every variant at one shape, in every process: all the run's seeds as one stack (what one process
            # of the run holds), whatever share of them this process trains (seed groups split variant-major,
            # so shares differ between variants, and a rate grows with the stack's size).
            local = next(s for w, s in trainer.members if w == v)
            try:
                rates[v] = _rate(trainer, v, tuple(trainer.cfg.seeds), budget_s, local)
            except torch.cuda.OutOfMemoryError:  # beside the run's own stacks it may not fit: not measured
                rates[v] = None
                torch.cuda.empty_cache()
    return rates, time.perf_counter() - t0


def _rate(trainer: Trainer, variant: str, seeds: tuple[int, ...], budget_s: float, local: int) -> float:
    """Member-samples/s of `variant`'s members `seeds` as one stack (or, reference engine, one net each);
    `local`: a seed of the variant this process trains (whose step the probe takes)."""
    cfg, n, b = trainer.cfg, len(seeds), trainer.local_batch
    if cfg.engine == "stacked":
        specs = [StackSpec(variant, slice(0, n), slice(0, n), seeds, (variant,), True)]
    else:
        specs = [StackSpec(variant, slice(j, j + 1), slice(j, j + 1), (s,), (variant,), False)
                 for j, s in enumerate(seeds)]
    nets = [trainer._build(spec, alone=True).train() for spec in specs]
    # The step the run takes for these members (a bn,nobn stack with sync BN takes autograd for both), and
    # the hand-written one only where it applies to, and passes its self-check on, the probe's own stack.
    fused = trainer.step_impl(variant, local) == "fused"
    modules = [seam.Losses(net, fused and seam.hand_written(cfg, net, trainer.sync_bn)) for net in nets]
    groups = []
    for members in trainer._grouping(nets):  # the engine's optimizers: one for a stack, one per reference net
        opt = make_optimizer(cfg, [p for i in members for p in nets[i].parameters()], fused=cfg.engine == "stacked")
        verified = any(modules[i].step_impl == "fused" for i in members)
        groups.append((seam.zero_grad_of(opt), seam.update_of(cfg, opt, verified), members))

    g = torch.Generator().manual_seed(BATCH_SEED)
    idx = torch.randint(0, trainer.splits.train_x.shape[0], (n * b,), generator=g).to(trainer.device)
    x = trainer.splits.train_x.index_select(0, idx).view(n, b, -1)
    y = trainer.splits.train_y.index_select(0, idx).view(n, b)
    loss_sum = torch.zeros(n, dtype=torch.float64, device=trainer.device)

    def step() -> None:  # Trainer.step's work for these stacks, without the instruments
        for zero_grad, update, members in groups:
            zero_grad()
            losses = [modules[i](x[specs[i].rows], y[specs[i].rows]) for i in members]
            total = losses[0].sum()
            for more in losses[1:]:
                total = total + more.sum()
            total.backward()
            update()
            for i, lost in zip(members, losses):
                loss_sum[specs[i].members] += lost.detach()

    def timed(k: int) -> float:
        trainer._sync()
        t = time.perf_counter()
        for _ in range(k):
            step()
        trainer._sync()
        return time.perf_counter() - t

    first = timed(1)
    # A slow step (a large net) gets no more warm-up: the probe stays a few steps of the run's length.
    warm = [timed(1) for _ in range(WARM_STEPS - 1)] if first < budget_s / 4 else []
    per_round = max(1, min(10, int(ROUND_S / max(min(warm or [first]), 1e-9))))
    times: list[float] = []
    spent = 0.0
    while len(times) < ROUNDS and (not times or spent < budget_s):
        t = timed(per_round)
        spent += t
        times.append(t / per_round)
    return n * b / statistics.median(times)
