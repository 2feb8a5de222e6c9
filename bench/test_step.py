"""One training step per engine and member count, for BN, no-BN and sync-BN (member-samples/s).

    ./launch.sh bench                      # saves JSON under reports/bench/
    ./launch.sh bench --benchmark-compare  # against the last saved run

sync-BN runs the cross-process BN inside a one-process gloo group: the cost of its extra
arithmetic and of a collective call with nobody to talk to. What communication adds on
top is measured between real processes by bench/ddp_scaling.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bnbench.config import make_config
from bnbench.train.engine import Trainer


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


CASES = [("reference", 1)] + [("stacked", k) for k in (1, 2, 8, 32)]


@pytest.mark.parametrize("engine, k", CASES, ids=[f"{e}-K{k}" for e, k in CASES])
@pytest.mark.parametrize("variant", ["bn", "nobn", "sync-bn"])
def test_train_step(benchmark, request, mnist, accelerator, engine, k, variant):
    if variant == "sync-bn":
        request.getfixturevalue("one_process_group")
    cfg = make_config(seeds=tuple(range(k)), variants=("nobn" if variant == "nobn" else "bn",), engine=engine,
                      sync_bn=variant == "sync-bn")
    trainer = Trainer(cfg, mnist, accelerator)
    assert trainer.sync_bn == (variant == "sync-bn")
    order = trainer.epoch_order(1)
    xb, yb = trainer.batch_at(order, 0)
    loss_sum = torch.zeros(len(trainer.members), dtype=torch.float64)
    benchmark.pedantic(trainer.step, args=(xb, yb, loss_sum), rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = k * trainer.batch / benchmark.stats.stats.median


def _default_step(mnist, accelerator, **cfg):
    trainer = Trainer(make_config(**cfg), mnist, accelerator)
    xb, yb = trainer.batch_at(trainer.epoch_order(1), 0)
    loss_sum = torch.zeros(len(trainer.members), dtype=torch.float64)
    return trainer, (xb, yb, loss_sum)


@pytest.mark.parametrize("threads", [1, 2])
def test_default_step_threads(benchmark, mnist, accelerator, threads):
    """The default run's step (5 seeds x bn,nobn) on 1 and 2 torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer, args = _default_step(mnist, accelerator)
        benchmark.pedantic(trainer.step, args=args, rounds=30, iterations=5, warmup_rounds=3)
    finally:
        torch.set_num_threads(before)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * trainer.batch / benchmark.stats.stats.median


@pytest.mark.parametrize("backward", ["hand-written", "autograd"])
def test_default_step_backward(benchmark, mnist, accelerator, backward):
    """The default run's step with its backward written by hand (fused.StackedLosses, what the
    engine runs) and through autograd over StackedMLP.forward (--step-impl autograd's losses; the
    optimizer call stays the direct one, so that only the backward differs): same arithmetic,
    bitwise the same gradients (tests/test_engines.py), one autograd node against ~40."""
    trainer, args = _default_step(mnist, accelerator)
    if backward == "autograd":
        for u in trainer.stacks:
            u.losses_module.hand_written = False
    benchmark.pedantic(trainer.step, args=args, rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * trainer.batch / benchmark.stats.stats.median


@pytest.mark.parametrize("k", [5, 32])
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_step_compile(benchmark, mnist, accelerator, k, mode):
    """--compile against eager on one variant's stacked step; the compile time is extra_info."""
    trainer, args = _default_step(mnist, accelerator, seeds=tuple(range(k)), variants=("bn",), compile=mode == "compile")
    benchmark.extra_info["compile_s"] = trainer.warm_up()
    benchmark.pedantic(trainer.step, args=args, rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = k * trainer.batch / benchmark.stats.stats.median


@pytest.mark.parametrize("fused", [False, True, "direct"])
def test_optimizer_step(benchmark, mnist, accelerator, fused):
    """Adam over one stacked unit (5 members): the for-each kernel, the fused one through
    Adam.step, and the fused one called as the engine calls it (optim.FusedAdamStep)."""
    from bnbench.train.optim import FusedAdamStep, make_optimizer

    trainer, _ = _default_step(mnist, accelerator, variants=("bn",))
    params = list(trainer.stacks[0].net.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(trainer.cfg, params, fused=bool(fused))
    step = opt.step
    if fused == "direct":
        step = FusedAdamStep(opt)
        step()  # Adam.step makes the state; from here on the direct call
    benchmark.pedantic(step, rounds=30, iterations=10, warmup_rounds=3)


@pytest.mark.parametrize("how", ["index_select", "indexing"])
def test_gather(benchmark, mnist, how):
    """Every member's batch (5 seeds x 100 rows of 784) out of the resident training set."""
    idx = torch.randperm(mnist.train_x.shape[0])[:500]
    x = mnist.train_x
    fn = (lambda: x.index_select(0, idx)) if how == "index_select" else (lambda: x[idx])
    benchmark.pedantic(fn, rounds=30, iterations=20, warmup_rounds=3)


@pytest.mark.parametrize("batch", [2, 100])
@pytest.mark.parametrize("variant", ["nobn", "bn", "ln", "gn", "rms", "brn"])
def test_norm_step(benchmark, mnist, accelerator, variant, batch):
    """What each normalization costs: a stacked step of 5 seeds of that variant alone (the same stack
    shapes for all), at the lab's batch and at 2. bn and nobn take the hand-written step, the others
    autograd (train/step.py), as in a run."""
    trainer, args = _default_step(mnist, accelerator, variants=(variant,), batch_size=batch)
    benchmark.extra_info["step_impl"] = trainer.stacks[0].step_impl
    benchmark.pedantic(trainer.step, args=args, rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * trainer.batch / benchmark.stats.stats.median
