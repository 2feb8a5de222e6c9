"""How far the stacked and reference engines drift apart in float32 (a figure, not a test).

    .venv/bin/python bench/float32_drift.py      # BNBENCH_DATA_ROOT or ../shared/data holds MNIST

tests/test_engines.py proves the two engines equal in float64 (max parameter difference <= 1e-9
after 120 steps). In float32 they differ by rounding only (summation order): this prints the max
parameter difference over every member after the same 120 steps (6,000 samples, batch 100, 2
epochs, seeds 0-2, bn and nobn), per optimizer.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator

from bnbench.config import make_config
from bnbench.train import data
from bnbench.train.data import Splits
from bnbench.train.engine import Trainer

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def main() -> None:
    root = Path(os.environ.get("BNBENCH_DATA_ROOT") or REPO.parent / "shared" / "data")
    full = data.load("mnist", root, device="cpu", dtype=torch.float32)
    splits = Splits(full.train_x[:6000], full.train_y[:6000], full.test_x[:2000], full.test_y[:2000], full.sources)
    accelerator = Accelerator(cpu=True)
    for optimizer in ("adam", "sgd"):
        kw = dict(seeds=SEEDS, epochs=2, dtype="float32", optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05,
                  momentum=0.9 if optimizer == "sgd" else 0.0)
        trained = {}
        for engine in ("stacked", "reference"):
            t = Trainer(make_config(engine=engine, **kw), splits, accelerator)
            for e in (1, 2):
                t.train_epoch(e)
            trained[engine] = t
        f32 = max(max_diff(trained["stacked"].member_state(v, s), trained["reference"].member_state(v, s))
                  for v in ("bn", "nobn") for s in SEEDS)
        print(f"{optimizer}, {trained['stacked'].steps_done} steps: max parameter difference stacked vs reference, float32 {f32:.3e}",
              flush=True)


if __name__ == "__main__":
    main()
