"""The cost probe (train/cost.py): each variant timed alone before training, with training bitwise
untouched; and the report's table of what each variant costs, from rows that carry the probe's rates."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bnbench.config import make_config
from bnbench.reporting.report import analyse, build_report, shown_tables
from bnbench.reporting.select import prepare
from bnbench.store.results import ResultsWriter, read_results
from bnbench.train.cost import probe
from bnbench.training import training_function

from conftest import make_setup, subset

METRICS = ["variant", "seed", "epoch", "step", "step_impl", "train_loss", "train_acc", "test_loss", "test_acc",
           "train_loss_running"]


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_the_probe_leaves_training_bitwise_unchanged(tmp_path, mnist_cpu, accelerator, engine):
    # bn,nobn take the hand-written step (stacked), ln,brn autograd: both of the probe's paths.
    splits = subset(mnist_cpu["float32"], 1000, 300)  # 20 steps an epoch
    trainers = {}
    for on in (False, True):
        cfg = make_config(variants=("bn", "nobn", "ln", "brn"), seeds=(0, 1), epochs=2, batch_size=50, engine=engine,
                          cost_probe=on)
        setup = make_setup(accelerator, splits, on_trainer=lambda t, on=on: trainers.setdefault(on, t))
        training_function(cfg, tmp_path / str(on), setup, quiet=True)
    plain, probed = trainers[False], trainers[True]
    for variant, seed in plain.members:
        a, b = plain.member_state(variant, seed), probed.member_state(variant, seed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (variant, seed)
    rows_off, rows_on = read_results(tmp_path / "False")[0], read_results(tmp_path / "True")[0]
    pd.testing.assert_frame_equal(rows_off[METRICS], rows_on[METRICS], check_exact=True)
    assert rows_off["variant_samples_per_s"].isna().all()
    rates = rows_on["variant_samples_per_s"]
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in rates)
    assert (rows_on.groupby("variant")["variant_samples_per_s"].nunique() == 1).all()  # one rate per variant here
    # The global RNG (reference_mlp's nn.Linear draws from it) is as the probe found it.
    state = torch.get_rng_state()
    assert set(probe(probed)[0]) == {"bn", "nobn", "ln", "brn"}
    assert torch.equal(state, torch.get_rng_state())


def _rows(rates: dict) -> list[dict]:
    """Two runs of 3 seeds x the variants in rates ({variant: (run 1's rate, run 2's)}), 2 epochs each."""
    rows = []
    for r, run_id in enumerate(("r1", "r2")):
        for v, rate in rates.items():
            for s in range(3):
                for e in (1, 2):
                    a = 0.95 + 0.01 * e + 0.001 * s + (0.005 if v == "bn" else 0)
                    rows.append(dict(run_id=run_id, preset="seed", dataset="mnist", variant=v, seed=s, epoch=e,
                                     epochs=2, test_acc=a, test_loss=1 - a, train_acc=a, train_loss=1 - a,
                                     diverged=False, train_seconds=1.5, hidden="32,32", activation="relu",
                                     optimizer="adam", lr=1e-3, batch_size=100, engine="stacked", dtype="float32",
                                     world_size=1, dp=1, sync_bn=False, device="cpu", device_name="CPU", members=9,
                                     samples_per_s=150_000.0, variant_samples_per_s=rate[r], repeat=r))
    return rows


def test_the_report_shows_what_each_variant_costs(tmp_path):
    rows = _rows({"nobn": (400_000.0, 400_000.0), "bn": (300_000.0, 340_000.0), "ln": (90_000.0, 110_000.0)})
    with ResultsWriter(tmp_path) as w:
        w.append(rows)
    build_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Throughput and scaling")[1].split("\n## ")[0]
    assert "What each variant costs to train: member-samples/s of that variant alone" in section
    assert "ratio to no-BN's in the same setting (below 1: slower)" in section
    assert "| variant | member-samples/s | ratio to no-BN | runs |" in section
    # Medians over the two runs, each against no-BN's 400,000; the baseline first.
    rows_shown = ["| without BN | 400,000 | 1.00 | 2 |", "| with BN | 320,000 | 0.80 | 2 |",
                  "| LayerNorm | 100,000 | 0.25 | 2 |"]
    assert "\n".join(rows_shown) in section, section
    assert (tmp_path / "report" / "variant_cost.csv").exists()
    # Rows without the field (every folder before the probe), or with it for one variant: no table, no sentence.
    old = prepare(pd.DataFrame(rows).drop(columns=["variant_samples_per_s"]))
    one = prepare(pd.DataFrame(rows).assign(variant_samples_per_s=lambda d: d["variant_samples_per_s"].where(
        d["variant"] == "bn")))
    for df in (old, one):
        a = analyse(df)
        assert a.costs.empty and "variant_cost" not in shown_tables(a)
