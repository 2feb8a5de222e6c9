"""results.jsonl and meta.json: durable appends, exact reading, concurrent writers."""
from __future__ import annotations

import json

from bnbench.results import ResultsWriter, read_results


def test_meta_updates_from_parallel_writers_all_kept(tmp_path):
    # Several processes merging their run into one meta.json at once: none may be lost.
    import multiprocessing as mp

    from bnbench.record import update_meta

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_meta_writer, args=(str(tmp_path), i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = json.loads((tmp_path / "meta.json").read_text())["runs"]
    assert sorted(runs) == [f"run{i}" for i in range(4)]
    assert all(runs[f"run{i}"]["n"] == 19 for i in range(4))
    update_meta(tmp_path, "run0", {"status": "complete"})
    assert json.loads((tmp_path / "meta.json").read_text())["runs"]["run0"] == {"n": 19, "status": "complete"}


def _meta_writer(path, i):
    from bnbench.record import update_meta

    for n in range(20):
        update_meta(path, f"run{i}", {"n": n})


def test_each_append_is_whole_lines_and_exact(tmp_path):
    rows = [{"x": 0.1 + 0.2, "nan": float("nan"), "i": i} for i in range(3)]
    with ResultsWriter(tmp_path) as w:
        w.append(rows)
        w.append(rows[:1])
    raw = (tmp_path / "results.jsonl").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 4
    df, problems = read_results(tmp_path)
    assert problems == [] and df["x"].tolist() == [0.1 + 0.2] * 4  # floats round-trip exactly
    assert df["nan"].isna().all()  # NaN is written as null: the file stays valid JSON


def test_corrupt_middle_line_reported_with_number(tmp_path):
    with ResultsWriter(tmp_path) as w:
        w.append([{"i": i} for i in range(3)])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    lines[1] = lines[1][:4] + "\x00garbage"
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    df, problems = read_results(tmp_path)
    assert df["i"].tolist() == [0, 2]
    assert len(problems) == 1 and "results.jsonl:2: unparsable line" in problems[0]
