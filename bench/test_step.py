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
from bnbench.engine import Trainer


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
    xb, yb = trainer.gather(order, 0)
    loss_sum = torch.zeros(len(trainer.members), dtype=torch.float64)
    benchmark.pedantic(trainer.step, args=(xb, yb, loss_sum), rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = k * trainer.batch / benchmark.stats.stats.median
