"""Launched by tests/test_distributed.py under `accelerate launch` (2 gloo processes).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py CASES.json OUT

For each case: train one epoch on the first N_TRAIN MNIST samples in float64,
evaluate on the full test set, and save per rank what the test compares with
one-process torch: member states, the running loss, the metrics, and the
sample indices the rank trained on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bnbench import data
from bnbench.config import make_config
from bnbench.data import Splits
from bnbench.distributed import check_world, make_accelerator
from bnbench.engine import Trainer

N_TRAIN = 2400  # 24 global batches of 100: >= 20 steps


def main(cases_file: str, out_dir: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    acc = make_accelerator(cpu=True, timeout_s=120)
    world = check_world(acc)
    with acc.local_main_process_first():
        full = data.load("mnist", None, device="cpu", dtype=torch.float64)
    splits = Splits(full.train_x[:N_TRAIN], full.train_y[:N_TRAIN], full.test_x, full.test_y, full.sources)
    out = {"world_size": world, "rank": acc.process_index, "cases": {}}
    for name, overrides in cases.items():
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        trainer = Trainer(make_config(**overrides), splits, acc, world_size=world)
        seen = torch.cat([trainer.local_indices(trainer.epoch_order(1), t) for t in range(trainer.steps_per_epoch())], 1)
        running, _ = trainer.train_epoch(1)
        test = trainer.evaluate(splits.test_x, splits.test_y)
        out["cases"][name] = {
            "states": {f"{v}/{s}": trainer.member_state(v, s) for v, s in trainer.members},
            "running": running,
            "test": test,
            "seen": seen,  # [S, steps * b]: the samples this rank trained each seed on, in order
            "backend": trainer.backend,
            "local_batch": trainer.local_batch,
        }
    torch.save(out, Path(out_dir) / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
