"""The report's numbers against hand computation on a small fixed table; partial files reported."""
from __future__ import annotations

import base64
import re
import os
import statistics
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest

from bnbench.reporting.report import build_report, mean_ci95
from bnbench.reporting.stats import bootstrap_ci95, paired_test, time_to_target
from bnbench.store.results import ResultsWriter, read_results

from conftest import REPO

# final test accuracy per seed (epoch 2); epoch 1 is lower for everyone
FINAL = {"bn": {0: 0.97, 1: 0.975, 2: 0.972}, "nobn": {0: 0.96, 1: 0.962, 2: 0.968}}


def _rows():
    rows = []
    for v, accs in FINAL.items():
        for s, acc in accs.items():
            for e in (1, 2):
                a = acc if e == 2 else acc - 0.02
                rows.append(dict(run_id="r1", preset="seed", dataset="mnist", variant=v, seed=s, epoch=e, epochs=2,
                                 test_acc=a, test_loss=1 - a, train_acc=a, train_loss=1 - a, diverged=False, train_seconds=1.5,
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
    assert f"BN raises final test accuracy by {statistics.mean(d) * 100:.2f} pp" in md and "BN ahead on 3 of 3" in md
    assert "3 paired seeds" in md and "(paired t-test; Wilcoxon p = 0.250)" in md  # all 3 positive: 2/8 exactly
    page = html_path.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    figures = ("final_accuracy", "learning_curves")
    assert len(imgs) == len(figures)  # every figure embedded
    # Every BN member reaches 0.97 at epoch 2: one point along the time-to-target axis, so no figure (the table says it).
    assert not (tmp_path / "report" / "time_to_target.png").exists()
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in figures:
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / "report" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("variant")
    assert summary.loc["bn", "reached"] == "3/3" and summary.loc["nobn", "reached"] == "0/3"  # target 0.97: only BN
    assert summary.loc["bn", "median_epochs"] == 2 and summary.loc["bn", "pairs"] == 3
    assert summary.loc["bn", "mean_diff"] == pytest.approx(statistics.mean(d), abs=1e-12)


def test_paired_statistics_against_hand_values():
    bn = [0.975, 0.972, 0.978, 0.970, 0.974]
    nobn = [0.965, 0.966, 0.967, 0.962, 0.969]
    d = [a - b for a, b in zip(bn, nobn)]
    t = paired_test(bn, nobn)
    m, sd = statistics.mean(d), statistics.stdev(d)
    from scipy import stats

    # t = mean / (sd / sqrt(n)) with n - 1 = 4 degrees of freedom, two-sided.
    assert t["p_t"] == pytest.approx(2 * stats.t.sf(m / (sd / 5 ** 0.5), 4), rel=1e-12)
    # Wilcoxon signed-rank, exact: all 5 differences positive -> p = 2 / 2^5.
    assert t["p_wilcoxon"] == pytest.approx(2 / 32, abs=1e-12)
    assert t["mean_diff"] == pytest.approx(m, abs=1e-15) and t["ahead"] == 5 and t["enough"]
    # One negative difference, the smallest in size: W- = 1, P(W <= 1) = 2/32, two-sided 4/32.
    t2 = paired_test([0.97, 0.97, 0.97, 0.97, 0.9695], [0.960, 0.962, 0.964, 0.966, 0.970])
    assert t2["p_wilcoxon"] == pytest.approx(4 / 32, abs=1e-12) and t2["ahead"] == 4
    # The bootstrap interval: seeded (the same every time), inside the data, around the mean; against
    # a plain numpy percentile bootstrap of the same data.
    lo, hi = bootstrap_ci95(d)
    assert (lo, hi) == bootstrap_ci95(d) and min(d) <= lo < m < hi <= max(d)
    import numpy as np

    rng = np.random.default_rng(1)
    means = np.asarray(d)[rng.integers(0, 5, size=(20000, 5))].mean(axis=1)
    assert lo == pytest.approx(np.percentile(means, 2.5), abs=2e-4) and hi == pytest.approx(np.percentile(means, 97.5), abs=2e-4)
    assert bootstrap_ci95([0.01] * 4) == (0.01, 0.01)
    # Too few seeds: no interval, no p-value, and the report says so.
    few = paired_test([0.97, 0.98], [0.96, 0.96])
    assert not few["enough"] and few["ci_low"] is None and few["p_t"] is None


def test_time_to_target_counts_members_that_never_reach_it():
    curves = pd.DataFrame([
        # member a reaches 0.97 at epoch 2 (1.0 + 2.0 s of training); member b never does.
        dict(run_id="r", variant="bn", seed=0, epoch=1, test_acc=0.95, train_seconds=1.0),
        dict(run_id="r", variant="bn", seed=0, epoch=2, test_acc=0.971, train_seconds=2.0),
        dict(run_id="r", variant="bn", seed=0, epoch=3, test_acc=0.969, train_seconds=4.0),
        dict(run_id="r", variant="nobn", seed=0, epoch=1, test_acc=0.94, train_seconds=1.0),
        dict(run_id="r", variant="nobn", seed=0, epoch=2, test_acc=0.96, train_seconds=2.0),
        dict(run_id="r", variant="nobn", seed=0, epoch=3, test_acc=0.969999, train_seconds=4.0),
    ])
    t = time_to_target(curves, 0.97).set_index("variant")
    assert t.loc["bn", "reached"] and t.loc["bn", "epochs"] == 2 and t.loc["bn", "seconds"] == 3.0
    assert not t.loc["nobn", "reached"] and pd.isna(t.loc["nobn", "epochs"]) and t.loc["nobn", "epochs_run"] == 3
    assert time_to_target(curves, 0.95).set_index("variant").loc["bn", "epochs"] == 1  # reached means >=


def test_one_seed_and_a_missing_epoch_are_said(tmp_path):
    rows = [r for r in _rows() if r["seed"] == 0]
    rows = [r for r in rows if not (r["variant"] == "bn" and r["epoch"] == 1)]  # a hole in the curve
    _write(tmp_path, [{**r, "epochs": 3} for r in rows])
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "over 1 paired seed: too few for an interval or a p-value (at least 3 needed" in md
    assert "bn/seed 0: epoch 1 missing" in md and "2 of 3 epochs recorded" in md


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



# Once loaded: figures that loaded / figures; and the page's widths at the window's size: its scrollWidth, the
# window's innerWidth, the right edge of the widest element (a table or figure wider than the page shows there).
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const right = Math.max(...[...document.body.querySelectorAll("*")].map(e => e.getBoundingClientRect().right));
  document.body.setAttribute("data-figures", ok + "/" + imgs.length);
  document.body.setAttribute("data-widths", [document.scrollingElement.scrollWidth, window.innerWidth,
                                             Math.ceil(right), document.scrollingElement.scrollHeight].join(","));
});
</script></body>"""
WIDTH = 1280  # the report is read at this window width
GLANCE = 1600  # the height of the screenshot: the verdict, the configuration, the final accuracy and its pairs


class Opened(NamedTuple):
    loaded: str  # "figures loaded/figures"
    console: list  # console messages
    scroll_width: int  # document.scrollingElement.scrollWidth
    window_width: int  # window.innerWidth
    widest: int  # the right edge of the widest element, px
    height: int  # the page's full height, px


def _chromium() -> str:
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # loud, not skipped: ./launch.sh test installs Debian's chromium when missing
        pytest.fail("Chromium not found: apt-get install -y chromium (./launch.sh test does it when it can)")
    return chromium


def _open_in_chromium(page: Path, width: int = WIDTH) -> Opened:
    """Load a page in headless Chromium in a window `width` px wide: what loaded, what the console said, its widths."""
    import subprocess

    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE))
    p = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--enable-logging=stderr", "--v=0", f"--window-size={width},900", "--virtual-time-budget=10000",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = re.search(r'data-figures="([^"]*)"', p.stdout)
    widths = re.search(r'data-widths="(\d+),(\d+),(-?\d+),(\d+)"', p.stdout)
    return Opened(loaded.group(1) if loaded else "no load event", [x for x in p.stderr.splitlines() if ":CONSOLE" in x],
                  *(map(int, widths.groups()) if widths else (-1, -1, -1, -1)))


def screenshot(page: Path, dest: Path, width: int = WIDTH, height: int = GLANCE) -> Path:
    """The top of a page as headless Chromium draws it in a window `width` x `height` px, as a PNG: what one sees
    on opening it (reports/lab/report/screenshot-1280.png: see test_the_committed_lab_report_reads_at_1280_px)."""
    import subprocess

    p = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={dest}",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and dest.exists(), p.stderr[-2000:]
    return dest


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.needs_chromium
def test_report_opens_in_headless_chromium_every_figure_loads(tmp_path):
    _write(tmp_path, _rows())
    page = build_report(tmp_path)
    loaded, console, *_ = _open_in_chromium(page)
    assert loaded == "2/2" and console == [], (loaded, console)
    # The probe can fail: a broken figure and a console error are both seen.
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><img src="data:image/png;base64,AAAA"><script>console.error("x")</script></body></html>')
    loaded, console, *_ = _open_in_chromium(bad)
    assert loaded == "0/1" and len(console) == 1 and '"x"' in console[0]


def test_throughput_scaling_sync_bn_and_repeats(tmp_path):
    # 1 and 2 processes, sync BN off and on, 3 seeds, 2 epochs; every run repeated once (repeat 1).
    rows = []
    for world in (1, 2):
        for sync in (False, True):
            for repeat in (0, 1):
                for seed in range(3):
                    run = f"w{world}-s{sync}-r{repeat}-{seed}"
                    for variant, acc in (("bn", 0.975 + seed / 1000), ("nobn", 0.965)):
                        for epoch in (1, 2):
                            rows.append(dict(run_id=run, repeat=repeat, variant=variant, seed=seed, epoch=epoch, epochs=2,
                                             test_acc=acc, test_loss=1 - acc, train_acc=acc, train_loss=1 - acc,
                                             diverged=False, train_seconds=1.0, device_name="CPU", engine="stacked",
                                             members=6, batch_size=100, per_device_batch=100 // world, world_size=world,
                                             sync_bn=sync, samples_per_s=(1000.0 if epoch == 2 else 1.0) * (3 - world + repeat),
                                             dataset="mnist", lr=1e-3))
    _write(tmp_path, rows)
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    # Repeats retrain the same numbers: 3 paired seeds per configuration, not 6.
    assert md.count("3 paired seeds") == 4 and "6 paired seeds" not in md
    # Throughput: the epoch-2 rate per run (epoch 1 is warm-up), median and range over the repeats;
    # 1 process: runs at 2000 and 3000 -> median 2500; 2 processes: 1000 and 2000 -> 1500, efficiency 1500 / (2 x 2500).
    # Only the columns that differ between rows; what every row shares, once above the table.
    section = md.split("## Throughput and scaling")[1].split("##")[0]
    assert "every row: device CPU, engine stacked, 6 members, batch 100." in section
    assert "| processes | sync BN | member-samples/s | min | max | runs | scaling efficiency |" in section
    assert "| 1 | off | 2,500 | 2,000 | 3,000 | 6 | 1.00 |" in section
    assert "| 2 | on | 1,500 | 1,000 | 2,000 | 6 | 0.30 |" in section
    assert (tmp_path / "report" / "sync_bn.png").exists() and (tmp_path / "report" / "throughput.svg").exists()


def test_throughput_per_layout_and_rows_from_before_seed_groups(tmp_path):
    """Scaling efficiency is per layout (world size, dp). Rows written before seed groups existed
    (no dp column) were one DDP group of every process: they join the dp = world size rows."""
    rows = []
    for run, world, dp, rate in (("one", 1, 1, 2000.0), ("groups", 2, 1, 3800.0), ("ddp", 2, 2, 1000.0), ("old", 2, None, 1000.0)):
        for seed in range(3):
            for variant, acc in (("bn", 0.975 + seed / 1000), ("nobn", 0.965)):
                for epoch in (1, 2):
                    row = dict(run_id=run, repeat=0, variant=variant, seed=seed, epoch=epoch, epochs=2, test_acc=acc,
                               test_loss=1 - acc, train_acc=acc, train_loss=1 - acc, diverged=False, train_seconds=1.0,
                               device_name="CPU", engine="stacked", members=6, batch_size=100, world_size=world,
                               per_device_batch=100 // (dp or world), sync_bn=False, samples_per_s=rate, dataset="mnist", lr=1e-3)
                    if dp is not None:
                        row.update(dp=dp, seed_groups=world // dp, seed_group=0)
                    rows.append(row)
    _write(tmp_path, rows)
    build_report(tmp_path)
    section = (tmp_path / "report" / "report.md").read_text().split("## Throughput and scaling")[1].split("##")[0]
    assert "| processes | dp | member-samples/s | min | max | runs | scaling efficiency |" in section
    assert "| 1 | 1 | 2,000 | 2,000 | 2,000 | 1 | 1.00 |" in section
    assert "| 2 | 1 | 3,800 | 3,800 | 3,800 | 1 | 0.95 |" in section
    assert "| 2 | 2 | 1,000 | 1,000 | 1,000 | 2 | 0.25 |" in section  # "old" joined "ddp"


def test_target_option(tmp_path):
    import subprocess
    import sys

    _write(tmp_path, _rows())
    build_report(tmp_path, target=0.95)
    md = (tmp_path / "report" / "report.md").read_text()
    # no-BN: 0.94-0.948 at epoch 1, 0.96-0.968 at epoch 2; 1.5 s of training per epoch.
    assert "## Time to 95.00% test accuracy" in md and "| without BN | 3/3 | 2 | 3.0 | 2 |" in md
    from bnbench.config import ConfigError

    with pytest.raises(ConfigError, match="must be a test accuracy in"):
        build_report(tmp_path, target=1.5)
    p = subprocess.run([sys.executable, "-m", "bnbench", "report", str(tmp_path), "--target", "0.96"], capture_output=True, text=True)
    assert p.returncode == 0 and "## Time to 96.00% test accuracy" in (tmp_path / "report" / "report.md").read_text()


def test_sensitivity_ranges_against_hand_values(tmp_path):
    """Issue 15: per varying setting, the range within 1 pp of each variant's best, with divergences."""
    # Means by lr, 3 seeds each at mean +-0.001: BN flat, no-BN peaked, no-BN diverged at the top.
    means = {"bn": {1e-4: 0.955, 1e-3: 0.970, 1e-2: 0.968, 1e-1: 0.962},
             "nobn": {1e-4: 0.90, 1e-3: 0.955, 1e-2: 0.962, 1e-1: None}}
    rows = []
    for v, by_lr in means.items():
        for lr, m in by_lr.items():
            for s, d in enumerate((-0.001, 0.0, 0.001)):
                a = None if m is None else m + d
                rows.append(dict(run_id=f"r{lr}", variant=v, seed=s, epoch=1, epochs=1, lr=lr, optimizer="adam",
                                 test_acc=a, test_loss=None if a is None else 1 - a, train_acc=a, train_loss=None if a is None else 1 - a,
                                 diverged=m is None, train_seconds=1.0, hidden="32,32", batch_size=100, world_size=1, device="cpu"))
    _write(tmp_path, rows)
    build_report(tmp_path)
    table = pd.read_csv(tmp_path / "report" / "sensitivity.csv").set_index("variant")
    assert table.loc["bn", "best"] == 1e-3 and table.loc["bn", "best_mean"] == pytest.approx(0.970)
    # 0.968 and 0.962 are within 1 pp of 0.970, 0.955 is not: 1e-3 to 1e-1, 100x.
    assert (table.loc["bn", "within_1pp_from"], table.loc["bn", "within_1pp_to"], table.loc["bn", "span"]) == (1e-3, 1e-1, pytest.approx(100))
    # no-BN: best 0.962 at 1e-2; 0.955 is within 1 pp; 1e-1 diverged, so outside.
    assert (table.loc["nobn", "within_1pp_from"], table.loc["nobn", "within_1pp_to"]) == (1e-3, 1e-2)
    assert table.loc["nobn", "diverged"] == "0.1: 3/3"
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("lr: with BN within 1 pp of its best (0.9700 at lr 0.001) from 0.001 to 0.1 (100x); without BN within 1 pp "
            "of its best (0.9620 at lr 0.01) from 0.001 to 0.01 (10x); diverged members: 3/3 at 0.1.") in md
    assert (tmp_path / "report" / "sensitivity_lr.png").stat().st_size > 10_000


def test_sensitivity_says_when_nothing_varies(tmp_path):
    _write(tmp_path, _rows())
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Nothing varies between the runs of this folder (one configuration)" in md
    assert not list((tmp_path / "report").glob("sensitivity_*"))


@pytest.mark.needs_chromium
def test_two_varying_settings_one_figure_each_the_other_as_columns(tmp_path):
    rows = []
    for opt in ("adam", "sgd"):
        for lr in (1e-3, 1e-2):
            for r in _rows():
                a = r["test_acc"] - (0.01 if opt == "sgd" else 0) - (0.005 if lr == 1e-2 else 0)
                rows.append({**r, "run_id": f"{opt}{lr}", "optimizer": opt, "lr": lr, "test_acc": a})
    _write(tmp_path, rows)
    build_report(tmp_path)
    rep = tmp_path / "report"
    assert sorted(p.name for p in rep.glob("sensitivity_*.png")) == ["sensitivity_lr.png", "sensitivity_optimizer.png"]
    md = (rep / "report.md").read_text()
    for facet in ("lr (optimizer=adam): ", "lr (optimizer=sgd): ", "optimizer (lr=0.001): ", "optimizer (lr=0.01): "):
        assert f"- {facet}with BN within 1 pp of its best" in md, facet
    table = pd.read_csv(rep / "sensitivity.csv")
    assert len(table) == 8 and set(table["facet"]) == {"optimizer=adam", "optimizer=sgd", "lr=0.001", "lr=0.01"}
    loaded, console, *_ = _open_in_chromium(rep / "report.html")  # the new figures load in a browser too
    assert console == [] and loaded.split("/")[0] == loaded.split("/")[1], loaded


def test_curves_draw_seeds_below_three_and_accuracy_bands_stay_in_0_1():
    from bnbench.reporting.figures import curve_bands
    from bnbench.reporting.report import curve_drawing

    def live(accs):
        return pd.DataFrame([dict(config="c", variant="with BN", seed=s, epoch=e, test_acc=a, test_loss=1 - a)
                             for s, a in enumerate(accs) for e in (1, 2)])

    three = live([0.999, 0.95, 0.999])  # a t-interval from these spans past 1
    bands = curve_bands(three, ["test_acc", "test_loss"])
    seeds = three.groupby(["config", "variant"])["seed"].nunique()
    drawn = curve_drawing(three, bands, seeds, "c", "with BN", "test_acc")
    raw = bands[bands["metric"] == "test_acc"]
    assert drawn["kind"] == "band" and (raw["mean"] + raw["half"]).max() > 1  # the band would leave [0, 1] ...
    assert drawn["hi"].max() == 1.0 and drawn["lo"].min() >= 0  # ... and is drawn inside it
    loss = curve_drawing(three, bands, seeds, "c", "with BN", "test_loss")
    assert loss["lo"].min() < 0  # losses are not clipped: only accuracies are fractions
    two = live([0.999, 0.95])
    drawn = curve_drawing(two, curve_bands(two, ["test_acc"]), two.groupby(["config", "variant"])["seed"].nunique(),
                          "c", "with BN", "test_acc")
    assert drawn["kind"] == "seeds" and "lo" not in drawn and len(drawn["seeds"]) == 2
    assert [list(y) for _, y in drawn["seeds"]] == [[0.999, 0.999], [0.95, 0.95]]


def test_settings_that_vary_together_are_one_axis(tmp_path):
    # At dp 1 per_device_batch is batch_size: one figure, not two empty ones.
    rows = [{**r, "run_id": f"b{b}", "batch_size": b, "per_device_batch": b, "test_acc": r["test_acc"] - b / 1e4}
            for b in (10, 100, 1000) for r in _rows()]
    _write(tmp_path, rows)
    build_report(tmp_path)
    rep = tmp_path / "report"
    assert [p.name for p in rep.glob("sensitivity_*.png")] == ["sensitivity_batch_size.png"]
    assert "- batch_size: with BN within 1 pp of its best" in (rep / "report.md").read_text()


def _glance_rows() -> list[dict]:
    """6 configurations (optimizer x lr; sgd with a wider net, on 2 processes), 2 epochs, 3 seeds, a long device
    name; one configuration's runs stopped at epoch 1 of 2 (its table rows say so)."""
    rows = []
    for opt, hidden, world in (("adam", "32,32", 1), ("sgd", "256,256,256,256", 2)):
        for lr in (1e-3, 1e-2, 1e-1):
            for r in _rows():
                if opt == "sgd" and lr == 1e-1 and r["epoch"] == 2:
                    continue
                rows.append({**r, "run_id": f"{opt}{lr}", "optimizer": opt, "lr": lr, "hidden": hidden, "world_size": world,
                             "dp": world, "device_name": "AMD EPYC 7B13 64-Core Processor (a long name)", "members": 6,
                             "samples_per_s": 1000.0 * world + r["epoch"]})
    return rows


@pytest.mark.needs_chromium
def test_a_report_of_many_configurations_reads_at_1280_px(tmp_path):
    """Issue 31: no horizontal scroll at 1280 px; each configuration named once (a key table; C1, C2, ... in the
    other tables, plain column names); learning curves across the page's width with one legend."""
    from bnbench.reporting.report import figures

    _write(tmp_path, _glance_rows())
    page = build_report(tmp_path)
    opened = _open_in_chromium(page)
    assert opened.console == [] and opened.loaded.split("/")[0] == opened.loaded.split("/")[1], opened
    assert opened.window_width == WIDTH and opened.scroll_width <= WIDTH and opened.widest <= WIDTH, opened
    md = (tmp_path / "report" / "report.md").read_text()
    key = md.split("## Configurations")[1].split("##")[0]
    assert "6 configurations, named C1 to C6" in key and "| config | hidden | optimizer | lr | dp | processes |" in key
    assert "| C1 | 256,256,256,256 | sgd | 0.001 | 2 | 2 |" in key and "| C6 | 32,32 | adam | 0.1 | 1 | 1 |" in key
    for section in ("## Final test accuracy", "## Paired difference", "## Time to"):
        rows = [line for line in md.split(section)[1].split("##")[0].splitlines() if line.startswith("| C")]
        assert rows and all("=" not in line and "hidden" not in line for line in rows), section
    assert "| C3 | with BN |" in md and "| 1 of 2 (incomplete) |" in md
    for name in ("variant", "mean ± std", "seeds", "BN - no-BN (pp)", "median epochs", "member-samples/s"):
        assert f"| {name} |" in md, name
    lines = md.splitlines()
    headers = [line for line, below in zip(lines, lines[1:]) if below.startswith("|---")]
    for raw in ("difference_pp", "median_epochs", "samples_per_s", "max_epochs_run", "world_size", "ci95", "bn |"):
        assert not any(raw in h for h in headers), (raw, headers)
    figs = figures(tmp_path)
    curves = figs["learning_curves"]
    assert len(curves.legends) == 1 and all(ax.get_legend() is None for ax in curves.axes)  # the legend once
    grid = {(round(ax.get_position().x0, 2), round(ax.get_position().y0, 2)) for ax in curves.axes}
    assert len({x for x, _ in grid}) == 4 and len({y for _, y in grid}) == 6  # metrics across, configurations down
    assert "throughput" in figs  # 1 and 2 processes: two points along its axis


def test_one_layout_one_epoch_no_figure_of_a_single_point(tmp_path):
    """Throughput of one layout is a sentence with its range; one epoch draws no learning curves."""
    rows = [{**r, "samples_per_s": 900.0 + 100 * r["epoch"] + r["seed"], "device_name": "CPU", "members": 6}
            for r in _rows()]
    _write(tmp_path / "two", rows)
    build_report(tmp_path / "two")
    md = (tmp_path / "two" / "report" / "report.md").read_text()
    section = md.split("## Throughput and scaling")[1].split("##")[0]
    # epoch 2 (after the warm-up epoch): 1,100 + seed 0..2 for every member
    assert section.strip().startswith("One layout: 1,101 member-samples/s (median over epoch 2; range 1,100 to 1,102) "
                                      "with device CPU, 1 process, engine stacked, sync BN off, 6 members, batch 100.")
    assert "|" not in section and not (tmp_path / "two" / "report" / "throughput.png").exists()
    _write(tmp_path / "one", [r for r in rows if r["epoch"] == 1])
    build_report(tmp_path / "one")
    md = (tmp_path / "one" / "report" / "report.md").read_text()
    assert "One evaluation per member: no curve to draw" in md
    assert sorted(p.name for p in (tmp_path / "one" / "report").glob("*.png")) == ["final_accuracy.png"]


@pytest.mark.needs_chromium
def test_the_committed_lab_report_reads_at_1280_px(tmp_path):
    """reports/lab/report at 1280 px: every figure loads, nothing scrolls sideways; its screenshot is 1280 px wide.
    BNBENCH_UPDATE_SCREENSHOT=1 takes the screenshot again (after `bnbench report reports/lab`)."""
    committed = REPO / "reports" / "lab" / "report"
    page = tmp_path / "report.html"
    page.write_text((committed / "report.html").read_text())  # the probe is written beside the page: not in the repo
    opened = _open_in_chromium(page)
    assert opened.console == [] and opened.loaded == "3/3", opened  # final accuracy, learning curves, time to target
    assert opened.window_width == WIDTH and opened.scroll_width <= WIDTH and opened.widest <= WIDTH, opened
    shot = committed / "screenshot-1280.png"
    if os.environ.get("BNBENCH_UPDATE_SCREENSHOT"):
        screenshot(page, shot)
    assert png_size(shot) == (WIDTH, GLANCE)
    assert "![the lab's report in Chromium at 1280 px](reports/lab/report/screenshot-1280.png)" in (REPO / "README.md").read_text()
