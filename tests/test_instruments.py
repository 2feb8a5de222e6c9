"""Instruments against hand computation on a tiny network; training unchanged by them; the presets.

The hand side is plain torch.nn (reference_mlp + torch.optim.SGD), a hand-written forward
for the pre-activations (no F.batch_norm, no functional_call), torch.quantile, and copies of
the model for the Santurkar et al. measures: nothing of bnbench's instruments is reused.
"""
from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnbench.config import ConfigError, make_config
from bnbench.dist.groups import Mesh
from bnbench.dist.layout import Layout
from bnbench.train.engine import Trainer, epoch_permutation
from bnbench.train.instruments import PROBE_SAMPLES, PROBE_NEURONS, QUANTILES
from bnbench.train.models import init_linears, reference_mlp
from bnbench.store.folder import INSTRUMENTS_FILE, move_rows_aside
from bnbench.store.results import read_instruments, read_results
from bnbench.training import training_function

from conftest import make_setup, subset

TINY = dict(hidden=(6, 5), activation="sigmoid", bn_drop_bias=True, optimizer="sgd", lr=0.5, batch_size=20,
            seeds=(0, 1), dtype="float64", instrument=True, instrument_every=3, ics_every=4, ics_etas=(0.1, 0.7))


def _hand_preacts(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs to each nonlinearity by the formulas: x W^T + b, then (h - mean) / sqrt(var + eps) g + s."""
    out, h = [], x
    for m in model:
        if isinstance(m, nn.Linear):
            h = h @ m.weight.T + (m.bias if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm1d):
            mean, var = h.mean(0), h.var(0, unbiased=False)  # train mode: the batch's own statistics
            h = (h - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
        else:
            out.append(h)
            h = torch.sigmoid(h)
    return out


def _grads(model: nn.Module, xb, yb) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def _hand_run(cfg, splits, steps: int) -> list[dict]:
    """Each member trained alone by the lab's loop, measured by hand at the instrumented steps."""
    rows = []
    n, b = splits.train_x.shape[0], cfg.batch_size
    per_epoch = n // b
    probe = splits.test_x[:PROBE_SAMPLES]
    for variant in cfg.variants:
        for seed in cfg.seeds:
            inits = init_linears(seed, cfg.layer_sizes)
            model = reference_mlp([(w.double(), bb.double()) for w, bb in inits], variant,
                                  activation="sigmoid", drop_bias=cfg.bn_drop_bias)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            linears = [m for m in model if isinstance(m, nn.Linear)]
            # Parameters per layer: a Linear and the BatchNorm1d after it.
            blocks, cur = [], None
            for m in model:
                if isinstance(m, nn.Linear):
                    cur = [m]
                    blocks.append(cur)
                elif isinstance(m, nn.BatchNorm1d):
                    cur.append(m)
            key = dict(variant=variant, seed=seed)
            for g in range(steps):
                epoch, t = g // per_epoch + 1, g % per_epoch
                idx = epoch_permutation(seed, epoch, n)[t * b:(t + 1) * b]
                xb, yb = splits.train_x[idx], splits.train_y[idx]
                model.train()
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                if g % cfg.instrument_every == 0:
                    for i, lin in enumerate(linears):
                        rows.append({**key, "step": g, "measure": "grad_norm", "layer": i + 1, "value": lin.weight.grad.norm().item()})
                    with torch.no_grad():
                        h = _hand_preacts(model, probe)[-1][:, list(PROBE_NEURONS)]
                    qs = torch.quantile(h, torch.tensor(QUANTILES, dtype=h.dtype), dim=0)
                    for j, unit in enumerate(PROBE_NEURONS):
                        for qi, q in enumerate(QUANTILES):
                            rows.append({**key, "step": g, "measure": "preact", "layer": len(linears) - 1,
                                         "neuron": unit, "q": q, "value": qs[qi, j].item()})
                before = copy.deepcopy(model)  # w_t (deepcopy leaves the gradients behind)
                G = [p.grad.clone() for p in model.parameters()]
                G_weight = [lin.weight.grad.clone() for lin in linears]
                if g % cfg.ics_every == 0:
                    rows.append({**key, "step": g, "measure": "grad_norm_all", "value": math.sqrt(sum((x ** 2).sum().item() for x in G))})
                    for eta in cfg.ics_etas:
                        moved = copy.deepcopy(before)
                        with torch.no_grad():
                            for p, gp in zip(moved.parameters(), G):
                                p -= eta * gp
                        loss, G2 = _grads(moved, xb, yb)
                        change = math.sqrt(sum(((a - c) ** 2).sum().item() for a, c in zip(G, G2)))
                        rows.append({**key, "step": g, "measure": "grad_change", "eta": eta, "value": change})
                        rows.append({**key, "step": g, "measure": "loss_along", "eta": eta, "value": loss})
                opt.step()
                if g % cfg.ics_every == 0:
                    new_blocks = [[m for m in blk] for blk in _blocks_of(model)]
                    for layer in range(1, len(blocks)):
                        mixed = copy.deepcopy(before)  # layers below `layer` take their updated weights
                        for blk_old, blk_new in zip(_blocks_of(mixed)[:layer], new_blocks[:layer]):
                            for m_old, m_new in zip(blk_old, blk_new):
                                m_old.load_state_dict(m_new.state_dict())
                        _, G2 = _grads(mixed, xb, yb)
                        lin_mix = [m for m in mixed if isinstance(m, nn.Linear)][layer]
                        a, c = G_weight[layer].flatten(), lin_mix.weight.grad.flatten()
                        rows.append({**key, "step": g, "measure": "ics_distance", "layer": layer + 1, "value": (a - c).norm().item()})
                        rows.append({**key, "step": g, "measure": "ics_cosine", "layer": layer + 1,
                                     "value": (a @ c / (a.norm() * c.norm())).item()})
    return rows


def _blocks_of(model: nn.Sequential) -> list[list[nn.Module]]:
    blocks = []
    for m in model:
        if isinstance(m, nn.Linear):
            blocks.append([m])
        elif isinstance(m, nn.BatchNorm1d):
            blocks[-1].append(m)
    return blocks


def _instrumented(cfg, splits, accelerator, steps: int) -> pd.DataFrame:
    t = Trainer(cfg, splits, accelerator)
    t.train_steps(steps)
    return pd.DataFrame(t.instruments.rows({}))


KEYS = ["variant", "seed", "step", "measure", "layer", "neuron", "q", "eta"]


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_instruments_equal_hand_computation(mnist_cpu, accelerator, engine):
    # 200 samples / batch 20 = 10 steps an epoch: 12 steps cross an epoch boundary.
    splits = subset(mnist_cpu["float64"], 200, 150)
    cfg = make_config("ioffe2015", **TINY, engine=engine)
    ours = _instrumented(cfg, splits, accelerator, 12)
    hand = pd.DataFrame(_hand_run(cfg, splits, 12))
    for k in KEYS:  # absent labels are NaN on both sides, for the merge
        ours[k] = ours.get(k, float("nan"))
        hand[k] = hand.get(k, float("nan"))
    both = hand.merge(ours, on=KEYS, how="outer", suffixes=("_hand", "_ours"), indicator=True)
    assert (both["_merge"] == "both").all(), both[both["_merge"] != "both"][KEYS + ["_merge"]]
    counts = both.groupby("measure").size().to_dict()
    # 4 members; grad_norm at steps 0,3,6,9 x 3 layers; preact 3 units x 3 quantiles; ICS at 0,4,8.
    assert counts == {"grad_norm": 4 * 4 * 3, "preact": 4 * 4 * 9, "ics_distance": 4 * 3 * 2, "ics_cosine": 4 * 3 * 2,
                      "grad_norm_all": 4 * 3, "grad_change": 4 * 3 * 2, "loss_along": 4 * 3 * 2}
    # float64: equal up to the order of summation (stacked: batched matmuls; reference: the same modules).
    torch.testing.assert_close(torch.tensor(both["value_ours"].to_numpy()), torch.tensor(both["value_hand"].to_numpy()),
                               rtol=1e-9, atol=1e-12)
    # Not trivially equal: the measures move, and BN changes them.
    assert both.groupby("measure")["value_hand"].nunique().min() > 4
    ics = both[both["measure"] == "ics_distance"]
    assert (ics["value_hand"] > 0).all()


def test_percentiles_are_torch_quantile_of_the_last_hidden_input(mnist_cpu, accelerator):
    # The recorded percentiles are torch.quantile's over the probe batch, unit by unit (also float32).
    splits = subset(mnist_cpu["float32"], 200, 1500)
    cfg = make_config("ioffe2015", **{**TINY, "dtype": "float32"})
    t = Trainer(cfg, splits, accelerator)
    t.train_steps(1)
    rows = pd.DataFrame(t.instruments.rows({}))
    pre = rows[(rows["measure"] == "preact") & (rows["variant"] == "nobn") & (rows["seed"] == 1)]
    state = t.member_state("nobn", 1)
    # Step 0 measures w_0: the member's initial weights (no-BN has its biases).
    inits = init_linears(1, cfg.layer_sizes)
    h = splits.test_x[:PROBE_SAMPLES]
    for w, b in inits[:-1]:
        z = h @ w.T + b
        h = torch.sigmoid(z)
    want = torch.quantile(z[:, list(PROBE_NEURONS)], torch.tensor(QUANTILES), dim=0)
    got = torch.tensor([[pre[(pre["neuron"] == u) & (pre["q"] == q)]["value"].item() for u in PROBE_NEURONS] for q in QUANTILES], dtype=torch.float64)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    assert state["0.weight"].shape == (6, 784) and len(pre) == 9 and (pre["step"] == 0).all()


def _tiny_run(tmp_path, accelerator, splits, name, **over):
    got = {}
    kw = dict(hidden=(16, 16), activation="sigmoid", bn_drop_bias=True, optimizer="sgd", lr=0.3, batch_size=50,
              epochs=2, seeds=(0, 1), **over)
    setup = make_setup(accelerator, splits, on_trainer=lambda t: got.setdefault("trainer", t))
    run_id = training_function(make_config("seed", **kw), tmp_path / name, setup, quiet=True)
    return run_id, got["trainer"]


METRICS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "train_loss_running"]


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_instruments_leave_training_bitwise_unchanged(tmp_path, mnist_cpu, accelerator, engine):
    splits = subset(mnist_cpu["float32"], 1000, 300)  # 20 steps an epoch
    _, off = _tiny_run(tmp_path, accelerator, splits, "off", engine=engine, eval_every=10)
    _, on = _tiny_run(tmp_path, accelerator, splits, "on", engine=engine, eval_every=10, instrument=True,
                      instrument_every=2, ics_every=5)
    for variant, seed in off.members:
        a, b = off.member_state(variant, seed), on.member_state(variant, seed)
        assert all(torch.equal(a[k], b[k]) for k in a), (variant, seed)
    rows_off, rows_on = read_results(tmp_path / "off")[0], read_results(tmp_path / "on")[0]
    pd.testing.assert_frame_equal(rows_off[METRICS], rows_on[METRICS])
    assert not (tmp_path / "off" / INSTRUMENTS_FILE).exists()
    inst, problems = read_instruments(tmp_path / "on")
    assert problems == [] and set(inst["measure"]) == {"grad_norm", "preact", "ics_distance", "ics_cosine", "grad_norm_all",
                                                       "grad_change", "loss_along"}
    assert sorted(inst.loc[inst["measure"] == "grad_norm", "step"].unique()) == list(range(0, 40, 2))
    assert sorted(inst.loc[inst["measure"] == "ics_cosine", "step"].unique()) == [0, 5, 10, 15, 20, 25, 30, 35]


def test_step_windows_train_exactly_the_epochs(tmp_path, mnist_cpu, accelerator):
    # Evaluating every 10 steps changes when rows are written, never the steps themselves.
    splits = subset(mnist_cpu["float32"], 1000, 300)
    _, whole = _tiny_run(tmp_path, accelerator, splits, "epochs")
    _, windows = _tiny_run(tmp_path, accelerator, splits, "windows", eval_every=10)
    for variant, seed in whole.members:
        a, b = whole.member_state(variant, seed), windows.member_state(variant, seed)
        assert all(torch.equal(a[k], b[k]) for k in a)
    per_epoch, per_window = read_results(tmp_path / "epochs")[0], read_results(tmp_path / "windows")[0]
    assert sorted(per_window["epoch"].unique()) == [0.5, 1, 1.5, 2] and sorted(per_window["step"].unique()) == [10, 20, 30, 40]
    at_ends = per_window[per_window["epoch"].isin([1, 2])].reset_index(drop=True)
    cols = ["epoch", "step", "train_loss", "test_loss", "test_acc", "train_acc"]
    pd.testing.assert_frame_equal(per_epoch[cols], at_ends[cols], check_dtype=False)
    # The running loss is the window's own mean mini-batch loss: the two halves average to the epoch's.
    halves = per_window.groupby([(per_window["step"] - 1) // 20, "variant", "seed"])["train_loss_running"].mean().to_numpy()
    assert halves == pytest.approx(per_epoch.sort_values(["epoch", "variant", "seed"])["train_loss_running"].to_numpy(), rel=1e-12)
    # A last window shorter than the others still ends the run.
    assert make_config("ioffe2015", eval_every=7, epochs=2).eval_steps(1, 1000 // 60 * 60) == [7, 14, 21, 28] + [32]


def test_presets_build_the_stated_architectures(mnist_cpu, accelerator):
    ioffe, deep = make_config("ioffe2015"), make_config("deep")
    assert (ioffe.hidden, ioffe.activation, ioffe.batch_size, ioffe.optimizer, ioffe.bn_drop_bias) == ((100, 100, 100), "sigmoid", 60, "sgd", True)
    assert ioffe.eval_steps(1)[-1] == 50_000 and len(ioffe.eval_steps(1)) == 100
    assert deep.hidden == (100,) * 10 and deep.activation == "sigmoid"
    splits = subset(mnist_cpu["float32"], 600, 100)
    for cfg in (make_config("ioffe2015", seeds=(0,), engine="reference"), make_config("deep", seeds=(0,), engine="reference")):
        t = Trainer(cfg, splits, accelerator)
        bn, nobn = (t._stack(v, 0)[0].net for v in ("bn", "nobn"))
        width = len(cfg.hidden)
        assert [type(m) for m in bn] == [nn.Linear, nn.BatchNorm1d, nn.Sigmoid] * width + [nn.Linear]
        assert [type(m) for m in nobn] == [nn.Linear, nn.Sigmoid] * width + [nn.Linear]
        lin_bn = [m for m in bn if isinstance(m, nn.Linear)]
        lin_nobn = [m for m in nobn if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in lin_bn] == list(zip(cfg.layer_sizes[:-1], cfg.layer_sizes[1:]))
        # BN's shift replaces the hidden biases; the output layer and every no-BN layer keep theirs.
        assert [m.bias is None for m in lin_bn] == [True] * width + [False]
        assert all(m.bias is not None for m in lin_nobn)
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(lin_bn, lin_nobn))  # one init per seed
        # The stacked engine holds the same parameters under the same names.
        s = Trainer(make_config(cfg.preset, seeds=(0,)), splits, accelerator)
        for v in ("bn", "nobn"):
            ref, st = t.member_state(v, 0), s.member_state(v, 0)
            assert {k: x.shape for k, x in ref.items()} == {k: x.shape for k, x in st.items()}


def test_instrument_refuses_several_processes(mnist_cpu, accelerator):
    with pytest.raises(ConfigError, match="--instrument measures in one process; this launch has 2"):
        two = Mesh(Layout(world=2, dp=2, members=10), rank=0)  # rank 0 of a 2-process launch
        Trainer(make_config("ioffe2015", instrument=True), subset(mnist_cpu["float32"], 600, 100), accelerator, two)


def test_interrupted_attempt_moves_its_measures_aside(tmp_path):
    rows = [{"run_id": r, "unit": u, "variant": "bn", "seed": 0, "step": 0, "measure": "grad_norm", "value": 1.0}
            for r, u in (("a", "x"), ("b", "y"))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps({"run_id": r["run_id"], "unit": r["unit"]}) + "\n" for r in rows))
    (tmp_path / INSTRUMENTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert move_rows_aside(tmp_path, lambda r: r["unit"] == "x") == {"a": 1}
    assert read_instruments(tmp_path)[0]["run_id"].tolist() == ["b"]
    assert json.loads((tmp_path / "superseded" / "a.instruments.jsonl").read_text())["measure"] == "grad_norm"


def test_report_section_states_the_measured_numbers(tmp_path, mnist_cpu, accelerator):
    from bnbench.reporting.report import build_report

    splits = subset(mnist_cpu["float32"], 1000, 300)
    _tiny_run(tmp_path, accelerator, splits, "on", eval_every=10, instrument=True, instrument_every=2, ics_every=5)
    _tiny_run(tmp_path, accelerator, splits, "off", eval_every=10)
    build_report(tmp_path / "on", target=0.5)
    build_report(tmp_path / "off", target=0.5)
    rep = tmp_path / "on" / "report"
    for stem in ("inside_figure1", "inside_grad_heatmap", "inside_ics"):
        assert (rep / f"{stem}.png").stat().st_size > 10_000 and (rep / f"{stem}.svg").exists(), stem
    md = (rep / "report.md").read_text()
    assert "Inside the network" not in (tmp_path / "off" / "report" / "report.md").read_text()
    # The paragraph's numbers, recomputed by hand from the two files.
    inst, rows = read_instruments(tmp_path / "on")[0], read_results(tmp_path / "on")[0]
    summary = pd.read_csv(rep / "instruments_summary.csv").set_index("variant")
    for v in ("bn", "nobn"):
        mine = inst[inst["variant"] == v]
        gn = mine[mine["measure"] == "grad_norm"].set_index(["seed", "step", "layer"])["value"].unstack()
        ratio = (gn[1] / gn[3]).median()
        med = mine[(mine["measure"] == "preact") & (mine["q"] == 0.5)].groupby(["seed", "neuron"])["value"]
        drift = (med.max() - med.min()).mean()
        cos = mine.loc[mine["measure"] == "ics_cosine", "value"].median()
        final = rows[(rows["variant"] == v) & (rows["step"] == 40)]["test_acc"].mean()
        got = summary.loc[v]
        assert got["grad_ratio_first_to_last"] == pytest.approx(ratio, rel=1e-12)
        assert got["median_range"] == pytest.approx(drift, rel=1e-12)
        assert got["ics_cosine_median"] == pytest.approx(cos, rel=1e-12)
        assert got["final_test_acc"] == pytest.approx(final, rel=1e-12)
        assert f"{ratio:.3g} times" in md and f"{drift:.2f}" in md and f"{cos:.4f}" in md and f"{final:.2%}" in md
