"""Faults from issue 19, each reproduced with real files and folders: foreign rows, unreadable
meta.json / plan.json, a read-only folder, a symlink loop; every reader says what is wrong in a line."""
from __future__ import annotations

import json
import signal
import subprocess

import pandas as pd
import pytest

from bnbench import cli
from bnbench.store.results import ResultsWriter, read_results

FINAL = {"bn": [0.97, 0.972, 0.974], "nobn": [0.96, 0.962, 0.963]}


def rows(final=FINAL, run_id="r1"):
    out = []
    for v, accs in final.items():
        for s, acc in enumerate(accs):
            for e in (1, 2):
                a = acc if e == 2 else acc - 0.02
                out.append(dict(run_id=run_id, unit="u1", preset="seed", dataset="mnist", variant=v, seed=s, epoch=e,
                                epochs=2, step=600 * e, test_acc=a, test_loss=1 - a, train_acc=a, train_loss=1 - a,
                                diverged=False, train_seconds=1.5, samples_per_s=1000.0, hidden="32,32",
                                activation="relu", optimizer="adam", lr=1e-3, batch_size=100, engine="stacked",
                                dtype="float32", world_size=1, sync_bn=False, device="cpu"))
    return out


def write(folder, lines):
    with ResultsWriter(folder) as w:
        w.append(lines)


def in_process(main, *argv, capsys) -> tuple[int, str, str]:
    """A command's main in this process (no torch import per call), its SIGTERM handler restored after."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return rc, out, err


def bnbench(*argv, capsys) -> tuple[int, str, str]:
    """The console command's main, in this process."""
    return in_process(cli.main, *argv, capsys=capsys)


def test_foreign_rows_are_listed_by_line_and_left_out_everywhere(tmp_path, capsys):
    good = rows()
    write(tmp_path, good)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write(json.dumps({"foo": 1, "bar": "x"}) + "\n")  # line 13
        f.write(json.dumps({**good[0], "seed": "x"}) + "\n")  # line 14: a string where a number belongs
        f.write(json.dumps({**good[0], "test_acc": "0.97"}) + "\n")  # line 15
    df, problems = read_results(tmp_path)
    assert len(df) == len(good) and "foo" not in df and df["seed"].map(type).eq(int).all()
    assert [p.split(": ", 2)[:2] for p in problems] == [
        [f"{tmp_path}/results.jsonl:13", "not a results.jsonl row"],
        [f"{tmp_path}/results.jsonl:14", "seed is 'x'"],
        [f"{tmp_path}/results.jsonl:15", "test_acc is '0.97'"]], problems
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    assert rc == 0 and "3 problem lines" in out and "results.jsonl:13" in out and "results.jsonl:15" in out
    rc, out, err = bnbench("report", tmp_path, capsys=capsys)
    assert rc == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "results.jsonl:13: not a results.jsonl row" in md and "results.jsonl:14: seed is 'x'" in md
    for fmt in ("csv", "parquet"):
        rc, out, err = bnbench("export", tmp_path, "--format", fmt, capsys=capsys)
        assert rc == 0 and err.count("(not exported)") == 3, err
        table = pd.read_csv(tmp_path / "results.csv") if fmt == "csv" else pd.read_parquet(tmp_path / "results.parquet")
        assert len(table) == len(good) and "foo" not in table.columns


def test_unreadable_meta_and_plan_are_one_line_not_a_traceback(tmp_path, capsys):
    write(tmp_path, rows())
    (tmp_path / "meta.json").write_text('{"runs": {"r1": {"status": "compl')  # truncated
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    assert rc == 0 and "meta.json: unreadable (JSONDecodeError" in out and "Traceback" not in out + err
    (tmp_path / "plan.json").write_text("not json")
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    assert rc == 2 and f"bnbench: error: {tmp_path}/plan.json is unreadable (JSONDecodeError" in err, err
    assert "Traceback" not in err


def test_a_symlink_loop_is_a_problem_not_an_empty_folder(tmp_path, capsys):
    (tmp_path / "results.jsonl").symlink_to(tmp_path / "results.jsonl")
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    assert rc == 0 and "symlink that leads nowhere (broken, or a loop)" in out, out
    rc, out, err = bnbench("report", tmp_path, capsys=capsys)
    assert rc == 2 and "symlink that leads nowhere" in err and "Traceback" not in err


@pytest.mark.needs_root
def test_report_and_export_into_a_read_only_folder(small_tmpfs, capsys):
    if small_tmpfs is None:  # loud, not skipped: CI and ./launch.sh test run as root (root ignores chmod)
        pytest.fail("this test remounts a real tmpfs read-only and needs root (mount -o remount,ro)")
    write(small_tmpfs, rows())
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    for argv in (("report", small_tmpfs), ("export", small_tmpfs, "--format", "parquet")):
        rc, out, err = bnbench(*argv, capsys=capsys)
        assert rc == 1 and f"bnbench: error: read-only file system: cannot write {small_tmpfs}/" in err, err
        assert "Traceback" not in err


def test_verdicts_say_what_the_data_allow(tmp_path, capsys):
    same = {"bn": [0.97, 0.972, 0.974], "nobn": [0.97, 0.972, 0.974]}
    write(tmp_path / "same", rows(same))
    assert bnbench("report", tmp_path / "same", capsys=capsys)[0] == 0
    md = (tmp_path / "same" / "report" / "report.md").read_text()
    assert "BN and no-BN reach the same final test accuracy on each of the 3 paired seeds" in md
    assert "0.00 pp" not in md
    write(tmp_path / "bn-only", rows({"bn": FINAL["bn"]}))
    assert bnbench("report", tmp_path / "bn-only", capsys=capsys)[0] == 0
    md = (tmp_path / "bn-only" / "report" / "report.md").read_text()
    assert "Only BN members here: no paired comparison (run both variants)." in md
    assert "diverging" not in md


def test_a_killed_run_is_shown_died_and_the_next_writer_records_it(tmp_path, data_root, capsys, monkeypatch):
    """Issue 19: a plain run killed with SIGKILL said `running` for ever. A reader now checks the
    recorded pid (and its start time, against pid reuse) on this host."""
    import os
    import sys
    import time

    out = tmp_path / "out"
    env = {**os.environ, "BNBENCH_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1"}
    # 50 epochs: minutes of work, so the run is held running by its length while the test looks at it
    # (it is stopped with SIGSTOP before anything is checked), never finished by luck.
    proc = subprocess.Popen([sys.executable, "-m", "bnbench", "run", "--cpu", "--seeds", "0", "--epochs", "50",
                             "--quiet", "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not ((out / "meta.json").exists() and '"running"' in (out / "meta.json").read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        rc, shown, err = bnbench("status", out, capsys=capsys)
        assert rc == 0 and " running " in shown and "died" not in shown, shown  # stopped, not dead
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (killed,) = json.loads((out / "meta.json").read_text())["runs"]
    rc, shown, err = bnbench("status", out, capsys=capsys)
    assert rc == 0 and "died (no process)" in shown, shown
    # The next run into the folder records it.
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    rc, _, err = bnbench("run", "--cpu", "--seeds", "0", "--epochs", "1", "--quiet", "--out", out, capsys=capsys)
    assert rc == 0, err
    runs = json.loads((out / "meta.json").read_text())["runs"]
    assert runs[killed]["status"] == "died" and f"process {runs[killed]['pid']} on" in runs[killed]["error"]
    assert sorted(r["status"] for r in runs.values()) == ["complete", "died"]


def test_a_member_no_better_than_chance_is_said_though_not_diverged(tmp_path, capsys):
    """--lr 1e10: losses of 1e9 and more stay finite, accuracy near 10%: not `diverged` (NaN/inf), but said."""
    write(tmp_path, rows({"bn": FINAL["bn"], "nobn": [0.1, 0.098, 0.9]}))
    assert bnbench("report", tmp_path, capsys=capsys)[0] == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "run r1: nobn/seed 0 ends at 10.00% test accuracy, no better than chance (its loss stayed finite" in md
    assert "nobn/seed 1 ends at 9.80%" in md and "nobn/seed 2 ends" not in md and "diverged (loss" not in md


def test_absurd_sizes_are_refused_before_any_work(tmp_path, data_root, capsys, monkeypatch):
    """Issue 19: a 10^6-unit grid took 46 s and 3 GB to list; --seeds 0-1000000 died in the allocator."""
    big = tmp_path / "big.toml"
    big.write_text("[fixed]\nepochs = 1\n[grid]\n" + "\n".join(
        f"{k} = [{', '.join(map(str, vals))}]" for k, vals in {
            "lr": [i * 1e-4 for i in range(1, 101)], "batch_size": list(range(10, 1010, 10)),
            "momentum": [i / 100 for i in range(100)]}.items()))
    rc, out, err = bnbench("sweep", big, "--dry-run", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "1,000,000 units (1,000,000 grid combinations x 1 seed chunks x 1 repeats), more than the limit of 10,000" in err
    assert "--max-units N or [sweep] max_units = N" in err and not (tmp_path / "o").exists()
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    rc, out, err = bnbench("run", "--cpu", "--seeds", "0-1000000", "--epochs", "1", "--out", tmp_path / "r", capsys=capsys)
    assert rc == 2 and "bnbench: error: 2,000,002 members per process need about" in err and "Traceback" not in err, err
    assert "a smaller --eval-batch, or more processes" in err
    assert not (tmp_path / "r" / "meta.json").exists()
