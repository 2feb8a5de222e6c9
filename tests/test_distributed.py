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
from bnbench.dist.groups import shard
from bnbench.dist.launch import free_port
from bnbench.train.engine import Trainer, epoch_permutation

from conftest import REPO, mnist_root, subset

VENV_BIN = Path(sys.executable).parent
N_TRAIN = 2400  # as in ddp_worker.py: 24 global batches of 100
TOL = 1e-10  # float64: DDP and one process differ only in summation order
COMMON = dict(seeds=[0, 1], dtype="float64", epochs=1)
# Data-parallel cases: float64, compared with one process to TOL.
CASES = {
    "stacked-adam-sync": dict(engine="stacked", optimizer="adam", sync_bn=True, **COMMON),
    "stacked-sgd-sync": dict(engine="stacked", optimizer="sgd", lr=0.05, momentum=0.9, sync_bn=True, **COMMON),
    "stacked-adam-local": dict(engine="stacked", optimizer="adam", variants=["bn"], **COMMON),
    "reference-adam-sync": dict(engine="reference", optimizer="adam", sync_bn=True, **COMMON),
    "reference-sgd-local": dict(engine="reference", optimizer="sgd", lr=0.05, momentum=0.9, variants=["nobn", "bn"], **COMMON),
    # Every normalization: BN's and Batch Renormalization's statistics over the data-parallel group
    # (BRN's limits relax within the 24 steps), the per-sample ones need nothing from the other rank.
    "stacked-norms-sync": dict(engine="stacked", optimizer="adam", sync_bn=True, variants=["bn", "nobn", "ln", "gn", "rms", "brn"],
                               brn_warmup=4, brn_r_full=16, brn_d_full=12, **COMMON),
    "reference-brn-sync": dict(engine="reference", optimizer="adam", sync_bn=True, variants=["brn", "ln"],
                               brn_warmup=4, brn_r_full=16, brn_d_full=12, **COMMON),
}
# Seed-group cases (dp 1): float32 as users run, compared with one process bitwise. 6 members
# on 2, 3 and 4 groups: stacks of 3, 2 and 1 members, and a group holding both variants.
MESH_CASES = {
    "groups-stacked-adam": dict(engine="stacked", optimizer="adam", sync_bn=True, seeds=[0, 1, 2], epochs=1, dp=1),
    "groups-reference-sgd": dict(engine="reference", optimizer="sgd", lr=0.05, momentum=0.9, seeds=[0, 1, 2], epochs=1, dp=1),
}
# What each launch trains: W = 2 is one DDP group; W = 4 with dp 2 is two DDP groups of two.
LAUNCHES = {
    2: {**{n: dict(c, dp=2) for n, c in CASES.items()}, **MESH_CASES},
    3: MESH_CASES,
    4: {**{n: dict(CASES[n], dp=2) for n in ("stacked-adam-sync", "stacked-adam-local", "reference-sgd-local")}, **MESH_CASES},
}


def env_for(tmp: Path, **extra) -> dict:
    env = dict(os.environ, BNBENCH_DATA_ROOT=str(mnist_root()), BNBENCH_CACHE=str(tmp / "cache"), **extra)
    env.pop("ACCELERATE_USE_CPU", None)
    return env


_launched: dict[int, list[dict]] = {}


def launched(world: int, tmp: Path) -> list[dict]:
    """Every rank's output of ddp_worker.py launched on `world` gloo processes (once per session)."""
    if world not in _launched:
        (tmp / "cases.json").write_text(json.dumps(LAUNCHES[world]))
        cmd = [
            str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(world),
            "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(REPO / "tests" / "ddp_worker.py"), str(tmp / "cases.json"), str(tmp),
        ]
        proc = subprocess.run(cmd, env=env_for(tmp, ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _launched[world] = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return _launched[world]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launched(2, tmp_path_factory.mktemp("ddp2"))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    return lambda world: launched(world, tmp_path_factory.mktemp(f"mesh{world}"))


def _train_one_process(cases: dict, splits, accelerator) -> dict:
    out = {}
    for name, case in cases.items():
        cfg = make_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in case.items()})
        trainer = Trainer(cfg, splits, accelerator)
        running, _ = trainer.train_epoch(1)
        members = [f"{v}/{s}" for v, s in trainer.members]
        out[name] = {"trainer": trainer, "states": {f"{v}/{s}": trainer.member_state(v, s) for v, s in trainer.members},
                     "running": dict(zip(members, running.tolist())), "test": trainer.evaluate(splits.test_x, splits.test_y)}
    return out


@pytest.fixture(scope="module")
def one_process(mnist_cpu, accelerator):
    """The data-parallel cases trained by plain one-process torch (world size 1, whole batches)."""
    return _train_one_process(CASES, subset(mnist_cpu["float64"], N_TRAIN, 10_000), accelerator)


@pytest.fixture(scope="module")
def one_process_mesh(mnist_cpu, accelerator):
    """The seed-group cases in one process, on one thread as each launched process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_one_process(MESH_CASES, subset(mnist_cpu["float32"], N_TRAIN, 10_000), accelerator)
    finally:
        torch.set_num_threads(threads)


def by_member(ranks: list[dict], name: str) -> dict:
    """Per member: what the first process of the group that trained it recorded."""
    out = {}
    for r in ranks:
        case = r["cases"][name]
        if case["dp_rank"] == 0:
            for member, state in case["states"].items():
                assert member not in out, f"{member} trained by two groups"
                out[member] = {"state": state, "running": case["running"][member], "group": case["seed_group"],
                               "correct": case["test"][1], "loss": case["test"][0], "members": list(case["states"])}
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_real_gloo_ranks(ddp):
    assert [r["world_size"] for r in ddp] == [2, 2] and [r["rank"] for r in ddp] == [0, 1]
    for r in ddp:
        for name in CASES:
            case = r["cases"][name]
            assert case["backend"] == "gloo" and case["local_batch"] == 50 and case["dp"] == 2


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_split_every_global_batch_disjointly(ddp, name):
    # Rank 0 then rank 1 make up each global batch of the one-process permutation, exactly.
    seen = [r["cases"][name]["seen"] for r in ddp]
    steps, b = N_TRAIN // 100, 50
    for j, seed in enumerate(CASES[name]["seeds"]):
        joined = torch.cat([s[j].view(steps, b) for s in seen], 1).reshape(-1)
        assert torch.equal(joined, epoch_permutation(seed, 1, N_TRAIN)[: steps * 100])
        assert len(set(seen[0][j].tolist()) & set(seen[1][j].tolist())) == 0


def _check_ddp_case(ranks: list[dict], one_process: dict, name: str) -> None:
    """no-BN, and BN with sync_bn, follow one process on the whole batch to 1e-10 after 24 steps;
    BN without sync normalises each half-batch alone and visibly departs (why SyncBN exists)."""
    mine, ref = by_member(ranks, name), one_process[name]
    assert mine.keys() == ref["states"].keys()
    for member, state in ref["states"].items():
        diff = max_diff(mine[member]["state"], state)
        synced = member.startswith("nobn") or CASES[name].get("sync_bn")
        print(f"{name} {member}: max |DDP - one process| = {diff:.2e}")  # shown with pytest -s
        if synced:
            assert diff <= TOL, f"{name} {member}: max |DDP - one process| = {diff:.3e} > {TOL}"
            assert abs(mine[member]["running"] - ref["running"][member]) <= TOL
        else:
            assert diff > 1e-4, f"{name} {member}: unsynced BN should differ, max diff only {diff:.3e}"


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_matches_one_process(ddp, one_process, name):
    """Measured: <= 1e-15 everywhere except, with Adam, the Linear biases feeding a BN (and the
    running means they shift), ~3e-11: their true gradient is 0 (BN subtracts them out), so
    Adam turns rounding noise of ~1e-17 into steps of ~lr * 1e-17 / eps each."""
    _check_ddp_case(ddp, one_process, name)


@pytest.mark.parametrize("name", ["stacked-adam-sync", "stacked-adam-local", "reference-sgd-local"])
def test_two_data_parallel_groups_of_two_each_match_one_process(launches, one_process, name):
    """W = 4, dp = 2: two DDP groups train half the members each; inside each group the DDP
    equalities hold, and the groups' collectives never meet."""
    ranks = launches(4)
    assert [r["cases"][name]["seed_group"] for r in ranks] == [0, 0, 1, 1]
    assert [r["cases"][name]["dp_rank"] for r in ranks] == [0, 1, 0, 1]
    _check_ddp_case(ranks, one_process, name)
    for g in (0, 1):  # the two processes of a group end with identical members
        a, b = (ranks[2 * g + i]["cases"][name]["states"] for i in (0, 1))
        assert a.keys() == b.keys() and all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", list(MESH_CASES))
def test_seed_groups_reproduce_one_process_bitwise(launches, ddp, one_process_mesh, world, name):
    """W seed groups of one process each train shares of the 6 members; every member's weights,
    BN statistics, running loss and test metrics are bitwise those of one process training all
    six (one thread each), whatever group and stack size it landed in."""
    ranks = ddp if world == 2 else launches(world)
    mine, ref = by_member(ranks, name), one_process_mesh[name]
    assert mine.keys() == ref["states"].keys()
    sizes = {g: len(next(m for m in mine.values() if m["group"] == g)["members"]) for g in range(world)}
    assert sorted(sizes.values(), reverse=True) == [6 // world + (g < 6 % world) for g in range(world)]
    order = list(ref["states"])
    for member, state in ref["states"].items():
        got = mine[member]
        for key in state:
            assert torch.equal(got["state"][key], state[key]), (world, name, member, key)
        assert got["running"] == ref["running"][member], (world, name, member)
        i, j = got["members"].index(member), order.index(member)
        assert got["correct"][i] == ref["test"][1][j] and got["loss"][i] == ref["test"][0][j]


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
    with pytest.raises(ConfigError, match="global batch 100 does not split over 3 data-parallel processes"):
        make_config(batch_size=100).global_batch(3)
    with pytest.raises(ConfigError, match="not both"):
        make_config(batch_size=100, per_device_batch=50)


# -- launching --------------------------------------------------------------------------
def read_rows(out: Path) -> pd.DataFrame:
    return pd.read_json(out / "results.jsonl", lines=True, precise_float=True)


def test_launch_sh_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [str(REPO / "launch.sh"), "--nproc", "2", "--cpu", "--main_process_port", str(free_port()),
           "--epochs", "1", "--seeds", "0", "--per-device-batch", "300", "--dp", "2", "--sync-bn", "--quiet", "--out", str(out)]
    # --per-device-batch 300: 100 steps of sync BN over gloo, not 600; what is checked holds for any batch
    proc = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch.sh: 2 processes: 1 seed group x dp 2 (2 members each)" in proc.stderr
    rows = read_rows(out)
    assert len(rows) == 2 and set(rows.variant) == {"bn", "nobn"}  # rank 0 alone wrote
    assert (rows.world_size == 2).all() and (rows.backend == "gloo").all() and rows.sync_bn.all()
    assert (rows.dp == 2).all() and (rows.seed_groups == 1).all() and (rows.seed_group == 0).all()
    assert (rows.batch_size == 600).all() and (rows.per_device_batch == 300).all()
    assert (rows.test_total == 10_000).all() and (rows.train_total == 60_000).all()
    meta = json.loads((out / "meta.json").read_text())
    (run,) = meta["runs"].values()
    assert run["status"] == "complete" and run["world_size"] == 2 and run["backend"] == "gloo"
    assert run["dp"] == 2 and run["seed_groups"] == 1 and run["layout"] == "2 processes: 1 seed group x dp 2 (2 members each)"
    assert (out / "report" / "report.html").exists()


SAME = ["variant", "seed", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "train_correct",
        "test_correct", "train_total", "test_total", "train_loss_running", "diverged", "batch_size", "lr", "members"]


def test_main_job_on_eight_processes_equals_one_process(tmp_path, accelerator, data_root):
    """./launch.sh on 8 devices (CPU processes here): 8 seed groups of the lab's 10 members
    (2,2,1,1,1,1,1,1), one results file written by rank 0, every member's numbers bitwise
    those of one process on one thread (each launched process has one). --sync-bn with dp 1
    is said to change nothing, and the one-process run without it shows that it does not."""
    from bnbench.training import Setup, training_function

    out = tmp_path / "eight"
    cmd = [str(REPO / "launch.sh"), "--nproc", "8", "--cpu", "--epochs", "1", "--sync-bn", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch.sh: 8 processes: 8 seed groups x dp 1 (members per group 2,2,1,1,1,1,1,1)" in proc.stderr
    assert "launch.sh: --sync-bn with dp 1: each process holds its members' whole batch" in proc.stderr  # and changes nothing:
    rows = read_rows(out)
    assert len(rows) == 10 and (rows.world_size == 8).all() and (rows.dp == 1).all() and (rows.seed_groups == 8).all()
    assert rows.seed_group.tolist() == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7]  # bn 0-4 then nobn 0-4
    assert rows.samples_per_s.nunique() == 1 and rows.train_seconds.nunique() == 1  # the run's, not a group's
    assert rows.run_id.nunique() == 1 and rows.unit.nunique() == 1  # one run, whichever group trained a member
    (run,) = json.loads((out / "meta.json").read_text())["runs"].values()
    assert run["status"] == "complete" and run["members_per_group"] == [2, 2, 1, 1, 1, 1, 1, 1]
    assert (out / "report" / "report.html").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training_function(make_config(epochs=1), tmp_path / "one", Setup(data_root=str(data_root), accelerator=accelerator),
                          quiet=True)
    finally:
        torch.set_num_threads(threads)
    one = read_rows(tmp_path / "one")
    pd.testing.assert_frame_equal(rows[SAME], one[SAME], check_exact=True)


def test_two_machines_on_loopback(tmp_path):
    """--num_machines 2, both machine ranks on 127.0.0.1: one seed group per machine; machine 0's
    rank 0 writes every row, machine 1 writes nothing."""
    port = str(free_port())
    procs = []
    for machine in (0, 1):
        cmd = [str(REPO / "launch.sh"), "--nproc", "1", "--cpu", "--num_machines", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--dist-timeout", "120",
               "--epochs", "1", "--seeds", "0,1", "--batch-size", "600", "--quiet", "--out", str(tmp_path / f"m{machine}")]
        procs.append(subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "2 processes: 2 seed groups x dp 1 (2 members each); 1 per machine x 2 machine(s)" in outputs[0]
    rows = read_rows(tmp_path / "m0")
    assert len(rows) == 4 and (rows.world_size == 2).all() and rows.seed_group.tolist() == [0, 0, 1, 1]
    assert rows.run_id.nunique() == 1
    assert not (tmp_path / "m1").exists()


def _with_port(port: str) -> list[int]:
    """Processes whose command line names this port: a launch's launcher (and agents)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and port.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def test_lost_machine_other_settings_and_a_killed_launch_end_cleanly(tmp_path):
    """Issue 19. A: machine 0 alone ends after --dist-timeout with one line (it waited silently until
    killed). B: two machines started with different --epochs stop right after set-up, both naming
    the difference, nothing written (rank 0 used to finish and hang). C: launch.sh killed with
    SIGKILL while its launcher waits takes the launcher down (its agent used to keep the port).
    Issue 29: A, B and D (machines started with different --nproc) say so in bnbench's one line, without
    torch-elastic's tracebacks (B, D: exit status 2, the settings refused), and leave no empty results folder."""
    def machine(tag, rank, port, timeout, epochs=1, nproc=1):
        cmd = [str(REPO / "launch.sh"), "--nproc", str(nproc), "--cpu", "--num_machines", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--dist-timeout", str(timeout),
               "--epochs", str(epochs), "--seeds", "0", "--quiet", "--out", str(tmp_path / tag)]
        return subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    a_port, b_port, c_port, d_port = (str(free_port()) for _ in range(4))
    launches = {"A": machine("A", 0, a_port, 5), "B0": machine("B0", 0, b_port, 300),
                "B1": machine("B1", 1, b_port, 300, epochs=2), "C": machine("C", 0, c_port, 300),
                "D0": machine("D0", 0, d_port, 300), "D1": machine("D1", 1, d_port, 300, nproc=2)}
    try:
        deadline = time.monotonic() + 300
        while not [p for p in _with_port(c_port) if p != launches["C"].pid]:  # C's launcher has started
            assert time.monotonic() < deadline and launches["C"].poll() is None
            time.sleep(0.2)
        launches["C"].kill()  # SIGKILL to launch.sh (it execs bnbench's main job)
        while _with_port(c_port):
            assert time.monotonic() < deadline, f"launcher outlived launch.sh: {_with_port(c_port)}"
            time.sleep(0.2)
        outputs = {k: p.communicate(timeout=300)[0] for k, p in launches.items()}
    finally:
        for p in launches.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert launches["A"].returncode == 1, outputs["A"]
    lines = outputs["A"].splitlines()  # no traceback of the launcher's rendezvous
    assert len(lines) == 2 and lines[1].startswith(f"bnbench: error: the machines did not meet at 127.0.0.1:{a_port} "
                                                   "within --dist-timeout 5 s: only 1 of 2 machines joined"), outputs["A"]
    why = {"B": "rank 1 started with other settings than rank 0: rank 1: epochs = 2 (rank 0: 1). Start every machine "
                "with the same options.",
           "D": "ranks 1, 2 started with --nproc 2 --num_machines 2, rank 0 with --nproc 1 --num_machines 2: start every "
                "machine with the same --nproc and --num_machines"}
    for tag in ("B0", "B1", "D0", "D1"):
        assert launches[tag].returncode == 2, outputs[tag]
        lines = outputs[tag].splitlines()  # the layout as this machine sees it, then why it stopped
        assert len(lines) == 2 and lines[1] == f"bnbench: error: {why[tag[0]]}", outputs[tag][-3000:]
        assert not (tmp_path / tag).exists()  # nothing written, nothing left (machine 1's never made one)


def test_silent_mode_is_refused_when_launched(tmp_path):
    # torchrun + a plain Accelerator() on a machine without GPUs: two lone processes.
    script = tmp_path / "silent.py"
    script.write_text(
        "import sys\nfrom accelerate import Accelerator\nfrom bnbench.config import make_config\n"
        "from bnbench.training import Setup, training_function\n"
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


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2", "--dp", "2", "--batch-size", "99"], "bnbench: error: global batch 99 does not split over 2 data-parallel processes"),
    (["--nproc", "3", "--seeds", "0", "--variants", "bn"], "bnbench: error: no layout of 3 processes fits 1 member "),
    (["--nproc", "4", "--dp", "3"], "bnbench: error: --dp 3 does not divide the 4 processes"),
    (["--nproc", "8", "--dp", "2", "--seeds", "0"], "bnbench: error: 8 processes with --dp 2 make 4 seed groups, more than the 2 members"),
    (["--nproc", "2", "--bogus"], "bnbench: error: unrecognized arguments: --bogus"),
])
def test_what_can_fail_before_launch_fails_there_in_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    proc = subprocess.run([str(REPO / "launch.sh"), "--cpu", *args, "--epochs", "1", "--out", str(out)],
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and errors[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "accelerate" not in proc.stderr.lower() and not out.exists()


def test_launch_sh_help_and_bad_nproc(tmp_path):
    proc = subprocess.run([str(REPO / "launch.sh"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--nproc N" in proc.stdout and "--per-device-batch" in proc.stdout
    for bad in (["--nproc", "0"], ["--nproc", "two"], ["--num_machines", "x"], ["--nproc"]):
        proc = subprocess.run([str(REPO / "launch.sh"), *bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "launch.sh: error:" in proc.stderr, (bad, proc.stderr)
