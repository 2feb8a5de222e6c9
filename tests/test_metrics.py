"""Metrics are exact: every sample scored once, accuracy = correct/total, loss = mean over samples."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnbench.config import make_config
from bnbench.train.engine import Trainer
from bnbench.train.models import reference_mlp

from conftest import subset


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_metrics_equal_hand_count(accelerator, mnist_cpu, engine):
    # 1,003 test samples scored in chunks of 100: a ragged last chunk that must not be dropped.
    splits = subset(mnist_cpu["float64"], 1000, 1003)
    cfg = make_config(seeds=(0, 5), epochs=1, dtype="float64", engine=engine, eval_batch=100)
    t = Trainer(cfg, splits, accelerator)
    t.train_epoch(1)
    loss, correct, total = t.evaluate(splits.test_x, splits.test_y)
    assert total == 1003
    for i, (variant, seed) in enumerate(t.members):
        state = t.member_state(variant, seed)
        model = reference_mlp(_inits(state, variant), variant)
        model.load_state_dict(state)
        model.eval()
        hand_correct, hand_loss = 0, 0.0
        with torch.no_grad():
            for xi, yi in zip(splits.test_x, splits.test_y):  # one sample at a time, the slow obvious way
                logits = model(xi.unsqueeze(0))[0]
                hand_correct += int(int(torch.argmax(logits)) == int(yi))
                hand_loss += float(F.cross_entropy(logits.unsqueeze(0), yi.unsqueeze(0)))
        assert int(correct[i]) == hand_correct, (variant, seed)
        assert math.isclose(float(loss[i]), hand_loss / 1003, rel_tol=1e-12), (variant, seed)


def _inits(state, variant):
    keys = ["0", "3", "6"] if variant == "bn" else ["0", "2", "4"]
    return [(state[f"{k}.weight"], state[f"{k}.bias"]) for k in keys]


def test_eval_uses_running_statistics(accelerator, mnist_cpu):
    # In eval mode a sample's prediction must not depend on the other samples in its chunk.
    splits = subset(mnist_cpu["float32"], 1000, 300)
    t = Trainer(make_config(seeds=(0,), epochs=1, variants=("bn",)), splits, accelerator)
    t.train_epoch(1)
    a = t.evaluate(splits.test_x, splits.test_y)
    t.cfg = make_config(seeds=(0,), epochs=1, variants=("bn",), eval_batch=7)
    b = t.evaluate(splits.test_x, splits.test_y)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=1e-6)


def test_max_indices_are_argmax_with_ties_and_nan():
    # evaluate counts a sample correct by max(1).indices (faster on the strided class axis): the
    # first maximal class, as argmax, ties and NaN included.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 10, 5000), generator=g).float()  # many ties
    logits[2, 3, ::7] = float("nan")
    logits[4, :, ::11] = 1.0  # all ten tied
    assert torch.equal(logits.max(1).indices, logits.argmax(1))
    assert (logits.max(1).indices[4, ::11] == 0).all() and (logits.max(1).indices[2, ::7] == 3).all()


def test_holm_adjusts_the_comparisons_shown_together():
    from bnbench.reporting.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.2 -> 0.04, 0.06, 0.06 (monotone), 0.2; None stays None.
    got = holm([0.03, 0.01, None, 0.2, 0.02])
    assert got[2] is None and got[0] == pytest.approx(0.06) and got[1] == pytest.approx(0.04)
    assert got[3] == pytest.approx(0.2) and got[4] == pytest.approx(0.06)
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == [] and holm([0.04]) == [0.04]
    nan = float("nan")
    got = holm([nan, 1e-5, 1.3e-5, 0.83])  # a comparison without a test does not count, nor poison the others
    assert got[0] != got[0] and got[1:] == pytest.approx([3e-5, 3e-5, 0.83])
