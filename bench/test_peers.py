"""bnbench's stacked engine against what a user would write instead (issue 32; bench/peers.py):
one training step of K = 1, 2, 4, ..., 256 members (K = 1: one BN member; otherwise K/2 seeds x
bn, nobn) for each peer, on the same resident batch as the engine draws it.

    ./launch.sh bench -k test_peer_step                       # these cases alone (JSON under reports/bench/)
    .venv/bin/python reports/peers.py [JSON]                  # reports/bench/peers.png and the markdown table

extra_info per case: peer, k, member_samples_per_s (K x batch / median step), peak memory per member
(bench/peers.py's peak_rss_delta: the resident set's peak while the peer is built and takes two
steps, less the resident set before; "peak-rss" or "rss-after" in memory_method; why not
tracemalloc is said there), and the arithmetic limit at this session's matmul rate (the 2048²
matmul of bench/test_epoch.py::test_matmul_rate when it ran earlier in the session, else the same
matmul measured here once) over conftest's FLOP_PER_MEMBER_SAMPLE. The lab loop with its
DataLoader stays in bench/test_epoch.py as the seed's baseline.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import FLOP_PER_MEMBER_SAMPLE
from peers import PEERS, batch_source, make_peer, members_for, peak_rss_delta

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MEMORY_STEPS = 2  # Adam's state is made on the first step; the second is a steady one


def schedule(k: int) -> dict:
    """Rounds for K members: fewer for the large ones (a loop step of 256 members is ~256 lab steps)."""
    if k <= 8:
        return dict(rounds=30, iterations=5, warmup_rounds=3)
    if k <= 32:
        return dict(rounds=20, iterations=2, warmup_rounds=2)
    if k <= 128:
        return dict(rounds=10, iterations=1, warmup_rounds=2)
    return dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def matmul_gflops(request) -> tuple[float, str] | None:
    """(GFLOP/s, where from): test_matmul_rate's figure if it ran in this session, else the same
    2048² float32 matmul measured here (2 warm-up, median of 10). None under --benchmark-disable."""
    if request.config.getoption("benchmark_disable", False):
        return None
    session = getattr(request.config, "_benchmarksession", None)
    for b in getattr(session, "benchmarks", None) or []:
        if b.name == "test_matmul_rate" and "gflop_per_s" in b.extra_info:
            return b.extra_info["gflop_per_s"], "test_matmul_rate"
    x = torch.rand(2048, 2048)
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        x @ x
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times) / 1e9, "measured in bench/test_peers.py"


@pytest.mark.parametrize("k", KS, ids=[f"K{k}" for k in KS])
@pytest.mark.parametrize("peer", PEERS)
def test_peer_step(benchmark, mnist, accelerator, matmul_gflops, peer, k):
    seeds, variants = members_for(k)
    source = batch_source(seeds, variants, mnist, accelerator)
    xb, yb = source.batch_at(source.epoch_order(1), 0)
    del source

    def build_and_step():
        p = make_peer(peer, seeds, variants, mnist, accelerator)
        for _ in range(MEMORY_STEPS):
            p.step(xb, yb)
        return p

    p, peak, method = peak_rss_delta(build_and_step)
    benchmark.extra_info.update(peer=peer, k=k, seeds=len(seeds), variants=",".join(variants), batch=xb.shape[1],
                                peak_bytes_per_member=peak / k, memory_method=memory_note(method))
    if matmul_gflops is not None:
        gflops, source_of = matmul_gflops
        benchmark.extra_info.update(gflop_per_s=gflops, gflop_per_s_from=source_of,
                                    arithmetic_limit_member_samples_per_s=gflops * 1e9 / FLOP_PER_MEMBER_SAMPLE)
    benchmark.pedantic(p.step, args=(xb, yb), **schedule(k))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["member_samples_per_s"] = k * xb.shape[1] / benchmark.stats.stats.median


def memory_note(method: str) -> str:
    return {"peak-rss": "peak RSS (VmHWM reset) while built + 2 steps, less RSS before",
            "rss-after": "RSS after build + 2 steps, less RSS before (no peak reset here)"}[method]
