"""Where a stacked step's time goes (issue 32: why bnbench is not 2x torch.func and 10x the loop at K = 32).

    .venv/bin/python bench/step_breakdown.py [--k 32] [--steps 50] [--out reports/bench/step_breakdown.json]

For K members of the lab net (K/2 seeds x bn, nobn, batch 100, float32, one process), on the
peers' own resident batches (bench/peers.py), this measures side by side in one process:
- the step of each peer (median over `--steps` after warm-up): loop, func, stacked-fused;
- the step's matrix products alone: the six batched matmuls the hand-written step runs (forward
  x@W1, h1@W2, h2@W3; backward dW1, dW2, dW3 and the two activation gradients, eight in all),
  on tensors of the step's shapes, as one timed loop: the floor of any stacked formulation that
  keeps torch's bmm, whatever it does around them;
- the first layer's two products (forward x@W1 and dW1), as the engine runs them (one per member)
  and as they could run with a seed's bn and nobn members sharing their input (one product per
  seed, twice as wide): what a layout that reads each seed's batch once would save;
- the 2048² matmul rate and the arithmetic limit it implies (bench/conftest.FLOP_PER_MEMBER_SAMPLE);
- a torch.profiler table of the fused step: self CPU time per op, the ten largest.
The JSON it writes is what docs/performance.md quotes (reports/readme.py block `breakdown`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import FLOP_PER_MEMBER_SAMPLE, data_root  # noqa: E402
from peers import batch_source, make_peer, members_for  # noqa: E402

BATCH = 100


def median_seconds(fn, steps: int, warm: int = 5) -> float:
    """The median of `steps` timed calls of fn after `warm` untimed ones (bench/cost_growth.py uses it too)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmuls_of_a_step(k: int):
    """The eight batched products of one hand-written step of K members, on random tensors of its shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(k, BATCH, 784, generator=g)
    w1, w2, w3 = (torch.rand(k, a, b, generator=g) for a, b in ((784, 32), (32, 32), (32, 10)))
    h1, h2 = torch.rand(k, BATCH, 32, generator=g), torch.rand(k, BATCH, 32, generator=g)
    g3, g2, g1 = torch.rand(k, BATCH, 10, generator=g), torch.rand(k, BATCH, 32, generator=g), torch.rand(k, BATCH, 32, generator=g)

    def run():
        torch.bmm(x, w1), torch.bmm(h1, w2), torch.bmm(h2, w3)  # forward
        torch.bmm(h2.transpose(1, 2), g3), torch.bmm(g3, w3.transpose(1, 2))  # dW3, dh2
        torch.bmm(h1.transpose(1, 2), g2), torch.bmm(g2, w2.transpose(1, 2))  # dW2, dh1
        torch.bmm(x.transpose(1, 2), g1)  # dW1 (no gradient for the input)
    return run


def first_layer(k: int) -> dict:
    """ms of the first layer's forward and dW1 products: per member ([K,b,784]@[K,784,32]) against
    per seed with the seed's two members side by side ([K/2,b,784]@[K/2,784,64])."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, n, width in (("per_member", k, 32), ("shared_by_seed", k // 2, 64)):
        x, w, grad = torch.rand(n, BATCH, 784, generator=g), torch.rand(n, 784, width, generator=g), torch.rand(n, BATCH, width, generator=g)
        out[name] = median_seconds(lambda: (torch.bmm(x, w), torch.bmm(x.transpose(1, 2), grad)), 50) * 1e3
    return out


def matmul_rate() -> float:
    x = torch.rand(2048, 2048)
    return 2 * 2048**3 / median_seconds(lambda: x @ x, 10, warm=2) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=32, help="members (even): K/2 seeds x bn, nobn")
    p.add_argument("--steps", type=int, default=50, help="timed steps per peer (median)")
    p.add_argument("--out", default=str(HERE.parent / "reports" / "bench" / "step_breakdown.json"))
    a = p.parse_args(argv)
    from accelerate import Accelerator

    from bnbench.train import data
    splits = data.load("mnist", data_root(), device="cpu", dtype=torch.float32)
    accelerator = Accelerator(cpu=True)
    seeds, variants = members_for(a.k)
    source = batch_source(seeds, variants, splits, accelerator)
    xb, yb = source.batch_at(source.epoch_order(1), 0)
    result = {"k": a.k, "batch": BATCH, "steps": a.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step_ms": {}}
    result["matmul_gflop_per_s"] = matmul_rate()
    result["arithmetic_limit_member_samples_per_s"] = result["matmul_gflop_per_s"] * 1e9 / FLOP_PER_MEMBER_SAMPLE
    for name in ("loop", "func", "stacked-fused"):
        peer = make_peer(name, seeds, variants, splits, accelerator)
        result["step_ms"][name] = median_seconds(lambda: peer.step(xb, yb), a.steps) * 1e3
    result["bmm_ms"] = median_seconds(matmuls_of_a_step(a.k), a.steps) * 1e3
    flop = FLOP_PER_MEMBER_SAMPLE * a.k * BATCH
    result["bmm_gflop_per_s"] = flop / (result["bmm_ms"] / 1e3) / 1e9
    result["member_samples_per_s"] = {n: a.k * BATCH / (ms / 1e3) for n, ms in result["step_ms"].items()}
    result["bmm_only_member_samples_per_s"] = a.k * BATCH / (result["bmm_ms"] / 1e3)
    result["first_layer_ms"] = first_layer(a.k)

    peer = make_peer("stacked-fused", seeds, variants, splits, accelerator)
    for _ in range(5):
        peer.step(xb, yb)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            peer.step(xb, yb)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    result["fused_profile"] = [{"op": e.key, "calls_per_step": e.count / a.steps,
                                "self_ms_per_step": e.self_cpu_time_total / a.steps / 1e3,
                                "share": e.self_cpu_time_total / total} for e in ops[:10]]
    result["fused_profile_ops_per_step"] = sum(e.count for e in ops) / a.steps
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "fused_profile"}, indent=1))
    for row in result["fused_profile"]:
        print(f"  {row['op']:40s} {row['calls_per_step']:5.1f} calls  {row['self_ms_per_step']:6.3f} ms  {row['share']:5.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
