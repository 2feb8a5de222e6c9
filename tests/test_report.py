"""The report's numbers against hand computation on a small fixed table; partial files reported."""
from __future__ import annotations

import base64
import re
import statistics

import pandas as pd
import pytest

from bnbench.report import build_report, mean_ci95
from bnbench.results import ResultsWriter, read_results

# final test accuracy per seed (epoch 2); epoch 1 is lower for everyone
FINAL = {"bn": {0: 0.97, 1: 0.975, 2: 0.972}, "nobn": {0: 0.96, 1: 0.962, 2: 0.968}}


def _rows():
    rows = []
    for v, accs in FINAL.items():
        for s, acc in accs.items():
            for e in (1, 2):
                a = acc if e == 2 else acc - 0.02
                rows.append(dict(run_id="r1", preset="seed", dataset="mnist", variant=v, seed=s, epoch=e, epochs=2,
                                 test_acc=a, test_loss=1 - a, train_acc=a, train_loss=1 - a, diverged=False,
                                 hidden="32,32", activation="relu", optimizer="adam", lr=1e-3, batch_size=100,
                                 engine="stacked", dtype="float32", world_size=1, sync_bn=False, device="cpu"))
    return rows


def _write(path, rows):
    with ResultsWriter(path) as w:
        w.append(rows)


def test_tables_match_hand_computation(tmp_path):
    _write(tmp_path, _rows())
    html_path = build_report(tmp_path)
    table = pd.read_csv(tmp_path / "report" / "final_accuracy.csv").set_index("variant")
    for v, accs in FINAL.items():
        vals = list(accs.values())
        assert table.loc[v, "mean"] == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert table.loc[v, "std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
        assert table.loc[v, "min"] == min(vals) and table.loc[v, "max"] == max(vals) and table.loc[v, "n"] == 3
    pairs = pd.read_csv(tmp_path / "report" / "paired_difference.csv").set_index("seed")
    for s in (0, 1, 2):
        assert pairs.loc[s, "difference"] == pytest.approx(FINAL["bn"][s] - FINAL["nobn"][s], abs=1e-12)
    # t interval by hand: mean +- t(0.975, 2) * sd / sqrt(3), t = 4.302652729911275
    d = [FINAL["bn"][s] - FINAL["nobn"][s] for s in (0, 1, 2)]
    half = 4.302652729911275 * statistics.stdev(d) / 3 ** 0.5
    lo, hi = mean_ci95(d)
    assert lo == pytest.approx(statistics.mean(d) - half, abs=1e-12) and hi == pytest.approx(statistics.mean(d) + half, abs=1e-12)
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"{statistics.mean(d) * 100:+.2f} pp" in md and "BN ahead on 3 of 3" in md
    page = html_path.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 3  # accuracy, loss, paired difference: all embedded
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("test_accuracy.png", "test_loss.png", "paired_difference.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def test_partial_files_reported_not_dropped(tmp_path):
    rows = _rows()
    rows[-1] = {**rows[-1], "diverged": True, "test_acc": None, "test_loss": None}  # nobn/2 epoch 2
    _write(tmp_path, rows[:-2] + [rows[-1]])
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"run_id": "r1", "variant": "bn", "se')  # torn by a crash mid-write
    df, problems = read_results(tmp_path)
    n_lines = len(rows) - 1 + 1
    assert len(df) == len(rows) - 1
    assert problems and f"results.jsonl:{n_lines}: torn last line" in problems[0]
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "torn last line" in md and "nobn/seed 2 diverged" in md
    # A new writer alone in the folder repairs the tail: the torn bytes go to torn.log, its rows parse.
    _write(tmp_path, [rows[0]])
    df2, problems2 = read_results(tmp_path)
    assert len(df2) == len(df) + 1 and problems2 == []
    assert f"results.jsonl:{n_lines}".encode() in (tmp_path / "torn.log").read_bytes()


def test_report_on_empty_or_missing_results(tmp_path):
    from bnbench.config import ConfigError

    with pytest.raises(ConfigError, match="no results.jsonl"):
        build_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds no rows"):
        build_report(tmp_path)


def test_all_diverged_still_reports(tmp_path):
    rows = [{**r, "diverged": True, "test_acc": None, "test_loss": None} for r in _rows()]
    _write(tmp_path, rows)
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("diverged (loss NaN/inf) at epoch 1") == 6
    assert "No seed has both a BN and a no-BN member" in md

