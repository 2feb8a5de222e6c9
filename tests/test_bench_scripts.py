"""The benchmark scripts run (timing itself is bench/'s business, never asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, mnist_root


def test_the_gpu_device_command_rehearsed_on_the_cpu(tmp_path):
    """The exact command a lent GPU machine runs (bench/gpu_check.py's DEVICE_COMMAND), with
    --device cpu: MNIST staged into a folder as .mnist/ is carried, output only under $OUT, the log
    tee'd there; every section ends and is in the JSON, the CUDA-only ones say so, the checks hold."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    mnist, out = tmp_path / ".mnist", tmp_path / "OUT"
    out.mkdir()
    staged = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--stage", str(mnist),
                             "--data-root", str(mnist_root())], capture_output=True, text=True, timeout=120)
    assert staged.returncode == 0 and len(list(mnist.iterdir())) == 4, staged.stderr
    env = {k: v for k, v in os.environ.items() if k != "BNBENCH_DATA_ROOT"}  # only what is carried
    cmd = gpu_check.device_command(python=sys.executable, mnist=str(mnist), extra=" --device cpu")
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env={**env, "OUT": str(out)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert log.splitlines()[0].startswith("== environment") and "functional_all_reduce_backward True" in log
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "correctness", "sync_bn", "timing", "cuda_graphs", "k_scaling"]
    assert report["failed"] == [] and sections["cuda_graphs"]["status"] == "skipped: no CUDA"
    assert all(s["status"] == "ok" for k, s in sections.items() if k != "cuda_graphs")
    assert sections["correctness"]["pass"] and sections["correctness"]["device_vs_cpu"] == "skipped: no CUDA"
    assert sections["correctness"]["stacked_vs_reference"]["max_abs"] <= 1e-9
    assert all(v["bitwise"] and v["self_check"] == "agrees" for k, v in sections["correctness"]["hand_written_vs_autograd"].items()
               if k != "steps")
    sync = sections["sync_bn"]  # two gloo processes with sync BN == one process on the whole batch
    assert sync["pass"] and sync["backend"] == "gloo" and sync["ranks_equal"] and 0 < sync["rel"] <= 1e-9
    assert sync["reference/module"] == "CrossProcessBatchNorm1d"  # on the CPU; torch's SyncBatchNorm on CUDA
    assert {"stacked/bn/0", "stacked/bn/1", "reference/bn/0", "reference/bn/1"} <= set(sync)
    assert {"lab_loop", "default_step", "lab_config_training"} <= set(sections["timing"])
    assert {"K1", "K2", "K4", "K8"} <= set(sections["k_scaling"])


def test_the_benchmark_suite_collects():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "bench"), "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = proc.stdout
    for case in ("test_lab_loop_epoch", "test_train_epoch[default]", "test_bare_step_loop", "test_run_loop",
                 "test_full_evaluation", "test_data_preparation[cold]", "test_train_step[sync-bn-stacked-K32]",
                 "test_instrument_overhead[on]"):
        assert case in names, case


def test_ddp_scaling_picks_process_counts_that_fit_the_visible_gpus(monkeypatch):
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ddp_scaling
    finally:
        sys.path.pop(0)
    assert ddp_scaling.default_counts(gpu=False) == [1, 2]
    for gpus, want in ((1, [1]), (2, [1, 2]), (3, [1, 2]), (8, [1, 2, 4, 8])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda g=gpus: g)
        assert ddp_scaling.default_counts(gpu=True) == want
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(sys, "argv", ["ddp_scaling.py", "--gpu", "--nproc", "1,2"])
    try:
        ddp_scaling.main()
    except SystemExit as e:
        assert "--nproc 2 on 1 visible GPU(s)" in str(e)
    else:
        raise AssertionError("2 processes on 1 GPU were accepted")
