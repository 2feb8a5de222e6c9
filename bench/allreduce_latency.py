"""What one all-reduce costs between the processes of this machine: the floor under DDP steps.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no bench/allreduce_latency.py
    torchrun --nproc_per_node 2 bench/allreduce_latency.py          # the same, with torchrun

Sizes: 321 floats (one sync-BN layer's statistics at K=5), and the 0.5 MB of gradients
of one stacked unit of 5 members. Median of 300 calls after 30 warm-up calls.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

SIZES = {"sync-BN statistics (321 floats)": 321, "gradients of 5 members (0.53 MB)": 5 * (784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)}


def main() -> None:
    dist.init_process_group("gloo")
    for name, n in SIZES.items():
        t = torch.randn(n)
        for _ in range(30):
            dist.all_reduce(t)
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        if dist.get_rank() == 0:
            print(f"{name:36s} {sorted(times)[150] * 1e3:7.3f} ms (gloo, {dist.get_world_size()} processes)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
