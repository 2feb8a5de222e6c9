"""Which rows the report reads (issue 29, items 1-3): per (config, variant, seed) the latest complete run
or unit, never a dead one beside it; incomplete members apart, each at its own epoch; and no command that
writes may write over one of a results folder's own files.

The dead runs are built as they are left: rows up to the epoch that reached the disk, and meta.json as
the run's record leaves it (SIGTERM: `interrupted`; SIGKILL: `running` with a process that is gone; a full
disk: `failed` with ENOSPC and a torn last line, which the next writer moves to torn.log)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bnbench import cli
from bnbench.reporting.report import build_report
from bnbench.store.provenance import process_identity
from bnbench.store.record import update_meta
from bnbench.store.results import OWN_FILES, ResultsWriter, read_results

from conftest import mnist_root

SEEDS = (0, 1, 2)
PLANNED = 4


def acc_of(run: str, variant: str, seed: int, epoch: int) -> float:
    """A test accuracy that says which run, member and epoch it came from."""
    base = {"dead": 0.90, "rerun": 0.95}[run] + (0.02 if variant == "bn" else 0.0)
    return round(base + seed / 1000 + epoch / 10000, 6)


def rows_of(run: str, epochs, *, members=None, clock: int = 0) -> list[dict]:
    rows = []
    for e in epochs:
        for v in ("bn", "nobn"):
            for s in SEEDS:
                if members is not None and (v, s) not in members:
                    continue
                a = acc_of(run, v, s, e)
                rows.append(dict(run_id=run, preset="seed", dataset="mnist", hidden="32,32", activation="relu",
                                 optimizer="adam", lr=1e-3, batch_size=600, engine="stacked", dtype="float32",
                                 world_size=1, sync_bn=False, device="cpu", variant=v, seed=s, epoch=e, epochs=PLANNED,
                                 test_acc=a, test_loss=1 - a, train_acc=a, train_loss=1 - a, diverged=False,
                                 train_seconds=1.0, time=f"2026-12-07T10:{clock + e:02d}:00+00:00"))
    return rows


def append(folder: Path, rows: list[dict]) -> None:
    with ResultsWriter(folder) as w:
        w.append(rows)


def dead_pid_identity() -> dict:
    """pid and start time of a process that has ended (as a SIGKILLed run's record names it)."""
    p = subprocess.Popen(["sleep", "30"])
    who = process_identity(p.pid)
    p.kill()
    p.wait()
    return who


def record(folder: Path, run: str, status: str, **extra) -> None:
    import socket

    update_meta(folder, run, {"status": status, "hostname": socket.gethostname(), "config": {"epochs": PLANNED},
                              **process_identity(), **extra})


def rerun_completes(folder: Path) -> None:
    append(folder, rows_of("rerun", range(1, PLANNED + 1), clock=30))
    record(folder, "rerun", "complete")


def assert_reads_the_complete_rerun(folder: Path) -> str:
    build_report(folder)
    table = pd.read_csv(folder / "report" / "final_accuracy.csv")
    assert len(table) == 2 and set(table["epoch"]) == {PLANNED} and table["complete"].all(), table
    for v in ("bn", "nobn"):
        row = table[table["variant"] == v].iloc[0]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(sum(acc_of("rerun", v, s, PLANNED) for s in SEEDS) / 3, abs=1e-12)
    pairs = pd.read_csv(folder / "report" / "paired_difference.csv")
    assert list(pairs["epoch"]) == [PLANNED] * 3
    assert list(pairs["bn"]) == [acc_of("rerun", "bn", s, PLANNED) for s in SEEDS]
    md = (folder / "report" / "report.md").read_text()
    # The dead run is listed, and said not to be used.
    assert "run dead: " in md and "not used for 6 of its 6 members: a complete run of the same configuration and seed is (run rerun)" in md
    assert "incomplete runs (" not in md
    return md


def test_sigterm_then_rerun_reads_the_complete_rerun(tmp_path):
    append(tmp_path, rows_of("dead", [1]))
    record(tmp_path, "dead", "interrupted", error="Terminated: SIGTERM")
    rerun_completes(tmp_path)
    md = assert_reads_the_complete_rerun(tmp_path)
    assert "run dead: 1 of 4 epochs recorded (incomplete: interrupted)" in md


def test_sigkill_then_rerun_reads_the_complete_rerun(tmp_path):
    append(tmp_path, rows_of("dead", [1, 2, 3]))
    record(tmp_path, "dead", "running")
    update_meta(tmp_path, "dead", dead_pid_identity())  # SIGKILL: nothing recorded the end
    rerun_completes(tmp_path)
    md = assert_reads_the_complete_rerun(tmp_path)
    assert "run dead: 3 of 4 epochs recorded (incomplete: died (no process))" in md


def full_disk_run(folder: Path) -> None:
    """Epoch 1 whole; of epoch 2's write only bn/seed 0's line reached the disk, then part of the next."""
    append(folder, rows_of("dead", [1]) + rows_of("dead", [2], members={("bn", 0)}))
    with open(folder / "results.jsonl", "a") as f:
        f.write(json.dumps(rows_of("dead", [2], members={("bn", 1)})[0])[:70])  # ENOSPC mid-line
    record(folder, "dead", "failed", error="OSError: [Errno 28] No space left on device")


def test_full_disk_then_rerun_reads_the_complete_rerun(tmp_path):
    full_disk_run(tmp_path)
    rerun_completes(tmp_path)  # its writer moves the torn line to torn.log
    assert read_results(tmp_path)[1] == [] and (tmp_path / "torn.log").exists()
    md = assert_reads_the_complete_rerun(tmp_path)
    assert "run dead: 1 of 4 epochs recorded (incomplete: failed)" in md


def test_only_incomplete_runs_each_row_at_its_own_epoch_and_said(tmp_path):
    """No rerun after the full disk: bn/seed 0 reached epoch 2, every other member epoch 1. No table
    mixes them under one label; pairs compare both variants at one epoch; every row says incomplete."""
    full_disk_run(tmp_path)
    build_report(tmp_path)
    table = pd.read_csv(tmp_path / "report" / "final_accuracy.csv")
    got = {(r.variant, r.epoch): r for r in table.itertuples()}
    assert sorted(got) == [("bn", 1), ("bn", 2), ("nobn", 1)] and not table["complete"].any()
    assert got[("bn", 2)].n == 1 and got[("bn", 2)].mean == acc_of("dead", "bn", 0, 2)
    assert got[("bn", 1)].n == 2 and got[("bn", 1)].mean == pytest.approx((acc_of("dead", "bn", 1, 1) + acc_of("dead", "bn", 2, 1)) / 2)
    assert got[("nobn", 1)].n == 3
    pairs = pd.read_csv(tmp_path / "report" / "paired_difference.csv")
    # seed 0 too is compared at epoch 1, the last epoch both of its members reached
    assert list(pairs["epoch"]) == [1, 1, 1] and list(pairs["bn"]) == [acc_of("dead", "bn", s, 1) for s in SEEDS]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "incomplete runs (seeds without a complete run of both variants; epoch 1): BN raises test accuracy at epoch 1 by 2.00 pp" in md
    assert "| 2 of 4 (incomplete) |" in md and "| 1 of 4 (incomplete) |" in md
    assert "BN raises final test accuracy" not in md
    assert "run dead: 1 of 4 epochs recorded (incomplete: failed); 6 of its members have no complete run" in md


def test_a_complete_member_is_used_and_one_without_a_complete_run_is_shown_apart(tmp_path):
    """Seed 2's rerun died too: seeds 0 and 1 come from the complete rerun (epoch 4), seed 2 from the
    dead run that got furthest, in rows of its own."""
    append(tmp_path, rows_of("dead", [1, 2, 3]))
    record(tmp_path, "dead", "failed", error="RuntimeError: boom")
    rerun = [r for r in rows_of("rerun", range(1, PLANNED + 1), clock=30) if r["seed"] != 2 or r["epoch"] == 1]
    append(tmp_path, rerun)
    record(tmp_path, "rerun", "interrupted")
    build_report(tmp_path)
    table = pd.read_csv(tmp_path / "report" / "final_accuracy.csv")
    got = {(r.variant, r.epoch): r for r in table.itertuples()}
    assert sorted(got) == [("bn", 3), ("bn", 4), ("nobn", 3), ("nobn", 4)]
    assert got[("bn", 4)].complete and got[("bn", 4)].n == 2 and not got[("bn", 3)].complete
    assert got[("bn", 3)].mean == acc_of("dead", "bn", 2, 3)  # the dead run got further than the rerun's epoch 1
    md = (tmp_path / "report" / "report.md").read_text()
    assert "BN - no-BN = +2.00 pp over 2 paired seeds" in md  # the complete pairs' verdict, on its own
    assert "incomplete runs (seeds without a complete run of both variants; epoch 3): BN - no-BN = +2.00 pp over 1 paired seed" in md


# -- item 2: a sweep whose file was edited after a kill ---------------------------------------------
SWEEP = """
[sweep]
seeds_per_unit = {spu}
[fixed]
epochs = 2
seeds = [0, 1, 2]
batch_size = 6000
hidden = [16]
"""


def test_sweep_edited_after_a_kill_sets_the_dead_units_rows_aside(tmp_path, monkeypatch):
    from bnbench.sweeps import runner
    from bnbench.sweeps.runner import run_sweep

    path, out = tmp_path / "s.toml", tmp_path / "out"
    path.write_text(SWEEP.format(spu=1))
    # The sweep is killed in its first unit, after epoch 1's rows are on disk.
    with monkeypatch.context() as m:
        m.setattr(runner.Progress, "epoch", lambda self, e: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run_sweep(path, out=out, data_root=mnist_root(), quiet=True)
    dead, _ = read_results(out)
    assert len(dead) == 2 and set(dead["epoch"]) == {1} and set(dead["seed"]) == {0}
    dead_run = dead["run_id"].iloc[0]
    update_meta(out, dead_run, {"status": "running", **dead_pid_identity()})  # SIGKILL: no end recorded

    path.write_text(SWEEP.format(spu=3))  # edited: one unit of the three seeds now
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 0
    rows, problems = read_results(out)
    assert problems == [] and len(rows) == 2 * 3 * 2 and rows["run_id"].nunique() == 1 and dead_run not in set(rows["run_id"])
    assert not rows.duplicated(["variant", "seed", "epoch"]).any()
    aside = [json.loads(x) for x in (out / "superseded" / f"{dead_run}.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"], r["epoch"]) for r in aside] == [(r["variant"], r["seed"], r["epoch"]) for r in dead.to_dict("records")]
    assert json.loads((out / "meta.json").read_text())["runs"][dead_run]["status"] == "superseded"
    build_report(out)
    table = pd.read_csv(out / "report" / "final_accuracy.csv")
    assert len(table) == 2 and set(table["epoch"]) == {2} and set(table["n"]) == {3}


def test_a_whole_unit_of_the_previous_plan_stays(tmp_path):
    """Only unfinished attempts move aside: a unit of the previous plan that finished keeps its rows."""
    from bnbench.sweeps.runner import run_sweep

    path, out = tmp_path / "s.toml", tmp_path / "out"
    path.write_text(SWEEP.format(spu=1).replace("seeds = [0, 1, 2]", "seeds = [0]"))
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 0
    before = (out / "results.jsonl").read_bytes()
    path.write_text(SWEEP.format(spu=1).replace("seeds = [0, 1, 2]", "seeds = [0]").replace("hidden = [16]", "hidden = [8]"))
    assert run_sweep(path, out=out, data_root=mnist_root(), quiet=True) == 0
    assert (out / "results.jsonl").read_bytes().startswith(before) and not (out / "superseded").exists()


# -- item 3: no output over an input --------------------------------------------------------------
@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "D"
    append(d, rows_of("rerun", range(1, PLANNED + 1)))
    record(d, "rerun", "complete")
    return d


def refused(argv, capsys, *, name: str) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is {name} of the results folder" in err and "choose another path" in err, err
    return err


def snapshot(d: Path) -> dict:
    return {p.relative_to(d): (p.read_bytes() if p.is_file() else "dir") for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("name", OWN_FILES)
def test_export_refuses_each_of_the_folders_own_files(folder, capsys, name):
    before = snapshot(folder)
    refused(["export", folder, "--out", folder / name], capsys, name=name)
    assert snapshot(folder) == before


def test_export_refuses_a_link_to_results_jsonl_and_status_still_reads_it(folder, tmp_path, capsys):
    link = tmp_path / "elsewhere.csv"
    link.symlink_to(folder / "results.jsonl")
    refused(["export", folder, "--out", link], capsys, name="results.jsonl")
    assert cli.main(["status", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "problem" not in text and ["rerun", "complete", str(2 * 3 * PLANNED)] == text.splitlines()[2].split()[:3]


def test_run_sweep_logging_dir_and_report_refuse_the_folders_own_files(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(mnist_root()))
    tiny = ["--seeds", "0", "--epochs", "1", "--batch-size", "6000", "--hidden", "8", "--quiet"]
    before = snapshot(folder)
    refused(["run", "--out", folder / "plan.json", *tiny], capsys, name="plan.json")
    refused(["run", "--out", folder / "meta.json", *tiny], capsys, name="meta.json")
    refused(["run", "--out", tmp_path / "new", "--logging-dir", folder / "instruments.jsonl", *tiny], capsys,
            name="instruments.jsonl")
    assert not (tmp_path / "new").exists()
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'[sweep]\nout = "{folder / "units.jsonl"}"\n[fixed]\nepochs = 1\nseeds = [0]\nbatch_size = 6000\n')
    refused(["sweep", sweep], capsys, name="units.jsonl")
    refused(["sweep", sweep, "--out", folder / "sweep.toml", "--dry-run"], capsys, name="sweep.toml")
    (folder / "report").symlink_to(folder / "results.jsonl")
    refused(["report", folder], capsys, name="results.jsonl")
    (folder / "report").unlink()
    assert snapshot(folder) == before
    # Paths that merely share a name elsewhere are fine.
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "meta.json")]) == 0
