"""Sweeps: the file, unit identity, resumption without duplicates, SIGKILL, torn files, locking."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bnbench import cli
from bnbench.config import ConfigError, make_config, run_argv
from bnbench.store.folder import FolderBusy, FolderLock, move_rows_aside, repair_tail
from bnbench.store.results import ResultsWriter, read_results
from bnbench.sweeps.runner import run_sweep
from bnbench.sweeps.plan import example, load_sweep, plan

from conftest import REPO, mnist_root

# Columns that differ between two runs of the same unit: who ran it, when, how fast.
VOLATILE = {"run_id", "time", "train_seconds", "samples_per_s", "variant_samples_per_s", "peak_rss_mb", "peak_gpu_mb"}

ROW = {"run_id": "r", "variant": "bn", "seed": 0, "epoch": 1, "test_acc": 0.5, "diverged": False}  # what readers need


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sweep_cli(*args, tmp: Path, timeout=600, **popen):
    env = dict(os.environ, BNBENCH_DATA_ROOT=str(mnist_root()), BNBENCH_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "bnbench", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def stable(rows: pd.DataFrame) -> list[dict]:
    """Rows without the columns that name the attempt or time it, in file order."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows.to_dict("records")]


# -- the sweep file ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expect",
    [
        ("[fixed]\nepochz = 3\n", "fixed: unknown key 'epochz'; did you mean 'epochs'?"),
        ("[grid]\nlr = [1e-3]\nbatchsize = [100]\n", "grid: unknown key 'batchsize'; did you mean 'batch_size'?"),
        ("[sweep]\nseed_per_unit = 2\n", "sweep: unknown key 'seed_per_unit'; did you mean 'seeds_per_unit'?"),
        ("[grids]\nlr = [1]\n", "unknown key 'grids'; did you mean 'grid'?"),
        ("[grid]\noptim = [{ optimizer = 'sgd', momentun = 0.9 }]\n", "grid.optim[0]: unknown key 'momentun'; did you mean 'momentum'?"),
        ("[fixed]\nepochs = '3'\n", "fixed.epochs: expected an integer, got '3' (str)"),
        ("[fixed]\nepochs = 3.5\n", "fixed.epochs: expected an integer, got 3.5 (float)"),
        ("[grid]\nlr = [1e-3, '0.1']\n", "grid.lr[1]: expected a number, got '0.1' (str)"),
        ("[grid]\nsync_bn = [0, 1]\n", "grid.sync_bn[0]: expected true or false, got 0 (int)"),
        ("[grid]\nhidden = [32]\n", "grid.hidden[0]: expected a list of integers, got 32 (int)"),
        ("[grid]\nlr = 0.1\n", "grid.lr: expected a list of values to try, got 0.1"),
        ("[grid]\nlr = []\n", "grid.lr is an empty list: give at least one value"),
        ("[grid]\nseeds = [[0], [1]]\n", "grid.seeds: seeds belong in [fixed]"),
        ("[grid]\nlr = [0.1]\noptim = [{ optimizer = 'sgd', lr = 0.2 }]\n", "grid.optim and grid.lr both set lr"),
        ("[grid]\ndevice = ['gpu']\n", "grid.device[0]: unknown device 'gpu'; valid: auto, cpu, cuda"),
        ("[grid]\nnproc = [0]\n", "grid.nproc[0]: nproc must be at least 1"),
        ("[sweep]\nrepeats = 0\n", "sweep.repeats: expected a positive integer, got 0"),
        ("[fixed]\nseeds = '3-1'\n", "fixed.seeds: malformed --seeds '3-1'"),
        ("[fixed\nepochs = 3\n", "not valid TOML"),
        ("grid = 3\n", "grid must be a table"),
    ],
)
def test_bad_sweep_file_names_the_key(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, text))
    assert expect in str(e.value)


def test_bad_sweep_file_on_the_command_line(tmp_path):
    p = sweep_cli("sweep", write(tmp_path, "[grid]\nlr = []\n"), tmp=tmp_path)
    assert p.returncode == 2 and "bnbench: error: grid.lr is an empty list" in p.stderr and "Traceback" not in p.stderr
    p = sweep_cli("sweep", tmp_path / "missing.toml", tmp=tmp_path)
    assert p.returncode == 2 and "cannot read sweep file" in p.stderr


def test_example_prints_and_plans(tmp_path):
    p = sweep_cli("sweep", "--example", tmp=tmp_path)
    assert p.returncode == 0 and p.stdout == example()
    path = write(tmp_path, p.stdout, "example.toml")
    units = plan(load_sweep(path), cuda_available=False)
    # batch_size x optim = 4 units of 5 seeds x {bn, nobn}, each valid.
    assert len(units) == 4 and all(u.error is None and len(u.config.seeds) == 5 for u in units)
    assert {(u.config.batch_size, u.config.optimizer, u.config.lr, u.config.momentum) for u in units} == {
        (100, "adam", 1e-3, 0.0), (500, "adam", 1e-3, 0.0), (100, "sgd", 0.1, 0.9), (500, "sgd", 0.1, 0.9)}
    p = sweep_cli("sweep", path, "--dry-run", "--out", tmp_path / "o", tmp=tmp_path)
    assert p.returncode == 0 and "4 units (dry run" in p.stdout and not (tmp_path / "o").exists()
    # The sweep file of docs/sweeps.md is valid, and plans the same units as the example.
    readme = (REPO / "docs" / "sweeps.md").read_text()
    snippet = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    same = plan(load_sweep(write(tmp_path, snippet, "readme.toml")), cuda_available=False)
    assert [u.id for u in same] == [u.id for u in units]


def test_launch_sh_sweep_is_bnbench_sweep(tmp_path):
    p = subprocess.run([str(REPO / "launch.sh"), "sweep", "--example"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout == example(), p.stderr


def test_plan_chunks_seeds_repeats_and_flags_invalid(tmp_path):
    path = write(tmp_path, """
[sweep]
seeds_per_unit = 2
repeats = 2
[fixed]
seeds = "0-4"
[grid]
nproc = [1, 3]
device = ["cpu", "cuda"]
""")
    units = plan(load_sweep(path), cuda_available=False)
    assert len(units) == 2 * 2 * 3 * 2
    ok = [u for u in units if u.error is None]
    # 3 processes: 3 seed groups for 2 seeds' 4 members; the last chunk's 2 members fit no layout.
    assert len(ok) == 10 and all(u.device == "cpu" for u in ok) and sum(u.nproc == 3 for u in ok) == 4
    one = [u for u in ok if u.nproc == 1]
    assert [u.config.seeds for u in one[::2]] == [(0, 1), (2, 3), (4,)] and [u.config.repeat for u in one[:2]] == [0, 1]
    reasons = {u.error for u in units if u.error}
    assert reasons == {'no layout of 3 processes fits 2 members (1 seed x 2 variants) with global batch 100: seed groups need a member each, and a data-parallel group must split the batch. Try --seeds 0-1 (3 seed groups x dp 1), or fewer processes',
                       "device cuda: no CUDA device is visible on this machine"}
    assert len({u.id for u in units}) == len(units)  # every unit, valid or not, has its own id
    assert [u.id for u in plan(load_sweep(path), cuda_available=False)] == [u.id for u in units]


# -- unit identity ---------------------------------------------------------------------------
def test_unit_id_covers_what_changes_results():
    base = make_config()
    uid = base.unit_id(1, "cpu", "2.14.1")
    # Pinned: a change here reruns every unit of every user's sweeps. Change it on purpose only.
    assert uid == "5b51dedcde9219df"  # training code 2 (aligned stacked parameters); was a4f8b3eefd2eb4ff
    # A launch that is one DDP group keeps the id it had before seed groups; seed groups get their own.
    assert base.unit_id(2, "cpu", "2.14.1", dp=2) == base.unit_id(2, "cpu", "2.14.1")
    assert base.unit_id(2, "cpu", "2.14.1", dp=1) != base.unit_id(2, "cpu", "2.14.1")
    # One spelling per value: lr 1 is lr 1.0; --cpu is the device kind, which is already in the id.
    assert make_config(lr=1).unit_id(1, "cpu", "2.14.1") == make_config(lr=1.0).unit_id(1, "cpu", "2.14.1")
    assert make_config(cpu=True).unit_id(1, "cpu", "2.14.1") == uid
    changed = [make_config(lr=2e-3), make_config(seeds=(0, 1)), make_config(epochs=3), make_config(sync_bn=True),
               make_config(dtype="float64"), make_config(hidden=(64,)), make_config(per_device_batch=100),
               make_config(repeat=1), make_config(engine="reference"), make_config(dataset="fashion-mnist"),
               make_config(bn_drop_bias=True), make_config(eval_every=100), make_config(instrument=True),
               make_config(instrument=True, instrument_every=10), make_config(instrument=True, ics_etas=(0.1,))]
    ids = {c.unit_id(1, "cpu", "2.14.1") for c in changed} | {base.unit_id(2, "cpu", "2.14.1"),
                                                               base.unit_id(1, "cuda", "2.14.1"), base.unit_id(1, "cpu", "2.15.0")}
    assert uid not in ids and len(ids) == len(changed) + 3


@pytest.mark.parametrize("overrides", [
    {}, dict(optimizer="sgd", lr=0.1, momentum=0.9, per_device_batch=50, sync_bn=True, repeat=2),
    dict(hidden=(100, 100, 100), activation="sigmoid", seeds=(3, 7), variants=("nobn",), engine="reference",
         dtype="float64", cpu=True, compile=True, tf32=True, eval_batch=1000, lr=1 / 3, dataset="fashion-mnist"),
    dict(preset="ioffe2015", instrument=True, instrument_every=7, ics_every=30, ics_etas=(0.01, 1 / 3), eval_every=250),
    dict(preset="deep", bn_drop_bias=False, eval_every=1000),
])
def test_run_argv_rebuilds_the_config(overrides):
    import dataclasses

    from bnbench.config import Config

    cfg = make_config(**overrides)
    args = cli.build_parser().parse_args(["run", *run_argv(cfg)])
    # Every field but the preset's name comes back from the options alone.
    again = make_config(args.preset, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name != "preset"})
    assert again == cfg


# -- results files: repair and moving rows aside -----------------------------------------------
def test_torn_tail_repaired_and_rows_moved_not_lost(tmp_path):
    with ResultsWriter(tmp_path) as w:
        w.append([{**ROW, "run_id": "a", "unit": "u1", "i": i} for i in range(3)] + [{**ROW, "run_id": "b", "unit": "u2", "i": 3}])
    path = tmp_path / "results.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"run_id": "a", "unit": "u1", "i": 9')  # torn by a crash mid-write
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(2, b"\x00garbage\n")  # a corrupt line in the middle
    path.write_bytes(b"".join(lines))
    _, problems = read_results(tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["unparsable line (Expecting value", "torn last line (interrupted write)"]
    assert "results.jsonl:3:" in problems[0] and "results.jsonl:6:" in problems[1]
    message = repair_tail(tmp_path)
    assert "results.jsonl:6: torn last line" in message and "torn.log" in message
    assert b'"i": 9' in (tmp_path / "torn.log").read_bytes() and path.read_bytes().endswith(b"\n")
    # A whole row that only lacks its newline is kept, not moved.
    with open(path, "ab") as f:
        f.write(json.dumps({**ROW, "run_id": "c", "unit": "u3", "i": 5}).encode())
    assert repair_tail(tmp_path) is None and read_results(tmp_path)[0]["i"].tolist() == [0, 1, 2, 3, 5]
    moved = move_rows_aside(tmp_path, lambda r: r["unit"] == "u1")
    assert moved == {"a": 3}
    df, problems = read_results(tmp_path)
    assert df["i"].tolist() == [3, 5] and len(problems) == 1 and "results.jsonl:1: unparsable" in problems[0]
    aside = (tmp_path / "superseded" / "a.jsonl").read_text().splitlines()
    assert [json.loads(x)["i"] for x in aside] == [0, 1, 2]
    assert move_rows_aside(tmp_path, lambda r: r["unit"] == "u1") == {}  # idempotent


def test_a_lone_writer_repairs_a_torn_tail(tmp_path):
    with ResultsWriter(tmp_path) as w:
        w.append([{**ROW, "i": 0}])
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"i": 1, "x"')
    with ResultsWriter(tmp_path) as w:
        w.append([{**ROW, "i": 2}])
    df, problems = read_results(tmp_path)
    assert problems == [] and df["i"].tolist() == [0, 2]
    assert b'{"i": 1, "x"' in (tmp_path / "torn.log").read_bytes()


def test_folder_lock_exclusive_and_shared(tmp_path):
    with FolderLock(tmp_path) as sweep:
        sweep.exclusive("sweep")
        with FolderLock(tmp_path) as other:
            with pytest.raises(FolderBusy, match=r"in use by bnbench sweep \(pid \d+ on .*, since"):
                other.exclusive("sweep", wait_s=0.1)
            with pytest.raises(FolderBusy):
                other.shared(wait_s=0.1)
            assert other.is_held()
        with pytest.raises(FolderBusy, match="in use by bnbench sweep"):
            ResultsWriter(tmp_path)  # a plain run into a sweep's folder
        ResultsWriter(tmp_path, hold_lock=False).close()  # the sweep's own units
    with ResultsWriter(tmp_path) as a, ResultsWriter(tmp_path) as b:  # plain runs share a folder
        a.append([{"i": 0}])
        b.append([{"i": 1}])
        with FolderLock(tmp_path) as sweep:
            with pytest.raises(FolderBusy):
                sweep.exclusive("sweep", wait_s=0.1)
        a.close()
        # b's upgrade was refused while a shared the folder; it must still hold its share. The
        # refusal does not name the sweep of before, which has let go.
        with FolderLock(tmp_path) as sweep:
            with pytest.raises(FolderBusy, match="in use by bnbench run"):
                sweep.exclusive("sweep", wait_s=0.1)


# -- sweeps end to end -------------------------------------------------------------------------
SMALL = """
[sweep]
seeds_per_unit = 1
[fixed]
epochs = 1
seeds = [0, 1]
batch_size = 500            # 120 steps an epoch; 3 processes cannot split it
[grid]
lr = [1e-3, 1e-2]
nproc = [1, 3]
"""


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "units.jsonl").read_text().splitlines()]


def test_sweep_records_failures_resumes_and_runs_only_new_units(tmp_path, capsys):
    from bnbench.sweeps.runner import export, status

    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    assert run_sweep(path, out=out, data_root=mnist_root()) == 1  # exit status: something failed
    planned = json.loads((out / "plan.json").read_text())["units"]
    valid = [u["id"] for u in planned if not u["error"]]
    assert len(planned) == 8 and len(valid) == 4
    rows, problems = read_results(out)
    assert problems == [] and len(rows) == 4 * 2 and sorted(set(rows["unit"])) == sorted(valid)
    assert {(r["lr"], r["seed"]) for r in rows.to_dict("records")} == {(lr, s) for lr in (1e-3, 1e-2) for s in (0, 1)}
    first = events(out)
    assert sorted(e["event"] for e in first) == ["done"] * 4 + ["failed"] * 4 + ["start"] * 4
    assert {e["reason"] for e in first if e["event"] == "failed"} == {
        'no layout of 3 processes fits 2 members (1 seed x 2 variants) with global batch 500: seed groups need a member each, and a data-parallel group must split the batch. Try --seeds 0-1 (3 seed groups x dp 1), or fewer processes'}
    summary = capsys.readouterr().out
    assert "4 of 8 units done (4 now), 4 failed" in summary and "failed: unit 3 lr=0.001 nproc=3 seeds=0" in summary
    assert status(out) == 0
    text = capsys.readouterr().out
    assert "8 units; 4 done, 4 failed, 0 left" in text and "no layout of 3 processes fits 2 members" in text

    # Rerun: nothing done runs again, no row is added, the failures are reported again.
    before = (out / "results.jsonl").read_bytes()
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 1
    assert (out / "results.jsonl").read_bytes() == before
    assert [e["event"] for e in events(out)[len(first):]] == ["failed"] * 4

    # One grid value changed: only its units run; the old ones stay in the results.
    write(tmp_path, SMALL.replace("lr = [1e-3, 1e-2]", "lr = [1e-3, 3e-3]").replace("nproc = [1, 3]", "nproc = [1]"))
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 0
    rows, problems = read_results(out)
    assert problems == [] and len(rows) == 6 * 2 and (out / "results.jsonl").read_bytes().startswith(before)
    started = [e for e in events(out) if e["event"] == "start"]
    assert len(started) == 4 + 2 and {e["label"] for e in started[4:]} == {"lr=0.003 seeds=0", "lr=0.003 seeds=1"}
    assert not rows.duplicated(["unit", "variant", "seed", "epoch"]).any()

    # A corrupted line in the middle: reported with its number by status, sweep and export, and
    # kept; the unit whose row it was is no longer whole, so it alone runs again.
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    broken = json.loads(lines[2])
    lines[2] = lines[2][:40] + b"\x00\n"
    (out / "results.jsonl").write_bytes(b"".join(lines))
    assert status(out) == 0
    assert "1 problem lines (left in place, not counted)" in capsys.readouterr().out
    n = len(events(out))
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 0
    assert "results.jsonl:3: unparsable line" in capsys.readouterr().err
    assert [e["unit"] for e in events(out)[n:]] == [broken["unit"]] * 2  # start, done
    rows, problems = read_results(out)
    assert len(rows) == 6 * 2 and len(problems) == 1 and b"\x00" in (out / "results.jsonl").read_bytes()
    assert not rows.duplicated(["unit", "variant", "seed", "epoch"]).any()

    # Export: one flat table, every value as in results.jsonl.
    for fmt in ("csv", "parquet"):
        dest = export(out, fmt)
        back = pd.read_csv(dest) if fmt == "csv" else pd.read_parquet(dest)
        assert dest.name == f"results.{fmt}" and list(back.columns) == list(rows.columns)
        for col in ("test_acc", "test_loss", "train_loss", "lr", "unit", "seed", "diverged"):
            assert back[col].tolist() == rows[col].tolist(), (fmt, col)


def test_failed_and_diverged_units_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    from bnbench.sweeps.runner import status

    path = write(tmp_path, """
[fixed]
epochs = 1
seeds = [0]
variants = ["nobn"]
[grid]
case = [
    { nproc = 2, batch_size = 70000 },                    # invalid: what its ranks would refuse, refused at plan time
    { optimizer = "sgd", lr = 1e12, batch_size = 6000 },  # every member diverges
    { optimizer = "adam", momentum = 0.9 },               # invalid: momentum is for SGD
    { batch_size = 6000 },                                # fine
]
""")
    out = tmp_path / "out"
    assert run_sweep(path, out=out, data_root=mnist_root()) == 1
    text = capsys.readouterr().out
    assert "2 of 4 units done (2 now), 2 failed, 1 with every member diverged" in text
    assert "failed: unit 1 case=nproc=2,batch_size=70000: global batch 70000 exceeds the 60000 training samples\n" in text
    assert "failed: unit 3 case=optimizer=adam,momentum=0.9: momentum applies to --optimizer sgd only" in text
    assert "diverged: unit 2 case=optimizer=sgd,lr=1e+12,batch_size=6000: every member's loss became NaN/inf (rows kept)" in text
    rows, _ = read_results(out)
    assert len(rows) == 2 and rows.loc[rows["lr"] == 1e12, "diverged"].all() and not rows.loc[rows["lr"] == 1e-3, "diverged"].any()
    assert status(out) == 0
    assert "4 units; 1 done, 2 failed, 0 left, 1 diverged" in capsys.readouterr().out
    first = len(events(out))
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 1  # divergence is a result: not rerun
    assert {e["index"] for e in events(out)[first:]} == {1, 3}


def test_status_of_a_folder_of_plain_runs(tmp_path, capsys):
    from bnbench.store.record import update_meta
    from bnbench.sweeps.runner import status

    with ResultsWriter(tmp_path) as w:
        w.append([{**ROW, "run_id": "r1", "epoch": 1}, {**ROW, "run_id": "r1", "epoch": 1}])
    update_meta(tmp_path, "r1", {"status": "complete", "config": {"epochs": 1}})
    update_meta(tmp_path, "r2", {"status": "failed", "config": {"epochs": 3}, "error": "RuntimeError: boom"})
    assert status(tmp_path) == 0
    text = capsys.readouterr().out
    assert "2 runs (no sweep plan here)" in text and "RuntimeError: boom" in text
    assert [line.split()[:3] for line in text.splitlines()[2:4]] == [["r1", "complete", "2"], ["r2", "failed", "0"]]
    with pytest.raises(ConfigError, match="no results folder"):
        status(tmp_path / "nothing")


def test_progress_bars_on_a_terminal_plain_lines_in_logs(tmp_path, monkeypatch, capsys):
    import io

    from bnbench.sweeps.runner import Progress

    units = plan(load_sweep(write(tmp_path, SMALL)), cuda_available=False)
    ok, bad = units[0], units[2]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, quiet in ((True, False), (False, False), (False, True)):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        p = Progress(2, quiet)
        p.start(ok)
        p.epoch(1)
        p.end("done", "1.0 s")
        p.start(bad)
        p.end("failed", bad.error)
        p.close()
        text = err.getvalue()
        if tty:
            assert p.mode == "bars" and "sweep: 100%" in text and "2/2" in text
        elif quiet:
            assert p.mode == "quiet" and "started" not in text and "epoch" not in text
            assert "[2/2] unit 3 lr=0.001 nproc=3 seeds=0: failed: no layout of 3 processes" in text
        else:
            assert p.mode == "lines" and "[1/2] unit 1 lr=0.001 nproc=1 seeds=0: epoch 1/1" in text
            assert "[1/2] unit 1 lr=0.001 nproc=1 seeds=0: done: 1.0 s" in text


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_second_sweep_refused_and_a_killed_sweep_takes_its_ranks_down(tmp_path):
    # Sweep A runs a 2-process unit under accelerate launch. While it holds the folder, a second
    # sweep and a plain run into it are refused. Then A is killed with SIGKILL mid-unit: its
    # launcher and ranks must die with it (no orphan writing on), and a resume finishes the unit.
    # "While the unit runs" holds by construction, not by timing: the test stops the unit's
    # processes (SIGSTOP) for the checks and again for the kill, so that however slow or busy the
    # machine, the unit cannot finish in between. A unit that ends before it is held fails the test.
    epochs = 2
    path = write(tmp_path, f"""
[fixed]
epochs = {epochs}
seeds = [0]
batch_size = 100            # 600 steps an epoch: after epoch 1's rows the unit runs a whole epoch more
[grid]
nproc = [2]
""")
    out = tmp_path / "out"
    results = out / "results.jsonl"

    def whole_rows() -> list[bytes]:  # results.jsonl's whole lines (a row being written is not one yet)
        raw = results.read_bytes() if results.exists() else b""
        return raw[: raw.rfind(b"\n") + 1].splitlines(keepends=True)

    def stat(pid: int) -> list[str]:  # /proc/PID/stat after the command name: state, ppid, ...; [] once gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return []

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    held: set[int] = set()  # every process the test stopped: none is left stopped, whatever fails

    def hold(why: str) -> set[int]:
        """SIGSTOP the unit's processes (all that name the folder but sweep A); return them once all
        are stopped. Fails the test if the unit or the sweep ended first."""
        pids = set(processes_mentioning(str(out))) - {a.pid}
        held.update(pids)
        lost = []
        for pid in sorted(pids):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                lost.append(pid)
        until = time.time() + 30
        while any(stat(pid)[:1] not in (["T"], ["t"], []) for pid in pids) and time.time() < until:
            time.sleep(0.01)  # SIGSTOP is sent, not yet taken: wait until each process is stopped
        states = {pid: (stat(pid) or ["gone"])[0] for pid in sorted(pids)}
        if a.poll() is not None or not pids or lost or set(states.values()) - {"T", "t"}:
            pytest.fail(f"precondition violated ({why}): the unit was to be held running, but sweep A "
                        f"{'exited with ' + str(a.returncode) if a.poll() is not None else 'runs'}; the unit's "
                        f"processes and their states once stopped: {states}, of which {sorted(lost)} had ended "
                        f"before SIGSTOP; results.jsonl has {len(whole_rows())} of the unit's {epochs * 2} rows")
        if len(whole_rows()) >= epochs * 2:
            pytest.fail(f"precondition violated ({why}): the unit had written all its {epochs * 2} rows before it was held")
        return pids

    def resume(pids: set[int]) -> None:
        for pid in sorted(pids):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    a = sweep_cli("sweep", path, "--out", out, tmp=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # The launcher and its two ranks exist, the ranks started as themselves: a child forked but not
        # yet exec'd still shows the launcher's command line, and stopping it then would leave the
        # launcher blocked in vfork, where it cannot stop.
        while True:
            unit = set(processes_mentioning(str(out))) - {a.pid}
            started = [pid for pid in unit if str(out).encode() in cmdline(pid) and b"accelerate.commands.launch" not in cmdline(pid)]
            if len(unit) >= 3 and len(started) >= 2:
                break
            if a.poll() is not None or time.time() > deadline:
                pytest.fail(f"precondition violated: the unit's launcher and 2 ranks never ran (sweep A: exit status "
                            f"{a.poll()}; the unit's processes: {sorted(unit)}, of which started: {sorted(started)})")
            time.sleep(0.05)
        unit = hold("checks while the unit runs")
        rows_held = whole_rows()
        b = sweep_cli("sweep", path, "--out", out, tmp=tmp_path)
        assert b.returncode == 1 and f"results folder {out} is in use by bnbench sweep (pid {a.pid} on" in b.stderr, b.stderr
        r = sweep_cli("run", "--epochs", "1", "--out", out, tmp=tmp_path)
        assert r.returncode == 1 and "is in use by bnbench sweep" in r.stderr and "Traceback" not in r.stderr, r.stderr
        s = sweep_cli("status", out, tmp=tmp_path)
        assert s.returncode == 0 and "1 running" in s.stdout and "a sweep holds the folder now" in s.stdout, s.stdout
        assert a.poll() is None and whole_rows() == rows_held, "the held unit moved on"
        resume(unit)

        # Epoch 1's rows are on disk: stop the unit again at once, in its second epoch, and kill A.
        while len(whole_rows()) < 2 and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        unit = hold("the kill mid-unit")
        (launcher,) = [pid for pid in unit if stat(pid)[1] == str(a.pid)]
        ranks = sorted(pid for pid in unit if stat(pid)[1] == str(launcher))
        assert len(ranks) == 2 and set(unit) == {launcher, *ranks}, (launcher, ranks, unit)
        (meta,) = json.loads((out / "meta.json").read_text())["runs"].values()
        assert meta["status"] == "running"
        at_kill = whole_rows()
        a.send_signal(signal.SIGKILL)
        a.wait()
        gone = time.time() + 15
        while stat(launcher)[:1] not in (["Z"], []) and time.time() < gone:
            time.sleep(0.05)  # SIGKILL ends a stopped process too
        assert stat(launcher)[:1] in (["Z"], []), "the launcher outlived the killed sweep"
        for pid in ranks:  # their parent's death sent them SIGTERM; stopped, they have not taken it yet
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
            pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
            assert pending & (1 << (signal.SIGTERM - 1)), f"rank {pid} has no SIGTERM pending: {fields['ShdPnd']}"
        resume(unit)
        gone = time.time() + 15  # SIGTERM ends a rank within a second or two
        while processes_mentioning(str(out)) and time.time() < gone:
            time.sleep(0.2)
        assert processes_mentioning(str(out)) == [], "a unit's processes outlived the killed sweep"
        assert results.read_bytes() == b"".join(at_kill), "rows written after the kill"
        ((killed_run, meta),) = json.loads((out / "meta.json").read_text())["runs"].items()
        assert meta["status"] == "interrupted", meta  # the ranks were told (SIGTERM), not cut off
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        for pid in held & set(processes_mentioning(str(out))):  # still the unit's: kill it, and let it run to die
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    s = sweep_cli("status", out, tmp=tmp_path)
    assert "1 interrupted" in s.stdout and "reruns from the start on resume" in s.stdout, s.stdout

    p = sweep_cli("sweep", path, "--out", out, tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "moved to" in p.stderr and f"[1/1] unit 1 (the one configuration): epoch {epochs}/{epochs}" in p.stderr  # plain lines
    rows, problems = read_results(out)
    planned = json.loads((out / "plan.json").read_text())["units"]
    # The launched ranks computed the same unit id as the planner; one whole unit, no duplicates.
    assert problems == [] and len(rows) == epochs * 2 and set(rows["unit"]) == {planned[0]["id"]}
    assert not rows.duplicated(["variant", "seed", "epoch"]).any()
    assert sorted(zip(rows["epoch"], rows["variant"])) == [(e, v) for e in range(1, epochs + 1) for v in ("bn", "nobn")]
    assert (rows["world_size"] == 2).all() and (rows["backend"] == "gloo").all() and (rows["test_total"] == 10000).all()
    # The killed attempt's rows, as they were when it was killed, are kept aside, not lost.
    aside = list((out / "superseded").glob("*.jsonl"))
    assert [f.name for f in aside] == [f"{killed_run}.jsonl"]
    assert aside[0].read_bytes().splitlines(keepends=True) == at_kill, "the killed attempt's epoch rows were not kept aside"


def test_sigkill_at_random_moments_then_resume_equals_one_clean_run(tmp_path):
    """SIGKILL the sweep at >= 6 random moments, resuming each time: the rows equal one clean run's.
    (6, not 20: each attempt pays a torch import and a data load, ~11 s on 2 cores; 20 kills took
    270 s of a suite meant to stay near 10 minutes, 12 took 132 s, 8 took 98 s; test_slurm kills a
    SLURM sweep too.)"""
    path = write(tmp_path, """
[sweep]
seeds_per_unit = 1
[fixed]
epochs = 2
seeds = [0, 1]
batch_size = 600            # 100 steps an epoch: short units, many boundaries to land on
[grid]
lr = [1e-3, 1e-2, 3e-2]
""")
    clean = tmp_path / "clean"
    t0 = time.time()
    p = sweep_cli("sweep", path, "--out", clean, "--quiet", tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    reference, problems = read_results(clean)
    assert problems == [] and len(reference) == 6 * 2 * 2
    # The clean run's timeline: from its plan (start-up done) to its end; the units' share of it.
    work = time.time() - (clean / "plan.json").stat().st_mtime
    unit_s = [e["seconds"] for e in events(clean) if e["event"] == "done"]
    per_unit = sorted(unit_s)[len(unit_s) // 2]
    warm_up = max(0.0, work - per_unit * len(unit_s))  # data load, the first optimizer importing torch._dynamo, exit

    out = tmp_path / "killed"
    finished = []
    rng = random.Random(20261126)
    kills = attempts = 0
    while kills < 6:
        attempts += 1
        assert attempts < 40, f"only {kills} kills landed in {attempts} attempts"
        left = 6 - (len(read_results(out)[0]) // 4 if (out / "results.jsonl").exists() else 0)
        plan_time = (out / "plan.json").stat().st_mtime if (out / "plan.json").exists() else 0
        proc = sweep_cli("sweep", path, "--out", out, "--quiet", tmp=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Once this attempt has planned (start-up done), kill it at a random moment of the work it has left.
            while proc.poll() is None and not ((out / "plan.json").exists() and (out / "plan.json").stat().st_mtime > plan_time):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, max(0.5, warm_up + left * per_unit)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            if proc.poll() is None:  # killed above, or the test itself failed: no sweep outlives it
                proc.kill()
            proc.wait()
        if proc.returncode == 0:  # it finished first: check it, and start over so that kills land on work
            finished.append(out)
            out = tmp_path / f"killed{attempts}"
    p = sweep_cli("sweep", path, "--out", out, "--quiet", tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    moved = 0
    for folder in finished + [out]:
        rows, problems = read_results(folder)
        assert problems == []
        assert not rows.duplicated(["unit", "variant", "seed", "epoch"]).any()
        # Row for row, bitwise: every metric, config value and unit id; only attempt ids and timings differ.
        assert stable(rows) == stable(reference)
        moved += sum(len(f.read_text().splitlines()) for f in (folder / "superseded").glob("*.jsonl"))
    print(f"{kills} kills in {attempts} attempts over {len(finished) + 1} folders; {moved} rows of killed attempts "
          f"moved aside; {time.time() - t0:.0f} s")
