"""Sweeps on SLURM, against a real one-node SLURM 22.05 (slurm_cluster.py): the rows of the local executor,
a SIGKILLed sweep's jobs adopted by its rerun, a scancel'd job a failed unit that the rerun retries, and
a bad partition refused before any job. Units are tiny (one epoch of 10 steps): a job is mostly start-up."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bnbench.config import ConfigError
from bnbench.store.results import read_results
from bnbench.sweeps.runner import run_sweep
from bnbench.sweeps.plan import load_sweep

from conftest import REPO, mnist_root
from slurm_cluster import PARTITION, Cluster, ClusterUnavailable
from test_sweep import VOLATILE, events, write

SWEEP = f"""
[sweep]
executor = "slurm"
[slurm]
partition = "{PARTITION}"
time_min = 10
[fixed]
epochs = 1
seeds = [0, 1]
batch_size = 6000           # 10 steps an epoch
device = "cpu"
[grid]
case = [
    {{ lr = 1e-3 }},
    {{ lr = 1e-2 }},
    {{ lr = 3e-3, variants = ["nobn"] }},
    {{ nproc = 2, dp = 2, lr = 1e-3 }},    # 2-process DDP (gloo) under accelerate launch, in one job
]
"""
KEY = ["unit", "variant", "seed", "epoch"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except ClusterUnavailable as e:  # loud, never skipped: CI runs ./launch.sh test as root
        pytest.fail(str(e))
    yield c
    c.stop()


def bnbench(cluster: Cluster, *args, tmp: Path, timeout=300, **popen):
    env = cluster.env(BNBENCH_DATA_ROOT=str(mnist_root()), BNBENCH_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "bnbench", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, ready, seconds: float = 120, proc=None):
    until = time.monotonic() + seconds
    while not (value := ready()):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > until:
            pytest.fail(f"precondition violated: waited for {what}; the sweep "
                        f"{'exited with ' + str(proc.returncode) if proc is not None and proc.poll() is not None else 'runs'}")
        time.sleep(0.2)
    return value


def submitted(out: Path) -> list[dict]:
    path = out / "units.jsonl"
    return [e for e in events(out) if e["event"] == "submitted"] if path.exists() else []


def jobs(cluster: Cluster) -> dict[str, str]:
    return dict(line.split()[:2] for line in cluster.squeue())


# -- no cluster needed ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expect", [
    ("[slurm]\npartitions = 'a'\n", "slurm: unknown key 'partitions'; did you mean 'partition'?"),
    ("[slurm]\ntime_min = '10'\n", "slurm.time_min: expected a positive integer, got '10' (str)"),
    ("[slurm]\ngpus_per_node = -1\n", "slurm.gpus_per_node: expected a non-negative integer, got -1"),
    ("[slurm]\nmem_gb = true\n", "slurm.mem_gb: expected a positive number, got True (bool)"),
    ("[slurm]\nadditional = 'qos=high'\n", "slurm.additional: expected a table of sbatch options"),
    ("[slurm]\nadditional = { qos = ['a'] }\n", "slurm.additional.qos: expected a string, number or true"),
    ("[sweep]\nexecutor = 'slurmm'\n", "sweep.executor: unknown executor 'slurmm'; valid: local, slurm"),
])
def test_bad_slurm_table_names_the_key(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, text))
    assert expect in str(e.value)


def test_no_slurm_commands_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue, sinfo or srun
    with pytest.raises(ConfigError, match="needs SLURM's client commands; sbatch, squeue, sinfo, srun are not on PATH"
                                          r".*apt-get install slurm-client"):
        run_sweep(write(tmp_path, SWEEP), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- against the cluster ----------------------------------------------------------------------------
@pytest.mark.needs_root
@pytest.mark.needs_slurm
def test_a_missing_partition_is_refused_before_any_job(cluster, tmp_path):
    before = jobs(cluster)
    out = tmp_path / "out"
    p = bnbench(cluster, "sweep", write(tmp_path, SWEEP.replace(f'"{PARTITION}"', '"gpu"')), "--out", out, tmp=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"bnbench: error: slurm.partition: no partition 'gpu' on this cluster; partitions: {PARTITION}*" in p.stderr
    assert not out.exists() and set(jobs(cluster)) <= set(before)  # no folder, no job


@pytest.mark.needs_root
@pytest.mark.needs_slurm
def test_a_cancelled_job_is_a_failed_unit_and_the_rerun_retries_it(cluster, tmp_path):
    path = write(tmp_path, SWEEP.split("[grid]")[0] + "[grid]\nlr = [1e-2]\n")  # one unit
    out = tmp_path / "out"
    a = bnbench(cluster, "sweep", path, "--out", out, tmp=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (event,) = wait_for("the job's id in units.jsonl", lambda: submitted(out), proc=a)
        job, log = event["job_id"], Path(event["log"])
        # Cancelled while its unit runs: its log is there to name.
        wait_for("the job to run", lambda: jobs(cluster).get(job) == "RUNNING" and log.exists(), proc=a)
        subprocess.run(["scancel", job], env=cluster.env(), check=True)
        stdout, stderr = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 1, stderr
    failed = events(out)[-1]
    assert failed["event"] == "failed" and failed["job_id"] == job and failed["slurm_state"] == "CANCELLED", failed
    assert failed["reason"].startswith(f"SLURM job {job} CANCELLED") and failed["reason"].endswith(f"(log: {log})")
    assert f"failed: unit 1 (the one configuration): SLURM job {job} CANCELLED" in stdout
    s = bnbench(cluster, "status", out, tmp=tmp_path)
    assert "1 units; 0 done" in s.stdout and "1 failed" in s.stdout and f"SLURM job {job} CANCELLED" in s.stdout, s.stdout

    p = bnbench(cluster, "sweep", path, "--out", out, tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    again = submitted(out)
    assert len(again) == 2 and again[1]["job_id"] != job and events(out)[-1]["event"] == "done"
    rows, problems = read_results(out)
    assert problems == [] and len(rows) == 4 and set(rows["lr"]) == {1e-2}  # 2 seeds x 2 variants, once


@pytest.mark.needs_root
@pytest.mark.needs_slurm
def test_a_killed_sweep_leaves_its_jobs_the_rerun_adopts_them_and_rows_equal_the_local_executor(cluster, tmp_path):
    path = write(tmp_path, SWEEP)
    local = tmp_path / "local"
    assert run_sweep(path, out=local, data_root=mnist_root(), quiet=True, executor="local") == 0
    out = tmp_path / "slurm"
    a = bnbench(cluster, "sweep", path, "--out", out, tmp=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ids = [e["job_id"] for e in wait_for("4 job ids in units.jsonl", lambda: len(submitted(out)) == 4 and submitted(out), proc=a)]
        live = {j: s for j, s in jobs(cluster).items() if j in ids and s in ("PENDING", "RUNNING")}
        if not live:
            pytest.fail(f"precondition violated: no job queued or running at the kill: {jobs(cluster)}")
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    # The jobs outlived the sweep; status names them.
    after = jobs(cluster)
    assert all(after.get(j) in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED") for j in ids), after
    s = bnbench(cluster, "status", out, tmp=tmp_path)
    assert s.returncode == 0 and all(f"job {j}" in s.stdout for j in live), s.stdout
    assert any(f" {'queued' if st == 'PENDING' else 'running'} " in s.stdout for st in live.values()), s.stdout
    # One finishes while no sweep watches; rerun with others still queued or running.
    folder = out / "jobs" / "submitit"
    wait_for("a job to finish", lambda: list(folder.glob("*_result.pkl")))
    if not any(jobs(cluster).get(j) in ("PENDING", "RUNNING") for j in ids):
        pytest.fail(f"precondition violated: every job ended before the rerun: {jobs(cluster)}")
    p = bnbench(cluster, "sweep", path, "--out", out, tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("waiting for it") == 4, p.stderr
    # Every unit submitted once (the rerun adopted the recorded ids: 4 jobs in all) and done once.
    ev = events(out)
    assert len(list(folder.glob("*_submitted.pkl"))) == 4
    assert sorted(e["job_id"] for e in ev if e["event"] == "done") == sorted(ids)
    assert sorted(e["unit"] for e in ev if e["event"] == "done") == sorted(e["unit"] for e in submitted(out))
    rows, problems = read_results(out)
    reference, _ = read_results(local)
    assert problems == [] and not rows.duplicated(KEY).any() and len(rows) == len(reference) == 14
    # Row for row, bitwise on the CPU: metrics, config and unit ids; only attempt ids and timings differ.
    mine, theirs = (df.drop(columns=list(VOLATILE)).sort_values(KEY).reset_index(drop=True) for df in (rows, reference))
    pd.testing.assert_frame_equal(mine, theirs, check_exact=True)
    # The same layout line (2-process DDP) in each run's record, which the sweep's meta.json holds.
    def layouts(folder):
        runs = json.loads((folder / "meta.json").read_text())["runs"]
        return sorted(m["layout"] for m in runs.values())
    assert layouts(out) == layouts(local) and "2 processes: 1 seed group x dp 2 (4 members each)" in layouts(out)
