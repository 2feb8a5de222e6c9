"""Launched by tests/test_distributed.py under `accelerate launch` (W gloo processes).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes W tests/ddp_worker.py CASES.json OUT

For each case: lay the W processes out as the run would (seed groups x dp, the case's `dp`
or the default), train one epoch on the first N_TRAIN MNIST samples, evaluate on the full
test set, and save per rank what the test compares with one-process torch: the states of
its seed group's members, the running loss, the metrics, and the sample indices it trained on.
One thread per process, as accelerate launch gives them: the test's one-process run matches it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bnbench.train import data
from bnbench.config import make_config
from bnbench.train.data import Splits
from bnbench.dist.groups import check_world, make_accelerator, make_mesh
from bnbench.train.engine import Trainer
from bnbench.dist.layout import choose_layout

N_TRAIN = 2400  # 24 global batches of 100: >= 20 steps


def main(cases_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cases = json.loads(Path(cases_file).read_text())
    acc = make_accelerator(cpu=True, timeout_s=120)
    world = check_world(acc)
    out = {"world_size": world, "rank": acc.process_index, "cases": {}}
    for name, overrides in cases.items():
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        cfg = make_config(**overrides)
        with acc.local_main_process_first():
            full = data.load("mnist", None, device="cpu", dtype=getattr(torch, cfg.dtype))
        splits = Splits(full.train_x[:N_TRAIN], full.train_y[:N_TRAIN], full.test_x, full.test_y, full.sources)
        mesh = make_mesh(choose_layout(cfg, world), acc.process_index)
        trainer = Trainer(cfg, splits, acc, mesh)
        seen = torch.cat([trainer.local_indices(trainer.epoch_order(1), t) for t in range(trainer.steps_per_epoch())], 1)
        running, _ = trainer.train_epoch(1)
        test = trainer.evaluate(splits.test_x, splits.test_y)
        out["cases"][name] = {
            "states": {f"{v}/{s}": trainer.member_state(v, s) for v, s in trainer.members},
            "running": dict(zip((f"{v}/{s}" for v, s in trainer.members), running.tolist())),
            "test": test,
            "seen": seen,  # [S, steps * b]: the samples this rank trained each of trainer.batch_seeds on, in order
            "seeds": trainer.batch_seeds,
            "backend": trainer.backend,
            "local_batch": trainer.local_batch,
            "seed_group": mesh.seed_group,
            "dp_rank": mesh.dp_rank,
            "dp": mesh.layout.dp,
        }
    torch.save(out, Path(out_dir) / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
