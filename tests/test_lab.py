"""The main job reproduces the lab: the default benchmark, full MNIST, 5 seeds x 15 epochs (~2 min on 2 cores)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bnbench.config import make_config
from bnbench.report import build_report, final_rows
from bnbench.provenance import environment
from bnbench.results import read_results
from bnbench.run import training_function

from conftest import REPO, make_setup


@pytest.mark.slow
def test_default_benchmark_reproduces_the_lab(tmp_path, data_root, accelerator):
    cfg = make_config()  # preset "seed": what ./launch.sh runs
    assert (cfg.hidden, cfg.lr, cfg.batch_size, cfg.epochs, len(cfg.seeds)) == ((32, 32), 1e-3, 100, 15, 5)
    training_function(cfg, tmp_path, make_setup(accelerator, data_root=data_root), quiet=True)
    df, problems = read_results(tmp_path)
    assert problems == [] and len(df) == 2 * 5 * 15
    final = final_rows(df)
    assert (final["epoch"] == 15).all() and (final["test_total"] == 10000).all()
    acc = final.pivot(index="seed", columns="variant", values="test_acc")
    summary = acc.describe().loc[["mean", "min", "max"]].round(4).to_dict()
    # The lab's single run: 0.9728 with BN, 0.9644 without.
    assert acc["bn"].mean() >= 0.970, summary
    assert acc["nobn"].mean() >= 0.955, summary
    assert (acc["bn"] > acc["nobn"]).all(), f"BN not ahead on every seed: {acc.to_dict()}"
    assert build_report(tmp_path).exists()
    print(f"final test accuracy: {summary}")

    # reports/lab/ holds what ./launch.sh gave when it was committed; the README quotes it. On the same
    # CPU model and torch build the run is bitwise reproducible, so it must match row for row.
    committed = REPO / "reports" / "lab"
    (meta,) = json.loads((committed / "meta.json").read_text())["runs"].values()
    same_env = meta["cpu"] == environment()["cpu"] and meta["versions"]["torch"] == torch.__version__
    keys, cols = ["variant", "seed", "epoch"], ["train_loss", "train_acc", "test_loss", "test_acc", "train_loss_running"]
    old = pd.read_json(committed / "results.jsonl", lines=True, precise_float=True).sort_values(keys)[keys + cols]
    new = df.sort_values(keys)[keys + cols]
    if same_env:
        pd.testing.assert_frame_equal(old.reset_index(drop=True), new.reset_index(drop=True), check_exact=True)
    else:
        print(f"reports/lab made on {meta['cpu']} / torch {meta['versions']['torch']}; here {environment()['cpu']} / "
              f"{torch.__version__}: bitwise comparison not applicable, thresholds checked above")
