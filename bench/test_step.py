"""One training epoch (50 steps) of each engine, in member-samples per second (extra_info).

    ./launch.sh bench                      # saves JSON under reports/bench/
    ./launch.sh bench --benchmark-compare  # against the last saved run
"""
from __future__ import annotations

import pytest

from bnbench.config import make_config
from bnbench.engine import Trainer


@pytest.mark.parametrize("engine, k", [("reference", 1), ("stacked", 1), ("stacked", 5), ("stacked", 32)])
@pytest.mark.parametrize("variant", ["bn", "nobn"])
def test_train_epoch_throughput(benchmark, mnist, accelerator, engine, k, variant):
    # 50 steps of batch 100 per round: long enough to swamp timer noise, short enough for many rounds.
    from bnbench.data import Splits

    n = 5000
    splits = Splits(mnist.train_x[:n], mnist.train_y[:n], mnist.test_x, mnist.test_y, {})
    trainer = Trainer(make_config(seeds=tuple(range(k)), variants=(variant,), engine=engine), splits, accelerator)
    epoch = iter(range(1, 10**6))
    benchmark.pedantic(lambda: trainer.train_epoch(next(epoch)), rounds=5, warmup_rounds=1)
    benchmark.extra_info["member_samples_per_s"] = k * n / benchmark.stats.stats.median
