"""Report generation on a 1,000-row results file: a sweep of 4 configurations x 2 variants x 5 seeds
x 25 epochs, with throughput from 1 and 2 processes and sync BN on and off (`./launch.sh bench`)."""
from __future__ import annotations

import numpy as np

from bnbench.reporting.report import build_report
from bnbench.store.results import ResultsWriter


def thousand_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for c, (world, sync) in enumerate([(1, False), (1, True), (2, False), (2, True)]):
        for variant, ceiling in (("bn", 0.975), ("nobn", 0.966)):
            for seed in range(5):
                for epoch in range(1, 26):
                    acc = ceiling - 0.05 * np.exp(-epoch / 3) + rng.normal(0, 0.001)
                    rows.append(dict(
                        run_id=f"r{c}-{seed}", unit=f"u{c}-{seed}", repeat=0, preset="seed", dataset="mnist",
                        variant=variant, seed=seed, epoch=epoch, epochs=25, step=600 * epoch,
                        test_acc=acc, test_loss=1 - acc, train_acc=acc + 0.005, train_loss=0.9 - acc,
                        train_loss_running=1 - acc, train_seconds=4.0 * world, samples_per_s=150_000 / world,
                        diverged=False, hidden="32,32", activation="relu", optimizer="adam", lr=1e-3, momentum=0.0,
                        batch_size=100, per_device_batch=100 // world, engine="stacked", dtype="float32",
                        device="cpu", device_name="CPU", world_size=world, backend="gloo" if world > 1 else "none",
                        sync_bn=sync, members=10, time=f"2026-11-26T00:{c:02d}:{seed:02d}+00:00"))
    assert len(rows) == 1000
    return rows


def test_report_1000_rows(benchmark, tmp_path):
    with ResultsWriter(tmp_path) as w:
        w.append(thousand_rows())
    page = benchmark.pedantic(build_report, args=(tmp_path,), rounds=3, iterations=1)
    assert page.exists()
