"""The report for any number of variants: each against a baseline, paired by seed, Holm-adjusted over
the comparisons shown; the lab's two-variant report reads as it always did."""
from __future__ import annotations

import pytest

from bnbench import cli
from bnbench.config import ConfigError
from bnbench.reporting.report import analyse, read_folder

from conftest import REPO

NORMS = REPO / "reports" / "norms"


def _analysis(folder, baseline=None):
    df, problems, meta = read_folder(folder)
    return analyse(df, problems, meta, baseline=baseline)


def test_every_variant_against_the_baseline_with_holm():
    a = _analysis(NORMS)
    assert a.baseline == "nobn" and not a.lab
    v = a.verdict
    assert set(v["variant"]) == {"bn", "ln", "gn", "rms", "brn"} and (v["baseline"] == "nobn").all()
    assert len(v) == 5 * 7  # five variants x seven batch sizes
    assert (v["p_holm"] >= v["p_t"]).all() and (v["p_holm"] <= 1).all()
    assert all("Holm-adjusted over 35 comparisons" in text for text in v["verdict"])
    assert all(" against no-BN by " in text for text in v["verdict"])
    pairs = a.pairs
    assert {"variant", "baseline", "variant_acc", "baseline_acc", "difference"} <= set(pairs.columns)
    row = pairs.iloc[0]
    assert row["difference"] == pytest.approx(row["variant_acc"] - row["baseline_acc"])


def test_another_baseline_is_chosen_by_name_and_a_missing_one_refused():
    a = _analysis(NORMS, baseline="bn")
    assert set(a.verdict["variant"]) == {"nobn", "ln", "gn", "rms", "brn"} and (a.verdict["baseline"] == "bn").all()
    with pytest.raises(ConfigError, match="--baseline nobn: no such variant in these rows; they hold bn, ln, gn"):
        _analysis(REPO / "reports" / "norms_sync", baseline="nobn")  # the error names what is there
    with pytest.raises(SystemExit) as exit_:  # argparse: an unknown variant, before any work
        cli.main(["report", str(NORMS), "--baseline", "layer"])
    assert exit_.value.code == 2


def test_the_lab_reads_as_it_always_did():
    a = _analysis(REPO / "reports" / "lab")
    assert a.lab and list(a.pairs.columns) == ["config", "seed", "epoch", "complete", "bn", "nobn", "difference"]
    (line,) = a.verdict_lines
    assert ": BN raises final test accuracy by 0.69 pp [95% CI +0.59, +0.76]" in line
    assert "Holm" not in line and "against" not in line
