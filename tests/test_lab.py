"""The main job reproduces the lab: the default benchmark's settings, full MNIST, 15 epochs, for two of its five seeds.

A member trains bitwise the same in a stack of any size (models.ALIGN_BYTES; test_distributed proves it
with seed groups), so two seeds check the committed run member for member at 2/5 of its cost (~50 s on
2 cores instead of ~2 min for all five).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bnbench.config import make_config
from bnbench.reporting.report import build_report, final_rows
from bnbench.store.provenance import environment
from bnbench.store.results import read_results
from bnbench.training import training_function

from conftest import REPO, make_setup


SEEDS = (0, 1)


@pytest.mark.slow
def test_default_benchmark_reproduces_the_lab(tmp_path, data_root, accelerator):
    lab_cfg = make_config()  # preset "seed": what ./launch.sh runs
    assert (lab_cfg.hidden, lab_cfg.lr, lab_cfg.batch_size, lab_cfg.epochs, lab_cfg.seeds) == ((32, 32), 1e-3, 100, 15, (0, 1, 2, 3, 4))
    cfg = make_config(seeds=SEEDS)
    training_function(cfg, tmp_path, make_setup(accelerator, data_root=data_root), quiet=True)
    df, problems = read_results(tmp_path)
    assert problems == [] and len(df) == 2 * len(SEEDS) * 15
    final = final_rows(df)
    assert (final["epoch"] == 15).all() and (final["test_total"] == 10000).all()
    acc = final.pivot(index="seed", columns="variant", values="test_acc")
    summary = acc.describe().loc[["mean", "min", "max"]].round(4).to_dict()
    # The lab notebook printed 0.97 with BN and 0.95 without at epoch 4, the last it shows.
    assert acc["bn"].mean() >= 0.970, summary
    assert acc["nobn"].mean() >= 0.955, summary
    assert (acc["bn"] > acc["nobn"]).all(), f"BN not ahead on every seed: {acc.to_dict()}"
    assert build_report(tmp_path).exists()
    assert (df["step_impl"] == "fused").all()  # the default run takes the hand-written step (bitwise autograd's)
    print(f"final test accuracy: {summary}")

    # reports/lab/ holds what ./launch.sh gave when it was committed; the README quotes it.
    committed = REPO / "reports" / "lab"
    (meta,) = json.loads((committed / "meta.json").read_text())["runs"].values()
    same_env = meta["cpu"] == environment()["cpu"] and meta["versions"]["torch"] == torch.__version__
    keys, cols = ["variant", "seed", "epoch"], ["train_loss", "train_acc", "test_loss", "test_acc", "train_loss_running"]
    old = pd.read_json(committed / "results.jsonl", lines=True, precise_float=True).sort_values(keys)[keys + cols]
    assert sorted(set(old["seed"])) == list(lab_cfg.seeds)  # the committed run is the whole lab
    old = old[old["seed"].isin(SEEDS)]
    new = df.sort_values(keys)[keys + cols]
    old, new = old.reset_index(drop=True), new.reset_index(drop=True)

    # On any machine: the same members (variant, seed), each with the same epochs, as the lab.
    assert sorted(set(old["seed"])) == sorted(set(new["seed"])) == list(SEEDS)
    assert old[keys].values.tolist() == new[keys].values.tolist(), "not the lab's members and epochs"
    # On any machine, every member's final test accuracy within TOLERANCE of the lab's same member.
    # Another CPU model or torch build rounds the float sums differently; over 9,000 steps the last
    # bits grow, so a member can land where a run with another seed would. The lab's own seeds give
    # that spread: final accuracy with BN 97.24-97.38% (0.14 points apart), without 96.45-96.85%
    # (0.40 points; a standard deviation of 0.15). 0.5 points = 50 of the 10,000 test images: above
    # that whole range, so a sound run on other hardware passes, yet a member 51 images off its
    # committed value fails, where the thresholds above let a member drift by a point or more.
    tolerance = 0.005
    old_final = old[old["epoch"] == cfg.epochs].set_index(["variant", "seed"])["test_acc"]
    new_final = new[new["epoch"] == cfg.epochs].set_index(["variant", "seed"])["test_acc"]
    drift = (new_final - old_final).round(4)
    assert (drift.abs() <= tolerance).all(), f"final test accuracy minus the lab's, per member (tolerance {tolerance}): {drift.to_dict()}"
    # And BN ahead on every seed, here (asserted above) as in the lab.
    lab = old_final.unstack("variant")
    assert (lab["bn"] > lab["nobn"]).all() and (acc["bn"] > acc["nobn"]).all()
    print(f"final test accuracy minus the lab's, per member: {drift.to_dict()}")

    # On the same CPU model and torch build the run is bitwise reproducible, so it must match row for row.
    if same_env:
        pd.testing.assert_frame_equal(old, new, check_exact=True)
    else:
        print(f"reports/lab made on {meta['cpu']} / torch {meta['versions']['torch']}; here {environment()['cpu']} / "
              f"{torch.__version__}: bitwise comparison not applicable; members, epochs and accuracies checked above")
