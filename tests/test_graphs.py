"""The step restructured for CUDA-graph capture (train/graphs.py): on the CPU, everything but the
capture itself, bitwise Trainer.step. On a GPU, bench/gpu_check.py compares captured and uncaptured."""
from __future__ import annotations

import pytest
import torch

from bnbench.config import make_config
from bnbench.train.engine import Trainer
from bnbench.train.graphs import GraphStep

from conftest import subset


@pytest.mark.parametrize("kw", [dict(), dict(optimizer="sgd", lr=0.05, momentum=0.9, dtype="float64"),
                                dict(variants=("bn",), hidden=(24, 16, 8))], ids=["lab", "sgd-float64", "bn-3-layers"])
def test_the_restructured_step_is_trainer_step_bitwise(mnist_cpu, accelerator, kw):
    kw = {**dict(seeds=(0, 1)), **kw}
    splits = subset(mnist_cpu[kw.get("dtype", "float32")], 4000, 100)  # 40 steps
    plain = Trainer(make_config(**kw), splits, accelerator)
    graphed = GraphStep(Trainer(make_config(**kw), splits, accelerator))
    assert graphed.graph is None
    order = plain.epoch_order(1)
    loss_sum = torch.zeros(len(plain.members), dtype=torch.float64)
    for t in range(40):
        plain.step(*plain.batch_at(order, t), loss_sum)
        graphed(*graphed.trainer.batch_at(order, t))
    assert torch.equal(loss_sum, graphed.loss_sum)
    for member in plain.members:
        a, b = plain.member_state(*member), graphed.trainer.member_state(*member)
        assert all(torch.equal(a[k], b[k]) for k in a), member


def test_capture_is_refused_where_it_cannot_run(mnist_cpu, accelerator):
    splits = subset(mnist_cpu["float32"], 500, 100)
    with pytest.raises(ValueError, match="capture needs a CUDA device"):
        GraphStep(Trainer(make_config(seeds=(0,)), splits, accelerator), capture=True)
    with pytest.raises(ValueError, match="without --instrument or --compile"):
        GraphStep(Trainer(make_config(seeds=(0,), instrument=True), splits, accelerator))


def test_warm_up_before_capture_leaves_the_first_step_to_come(mnist_cpu, accelerator):
    """What capture needs first, rehearsed on the CPU: warm-up steps make the capturable Adam's state,
    then parameters, buffers, moments and step counts go back to a fresh trainer's; the steps after
    are bitwise a fresh capturable trainer's."""
    splits = subset(mnist_cpu["float32"], 2000, 100)
    fresh = GraphStep(Trainer(make_config(seeds=(0, 1)), splits, accelerator), capturable=True)
    warmed = GraphStep(Trainer(make_config(seeds=(0, 1)), splits, accelerator), capturable=True)
    warmed.prepare_for_capture(warmup=3)
    opt = warmed.trainer.optimizer_groups[0].optimizer
    assert opt.defaults["capturable"] and len(opt.state) > 0
    assert all(float(s["step"]) == 0.0 for s in opt.state.values())
    order = fresh.trainer.epoch_order(1)
    for t in range(20):
        for g in (fresh, warmed):
            g(*g.trainer.batch_at(order, t))
    assert torch.equal(fresh.loss_sum, warmed.loss_sum)
    for member in fresh.trainer.members:
        a, b = fresh.trainer.member_state(*member), warmed.trainer.member_state(*member)
        assert all(torch.equal(a[k], b[k]) for k in a), member
    sa = fresh.trainer.optimizer_groups[0].optimizer.state_dict()["state"]
    sb = opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
