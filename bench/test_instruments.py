"""What --instrument costs: the ioffe2015 network (5 seeds x bn,nobn), a window of steps.

    ./launch.sh bench -k instruments

`off` is the training step itself (instruments=None: two `is None` checks per unit per step).
`on` measures at the default cadence scaled to the window: gradient norms and percentiles
every 10% of the steps, the Santurkar et al. measures once per window (1 in 1,000 steps by
default; here 1 in 200, so the figure is an upper bound). `every-step` prices one of each.
The summary line at the end gives on/off.
"""
from __future__ import annotations

import itertools

import pytest

from bnbench.config import make_config
from bnbench.train.engine import Trainer

STEPS = 200  # per round: 20 instrumented steps, 1 with the ICS measures

CASES = {"off": dict(), "on": dict(instrument=True, instrument_every=STEPS // 10, ics_every=STEPS),
         "every-step": dict(instrument=True, instrument_every=1, ics_every=1)}


@pytest.mark.parametrize("case", list(CASES))
def test_instrument_overhead(benchmark, mnist, accelerator, case):
    cfg = make_config("ioffe2015", **CASES[case])
    trainer = Trainer(cfg, mnist, accelerator)
    steps = STEPS if case != "every-step" else 20
    stops = itertools.count(steps, steps)

    def window():
        trainer.train_steps(next(stops))
        if trainer.instruments is not None:
            trainer.instruments.rows({})  # what a run does at each window: hand the rows over

    benchmark.pedantic(window, rounds=3, warmup_rounds=1)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * steps * trainer.batch / benchmark.stats.stats.median
    benchmark.extra_info["steps_per_round"] = steps
