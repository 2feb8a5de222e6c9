"""DDP over 2 gloo processes against one-process torch, in float64; launching and faults.

The worker (tests/ddp_worker.py) runs under `accelerate launch` exactly as users
launch bnbench; this file trains the same cases in one process and compares.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from bnbench.config import ConfigError, make_config
from bnbench.distributed import shard
from bnbench.launch import free_port
from bnbench.engine import Trainer, epoch_permutation

from conftest import REPO, mnist_root, subset

VENV_BIN = Path(sys.executable).parent
N_TRAIN = 2400  # as in ddp_worker.py: 24 global batches of 100
TOL = 1e-10  # float64: DDP and one process differ only in summation order
COMMON = dict(seeds=[0, 1], dtype="float64", epochs=1)
CASES = {
    "stacked-adam-sync": dict(engine="stacked", optimizer="adam", sync_bn=True, **COMMON),
    "stacked-sgd-sync": dict(engine="stacked", optimizer="sgd", lr=0.05, momentum=0.9, sync_bn=True, **COMMON),
    "stacked-adam-local": dict(engine="stacked", optimizer="adam", variants=["bn"], **COMMON),
    "reference-adam-sync": dict(engine="reference", optimizer="adam", sync_bn=True, **COMMON),
    "reference-sgd-local": dict(engine="reference", optimizer="sgd", lr=0.05, momentum=0.9, variants=["nobn", "bn"], **COMMON),
}


def env_for(tmp: Path, **extra) -> dict:
    env = dict(os.environ, BNBENCH_DATA_ROOT=str(mnist_root()), BNBENCH_CACHE=str(tmp / "cache"), **extra)
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    cmd = [
        str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "ddp_worker.py"), str(tmp / "cases.json"), str(tmp),
    ]
    proc = subprocess.run(cmd, env=env_for(tmp, ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(mnist_cpu, accelerator):
    """The same cases trained by plain one-process torch (world size 1, whole batches)."""
    splits = subset(mnist_cpu["float64"], N_TRAIN, 10_000)
    out = {}
    for name, case in CASES.items():
        cfg = make_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in case.items()})
        trainer = Trainer(cfg, splits, accelerator)
        running, _ = trainer.train_epoch(1)
        out[name] = {"trainer": trainer, "states": {f"{v}/{s}": trainer.member_state(v, s) for v, s in trainer.members}, "running": running}
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_real_gloo_ranks(ddp):
    assert [r["world_size"] for r in ddp] == [2, 2] and [r["rank"] for r in ddp] == [0, 1]
    for r in ddp:
        for case in r["cases"].values():
            assert case["backend"] == "gloo" and case["local_batch"] == 50


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_split_every_global_batch_disjointly(ddp, name):
    # Rank 0 then rank 1 make up each global batch of the one-process permutation, exactly.
    seen = [r["cases"][name]["seen"] for r in ddp]
    steps, b = N_TRAIN // 100, 50
    for j, seed in enumerate(CASES[name]["seeds"]):
        joined = torch.cat([s[j].view(steps, b) for s in seen], 1).reshape(-1)
        assert torch.equal(joined, epoch_permutation(seed, 1, N_TRAIN)[: steps * 100])
        assert len(set(seen[0][j].tolist()) & set(seen[1][j].tolist())) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_matches_one_process(ddp, one_process, name):
    """no-BN, and BN with sync_bn, follow one process on the whole batch to 1e-10 after 24 steps;
    BN without sync normalises each half-batch alone and visibly departs (why SyncBN exists).

    Measured: <= 1e-15 everywhere except, with Adam, the Linear biases feeding a BN (and the
    running means they shift), ~3e-11: their true gradient is 0 (BN subtracts them out), so
    Adam turns rounding noise of ~1e-17 into steps of ~lr * 1e-17 / eps each."""
    mine, ref = ddp[0]["cases"][name], one_process[name]
    for member, state in ref["states"].items():
        diff = max_diff(mine["states"][member], state)
        synced = member.startswith("nobn") or CASES[name].get("sync_bn")
        print(f"{name} {member}: max |DDP - one process| = {diff:.2e}")  # shown with pytest -s
        if synced:
            assert diff <= TOL, f"{name} {member}: max |DDP - one process| = {diff:.3e} > {TOL}"
        else:
            assert diff > 1e-4, f"{name} {member}: unsynced BN should differ, max diff only {diff:.3e}"
    if all(m.startswith("nobn") or CASES[name].get("sync_bn") for m in ref["states"]):
        assert torch.allclose(mine["running"], ref["running"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_end_identical(ddp, name):
    # Parameters by DDP; BN running statistics by sync BN, or by the broadcast before evaluation.
    a, b = (r["cases"][name]["states"] for r in ddp)
    for member in a:
        for key in a[member]:
            assert torch.equal(a[member][key], b[member][key]), (name, member, key)


@pytest.mark.parametrize("name", ["stacked-adam-sync", "reference-sgd-local"])
def test_metrics_at_two_ranks_equal_one_process(ddp, one_process, name):
    """Each of the 10,000 test samples is scored once over the two ranks; the counts equal a
    one-process evaluation of the same weights, and both ranks hold the same numbers."""
    (l0, c0, n0), (l1, c1, n1) = (r["cases"][name]["test"] for r in ddp)
    assert n0 == n1 == 10_000
    assert torch.equal(c0, c1) and torch.equal(l0, l1)
    trainer = one_process[name]["trainer"]
    for member, state in ddp[0]["cases"][name]["states"].items():
        v, s = member.split("/")
        trainer.load_member_state(v, int(s), state)
    loss, correct, total = trainer.evaluate(trainer.splits.test_x, trainer.splits.test_y)
    assert total == 10_000
    assert torch.equal(correct, c0)
    assert torch.allclose(loss, l0, rtol=1e-12, atol=0)


def test_shards_cover_everything_once():
    for n in (0, 1, 7, 10_000, 10_001):
        for w in (1, 2, 3, 8):
            parts = [range(n)[shard(n, r, w)] for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_global_and_per_device_batch():
    assert make_config(batch_size=100).global_batch(2) == 100
    assert make_config(per_device_batch=30).global_batch(4) == 120
    with pytest.raises(ConfigError, match="global batch 100 does not split over 3 processes"):
        make_config(batch_size=100).global_batch(3)
    with pytest.raises(ConfigError, match="not both"):
        make_config(batch_size=100, per_device_batch=50)


# -- launching --------------------------------------------------------------------------
def read_rows(out: Path) -> pd.DataFrame:
    return pd.read_json(out / "results.jsonl", lines=True, precise_float=True)


def test_launch_sh_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [str(REPO / "launch.sh"), "--nproc", "2", "--cpu", "--main_process_port", str(free_port()),
           "--epochs", "1", "--seeds", "0", "--per-device-batch", "50", "--sync-bn", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 2 and set(rows.variant) == {"bn", "nobn"}  # rank 0 alone wrote
    assert (rows.world_size == 2).all() and (rows.backend == "gloo").all() and rows.sync_bn.all()
    assert (rows.batch_size == 100).all() and (rows.per_device_batch == 50).all()
    assert (rows.test_total == 10_000).all() and (rows.train_total == 60_000).all()
    meta = json.loads((out / "meta.json").read_text())
    (run,) = meta["runs"].values()
    assert run["status"] == "complete" and run["world_size"] == 2 and run["backend"] == "gloo"
    assert (out / "report" / "report.html").exists()


def test_silent_mode_is_refused_when_launched(tmp_path):
    # torchrun + a plain Accelerator() on a machine without GPUs: two lone processes.
    script = tmp_path / "silent.py"
    script.write_text(
        "import sys\nfrom accelerate import Accelerator\nfrom bnbench.config import make_config\n"
        "from bnbench.run import Setup, training_function\n"
        "training_function(make_config(epochs=1, seeds=(0,)), sys.argv[1], Setup(accelerator=Accelerator()), quiet=True)\n"
    )
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "the launcher started 2 processes but Accelerate sees 1" in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text()


def _pid_of_rank(tag: str, rank: int) -> int | None:
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"BNBENCH_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(p.name)
    return None


def test_a_killed_rank_ends_the_launch_and_keeps_completed_epochs(tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bnbench",
           "run", "--epochs", "50", "--seeds", "0", "--batch-size", "200", "--quiet", "--out", str(out)]
    launcher = subprocess.Popen(cmd, env=env_for(tmp_path, BNBENCH_TEST_TAG=tag), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        results = out / "results.jsonl"
        while not (results.exists() and results.read_text().count("\n") >= 2):  # epoch 1 written
            assert launcher.poll() is None, launcher.stdout.read()
            assert time.monotonic() < deadline, "no epoch completed in 300 s"
            time.sleep(0.2)
        victim = _pid_of_rank(tag, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        output, _ = launcher.communicate(timeout=120)  # bounded: a hang fails here
        ended = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert "rank      : 1" in output or "rank: 1" in output, output[-3000:]
    assert ended < 120
    rows = read_rows(out)  # every line parses: nothing torn
    epochs = rows.groupby("epoch").size()
    assert len(rows) >= 2 and (epochs == 2).all(), epochs  # whole epochs only, both members
    (run,) = json.loads((out / "meta.json").read_text())["runs"].values()
    assert run["status"] in ("failed", "interrupted") and run["error"], run


def test_process_group_setup_times_out(tmp_path):
    # Rank 0 of 2, and rank 1 never comes: a clear error after --dist-timeout, not a hang.
    env = env_for(tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    proc = subprocess.run([str(VENV_BIN / "bnbench"), "run", "--dist-timeout", "3", "--epochs", "1", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "bnbench [rank 0]: error: process-group set-up failed after at most 3 s" in proc.stderr
    assert "rank 0 of 2" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_a_batch_the_processes_cannot_split_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    cmd = [str(REPO / "launch.sh"), "--nproc", "2", "--cpu", "--main_process_port", str(free_port()),
           "--batch-size", "99", "--epochs", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "bnbench [rank 0]: error: global batch 99 does not split over 2 processes" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_text() == ""


def test_launch_sh_help_and_bad_nproc(tmp_path):
    proc = subprocess.run([str(REPO / "launch.sh"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--nproc N" in proc.stdout and "--per-device-batch" in proc.stdout
    for bad in (["--nproc", "0"], ["--nproc", "two"], ["--num_machines", "x"], ["--nproc"]):
        proc = subprocess.run([str(REPO / "launch.sh"), *bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "launch.sh: error:" in proc.stderr, (bad, proc.stderr)
