"""Benchmarks (pytest-benchmark): `./launch.sh bench`. Timing lives here, never in tests/.

Every benchmark that trains stores `member_samples_per_s` (members x samples / median
seconds) in its extra_info; at the end a short table puts the ratios that matter side by
side, all measured in this session: stacked vs the lab's own loop, the run's harness vs the
bare step loop, evaluation vs training, and the distance to the machine's matmul rate.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# 2 FLOP per multiply-add: the forward, the weight gradients (as many again) and the input gradients of layers 2
# and 3 (the first layer's input needs none): ~108 kFLOP. (It was 2 x 3 x forward, ~159 kFLOP, until 2026-12-07,
# which counted a first-layer input gradient no step computes and overstated "% of the limit" by 1.46x.)
FLOP_PER_MEMBER_SAMPLE = 2 * (2 * (784 * 32 + 32 * 32 + 32 * 10) + 32 * 32 + 32 * 10)


def data_root() -> Path:
    return Path(os.environ.get("BNBENCH_DATA_ROOT") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def mnist():
    from bnbench.train import data

    return data.load("mnist", data_root(), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="session")
def torchvision_root(tmp_path_factory):
    """MNIST/raw/ with the four files decompressed, as torchvision.datasets.MNIST wants them
    (the shared copy is gzipped and read-only)."""
    from bnbench.train import data

    root = tmp_path_factory.mktemp("tv")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for p in data.locate("mnist", data_root(), download=False).values():
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as src, open(raw / p.name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def _rate(bench) -> float | None:
    return bench.extra_info.get("member_samples_per_s")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    by = {b.name: b for b in session.benchmarks}

    def rate(name):
        b = by.get(name)
        return _rate(b) if b is not None else None

    lines = []
    lab = rate("test_lab_loop_epoch")
    for name, label in [
        ("test_train_epoch[default]", "stacked, default run (5 seeds x bn,nobn)"),
        ("test_train_epoch[32seeds]", "stacked, 32 seeds x bn,nobn"),
    ]:
        r = rate(name)
        if r and lab:
            lines.append(f"{label:48s} {r:>12,.0f} member-samples/s  {r / lab:6.1f}x the lab loop ({lab:,.0f})")
    bare, run = rate("test_bare_step_loop"), rate("test_run_loop")
    if bare and run:
        lines.append(f"{'bnbench run loop vs the bare step loop':48s} {run:>12,.0f} vs {bare:,.0f}  {run / bare:6.1%}")
    wall = by.get("test_run_loop")
    if wall is not None and "wall_member_samples_per_s" in wall.extra_info and bare:
        w = wall.extra_info["wall_member_samples_per_s"]
        lines.append(f"{'  ... counting evaluation and writing too':48s} {w:>12,.0f} vs {bare:,.0f}  {w / bare:6.1%}")
    ev, tr = by.get("test_full_evaluation[default]"), by.get("test_train_epoch[default]")
    if ev is not None and tr is not None:
        e, t = ev.stats.median, tr.stats.median
        lines.append(f"{'full evaluation (60k+10k) vs a training epoch':48s} {e:>11.2f} s vs {t:.2f} s  {e / t:6.1%}")
    mm = by.get("test_matmul_rate")
    best = max((r for r in (rate("test_train_epoch[32seeds]"), rate("test_train_epoch[default]")) if r), default=None)
    if mm is not None and best:
        gflops = mm.extra_info["gflop_per_s"]
        limit = gflops * 1e9 / FLOP_PER_MEMBER_SAMPLE
        lines.append(f"{'arithmetic limit at this matmul rate':48s} {limit:>12,.0f} member-samples/s  "
                     f"({gflops:.0f} GFLOP/s / {FLOP_PER_MEMBER_SAMPLE / 1e3:.0f} kFLOP); best reached {best / limit:.0%}")
    off, on = rate("test_instrument_overhead[off]"), rate("test_instrument_overhead[on]")
    if off and on:
        lines.append(f"{'--instrument, ioffe2015 net, default cadence':48s} {on:>12,.0f} vs {off:,.0f} member-samples/s off: "
                     f"{off / on - 1:+.1%} time")
    every = rate("test_instrument_overhead[every-step]")
    if off and every:
        lines.append(f"{'  ... measuring everything at every step':48s} {every:>12,.0f} member-samples/s: {off / every:.1f}x the time")
    if lines:
        terminalreporter.write_sep("=", "bnbench: ratios measured in this session")
        for line in lines:
            terminalreporter.write_line(line)
