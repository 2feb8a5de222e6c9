"""How an epoch's cost grows with the members K and with the training set (issue 32), on this CPU.

    .venv/bin/python bench/cost_growth.py [--ks 2,8,32,128,512,1024] [--out reports/bench/cost_growth.json]

For each K (K/2 seeds x bn, nobn, the lab's net and batch, float32, one process with all threads),
in a fresh process each so that its peak memory is its own:
- the training step (median of 20 after 3 warm-up, the engine's own Trainer.step on its own batches);
- an epoch's two evaluations as the run makes them (Trainer.evaluate over the 60,000 training and the
  10,000 test samples, --eval-batch 10,000);
- an epoch's cost from those: 600 steps + the two evaluations, and which term dominates;
- the process's peak resident memory (ru_maxrss) against the memory check's estimate
  (train/memory.py needed_bytes), and the largest K the estimate lets this machine hold.
Against the training-set size: the data is resident, a step draws its batch with one index_select,
so a step costs the same whatever the set's size (measured: the draw from 60,000 vs 6,000 rows); an
epoch's steps and its training-set evaluation grow with the set, its test-set evaluation does not.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(k: int) -> dict:
    """Measured in this process (a fresh one per K)."""
    import torch
    from accelerate import Accelerator

    from bnbench.config import make_config
    from bnbench.train import data
    from bnbench.train.engine import Trainer
    from bnbench.train.memory import SHARE, available_bytes, member_bytes, needed_bytes
    sys.path.insert(0, str(HERE))
    from conftest import data_root
    from step_breakdown import median_seconds as seconds

    splits = data.load("mnist", data_root(), device="cpu", dtype=torch.float32)
    cfg = make_config(seeds=tuple(range(max(1, k // 2))), variants=("bn", "nobn"))
    trainer = Trainer(cfg, splits, Accelerator(cpu=True))
    order = trainer.epoch_order(1)
    loss = torch.zeros(len(trainer.members), dtype=torch.float64)
    state = {"t": 0}

    def step():
        trainer.step(*trainer.batch_at(order, state["t"] % trainer.steps_per_epoch()), loss)
        state["t"] += 1
    step_s = seconds(step, 20, warm=3)
    t0 = time.perf_counter()
    trainer.evaluate(splits.train_x, splits.train_y)
    eval_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.evaluate(splits.test_x, splits.test_y)
    eval_test_s = time.perf_counter() - t0
    steps = trainer.steps_per_epoch()
    # The draw of a batch from the whole set against a tenth of it: what the set's size costs a step.
    rows = cfg.batch_size * len(cfg.seeds)
    idx_full, idx_tenth = torch.randint(0, splits.train_x.shape[0], (rows,)), torch.randint(0, 6000, (rows,))
    small = splits.train_x[:6000].clone()
    draw_full = seconds(lambda: splits.train_x.index_select(0, idx_full), 50, warm=3)
    draw_tenth = seconds(lambda: small.index_select(0, idx_tenth), 50, warm=3)
    have = available_bytes("cpu")
    fit = int((SHARE * have - needed_bytes(cfg, 0, cfg.batch_size)) // member_bytes(cfg, cfg.batch_size)) if have else None
    return {"k": len(trainer.members), "threads": torch.get_num_threads(), "step_s": step_s, "steps_per_epoch": steps,
            "train_s_per_epoch": steps * step_s, "eval_train_s": eval_train_s, "eval_test_s": eval_test_s,
            "epoch_s": steps * step_s + eval_train_s + eval_test_s,
            "member_samples_per_s": len(trainer.members) * cfg.batch_size / step_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "estimate_mib": needed_bytes(cfg, len(trainer.members), cfg.batch_size) / 2**20,
            "draw_from_60000_us": draw_full * 1e6, "draw_from_6000_us": draw_tenth * 1e6,
            "available_gib": have / 2**30 if have else None, "estimate_fits_members": fit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="2,8,32,128,512,1024")
    p.add_argument("--out", default=str(HERE.parent / "reports" / "bench" / "cost_growth.json"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: measure one K, print its JSON
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one)))
        return 0
    rows = []
    for k in (int(x) for x in a.ks.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--one", str(k)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench/cost_growth.py: K = {k} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"K {r['k']:5d}: step {r['step_s'] * 1e3:7.2f} ms, epoch {r['epoch_s']:7.1f} s (train {r['train_s_per_epoch']:.1f}, "
              f"eval {r['eval_train_s'] + r['eval_test_s']:.1f}), peak {r['peak_rss_mib']:,.0f} MiB vs estimate "
              f"{r['estimate_mib']:,.0f}", flush=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
