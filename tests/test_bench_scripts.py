"""The benchmark scripts run (timing itself is bench/'s business, never asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, mnist_root


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    # The script a lent GPU runs: its correctness checks must hold, here on the CPU.
    out = tmp_path / "check.json"
    env = dict(os.environ, BNBENCH_DATA_ROOT=str(mnist_root()))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failed_checks"] == []
    assert set(report["checks"]) == {"stacked_vs_reference", "device_vs_cpu", "exact_metrics", "sync_path_vs_bn",
                                     "reference_sync_vs_bn", "sync_bn_two_processes"}
    assert report["checks"]["reference_sync_vs_bn"]["module"] == "CrossProcessBatchNorm1d"
    # The real cross-process check: 2 gloo processes with sync BN == one process on the whole batch.
    two = report["checks"]["sync_bn_two_processes"]
    assert two["backend"] == "gloo" and two["ranks_equal"] and 0 < two["max_abs"] <= 1e-10, two
    assert {"stacked/bn/0", "stacked/bn/1", "reference/bn/0", "reference/bn/1"} <= set(two)
    assert two["reference/module"] == "CrossProcessBatchNorm1d"
    assert {"step/stacked/K5/sync-bn", "epoch/default/eager", "full_evaluation_s"} <= set(report["timings"])


def test_the_benchmark_suite_collects():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "bench"), "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = proc.stdout
    for case in ("test_lab_loop_epoch", "test_train_epoch[default]", "test_bare_step_loop", "test_run_loop",
                 "test_full_evaluation", "test_data_preparation[cold]", "test_train_step[sync-bn-stacked-K32]",
                 "test_instrument_overhead[on]"):
        assert case in names, case
