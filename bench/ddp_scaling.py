"""Member-samples/s at 1 and N processes, per layout: seed groups (the default) and data parallel.

    .venv/bin/python bench/ddp_scaling.py                 # CPU: 1 and 2 gloo processes
    .venv/bin/python bench/ddp_scaling.py --nproc 1,2,4   # on a machine with more cores / GPUs
    .venv/bin/python bench/ddp_scaling.py --gpu           # NCCL on the visible GPUs

Each case is a real `bnbench run` (stacked engine, the lab's global batch of 100) launched
as users launch it; the figure is the results rows' own samples_per_s of the last epoch
(evaluation excluded). Cases: the lab's 10 members (5 seeds x bn, nobn) on N seed groups
(dp 1: no communication), and 5 seeds of one variant (BN, no-BN, sync-BN) on one
data-parallel group of N (dp N, DDP). One extra case runs one process on one thread with
a rank's share of the batch and no communication: the difference between it and a rank
of the N-process DDP run is what DDP's collectives cost.
Each case is launched --repeats times (default 3) and the median reported with its
range. Writes reports/ddp/scaling.csv and prints an aligned table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bnbench.dist.launch import accelerate_command

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(out: Path, nproc: int, args: list[str], gpu: bool, threads: int | None = None, repeats: int = 1) -> pd.Series:
    """The median launch of `repeats` (by member-samples/s), with the spread as min/max."""
    runs = sorted((run_once(out / str(i), nproc, args, gpu, threads) for i in range(repeats)), key=lambda r: r.samples_per_s)
    mid = runs[len(runs) // 2].copy()
    mid["min_per_s"], mid["max_per_s"] = runs[0].samples_per_s, runs[-1].samples_per_s
    return mid


def run_once(out: Path, nproc: int, args: list[str], gpu: bool, threads: int | None = None) -> pd.Series:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    run_args = args + ([] if gpu else ["--cpu"]) + ["--quiet", "--out", str(out)]
    if nproc == 1:
        cmd = [str(BIN / "bnbench"), "run", *run_args]
    else:  # the command line bnbench's own launches use
        import torch

        cmd, extra = accelerate_command(nproc, run_args, cpu=not gpu, gpus=torch.cuda.device_count())
        env.update(extra)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = pd.read_json(out / "results.jsonl", lines=True, precise_float=True)
    last = rows[rows.epoch == rows.epoch.max()].iloc[0].copy()
    (meta,) = json.loads((out / "meta.json").read_text())["runs"].values()
    last["threads"] = meta["torch_threads"]  # rank 0's torch threads (torchrun sets 1 per process)
    return last


def default_counts(gpu: bool) -> list[int]:
    """1 and 2 CPU processes; on GPUs, 1, 2, 4, ... up to the visible GPUs (just 1 on one GPU)."""
    if not gpu:
        return [1, 2]
    import torch

    gpus, counts = torch.cuda.device_count(), [1]
    while counts[-1] * 2 <= gpus:
        counts.append(counts[-1] * 2)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", help="process counts, e.g. 1,2,4 (default: 1,2 on the CPU; with --gpu, powers of 2 "
                   "up to the visible GPUs: NCCL takes one GPU per process)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="launches per case; the median is reported (VM noise is large)")
    p.add_argument("--gpu", action="store_true", help="GPUs and NCCL instead of CPU processes and gloo")
    p.add_argument("--out", default=str(REPO / "reports" / "ddp" / "scaling.csv"))
    a = p.parse_args()
    counts = [int(n) for n in a.nproc.split(",")] if a.nproc else default_counts(a.gpu)
    if a.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if not gpus or max(counts) > gpus:
            raise SystemExit(f"ddp_scaling: --nproc {max(counts)} on {gpus} visible GPU(s): NCCL takes one GPU per "
                             f"process; leave --nproc out to use what fits")
    base = ["--seeds", "0-4", "--epochs", str(a.epochs), "--batch-size", "100"]
    cases = [("bn", ["--variants", "bn"]), ("nobn", ["--variants", "nobn"]), ("sync-bn", ["--variants", "bn", "--sync-bn"])]
    layouts = [("lab, seed groups", ["--variants", "bn,nobn"], lambda n: 1)] + [(name, extra, lambda n: n) for name, extra in cases]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            for name, extra, dp in layouts:
                args = base + extra + ["--dp", str(dp(n))]
                r = run(Path(tmp) / f"{name}-{n}", n, args, a.gpu, repeats=a.repeats)
                records.append({"case": name, "processes": n, "dp": dp(n), "seed_groups": n // dp(n), "threads": r.threads,
                                "backend": r.backend, "batch_size": r.batch_size, "per_device_batch": r.per_device_batch,
                                "step_ms": 1e3 * r.train_seconds / (60_000 // r.batch_size),
                                "member_samples_per_s": r.samples_per_s, "min": r.min_per_s, "max": r.max_per_s,
                                "device_name": r.device_name})
        if not a.gpu:
            # A rank's arithmetic alone: one thread, a rank's share of the batch, no collectives.
            for name, extra in cases[:2]:
                n = max(counts)
                b = 100 // n
                args = ["--seeds", "0-4", "--epochs", str(a.epochs), "--batch-size", str(b)] + extra
                r = run(Path(tmp) / f"{name}-alone", 1, args, False, threads=1, repeats=a.repeats)
                records.append({"case": f"{name} (one rank's compute, no comm)", "processes": 1, "dp": 1, "seed_groups": 1,
                                "threads": r.threads,
                                "backend": "none", "batch_size": b, "per_device_batch": b,
                                "step_ms": 1e3 * r.train_seconds / (60_000 // b),
                                "member_samples_per_s": r.samples_per_s, "min": r.min_per_s, "max": r.max_per_s,
                                "device_name": r.device_name})
    df = pd.DataFrame(records)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
