"""The peers of bench/test_peers.py compute what bnbench computes, and what each cannot do (issue 32).

Every peer (bench/peers.py) trains 2 seeds x (bn, nobn) for 20 steps in float64 from the same init on
the same batches (drawn by bnbench's Trainer.batch_at) and ends within 1e-9 of bnbench's stacked
engine, parameter by parameter (the stacked engine is proven equal to the reference engine to that
bound in tests/test_engines.py): the race times equal computations.

What each cannot do, shown here:
- torch.func with BN patched by replace_all_batch_norm_modules_ (the "func" peer): no running
  statistics; eval mode normalizes with the evaluated batch's own statistics, so its BN member's eval
  output is not bnbench's (running statistics), depends on what else is in the batch, and a batch of
  one fails. The limit torch's "Patching Batch Norm" page states is narrower than "vmap has no running
  statistics": what fails is an in-place update of *unbatched* buffers from a batched input (one module
  vmapped over data); the ensembling recipe's stacked buffers, vmapped with the parameters, are
  updated per member as nn.BatchNorm1d updates them ("func-stats" peer: running statistics and eval
  within 1e-9 of bnbench's, torch 2.14.1).
- torch.func ensembles: stack_module_state takes models of one structure only, so BN and no-BN
  members are two ensembles and two vmapped calls.
- one optimizer over stacked state (torch.func and bnbench alike): one lr per param group and a
  tensor lr must be one element, so members of one stacked tensor share their hyperparameters; any
  non-elementwise step (clip_grad_norm_) couples members through the shared tensor.
- the loop of models: K optimizers, K x the per-op overhead; it can do all of the above (its
  running statistics and eval are bnbench's to 1e-9).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

SEEDS, VARIANTS, STEPS, BOUND = (0, 1), ("bn", "nobn"), 20, 1e-9


def _load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


peers = _load("bench_peers", REPO / "bench" / "peers.py")
figures = _load("peers_figures", REPO / "reports" / "peers.py")


@pytest.fixture(scope="module")
def trained(mnist_cpu, accelerator):
    """Every peer after STEPS float64 steps on the same batches, and the batch source."""
    splits = mnist_cpu["float64"]
    source = peers.batch_source(SEEDS, VARIANTS, splits, accelerator, "float64")
    racers = {name: peers.make_peer(name, SEEDS, VARIANTS, splits, accelerator, "float64") for name in peers.PEERS}
    order = source.epoch_order(1)
    for t in range(STEPS):
        xb, yb = source.batch_at(order, t)
        for p in racers.values():
            p.step(xb, yb)
    return racers, splits


def _diff(a: dict, b: dict, keys) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


@pytest.mark.parametrize("name", [p for p in ("loop", "func", "func-stats", "stacked-autograd")])
def test_each_peer_trains_as_bnbench_stacked(trained, name):
    racers, _ = trained
    ref, peer = racers["stacked-fused"], racers[name]
    worst = 0.0
    for v in VARIANTS:
        for s in SEEDS:
            a, b = ref.member_state(v, s), peer.member_state(v, s)
            params = [k for k in a if not k.endswith(peers.BN_BUFFERS)]
            assert set(params) <= set(b), f"{name}: {v}/seed{s} lacks {set(params) - set(b)}"
            if name == "stacked-autograd":  # the seam's promise: bitwise on the CPU
                assert all(torch.equal(a[k], b[k]) for k in a), f"{v}/seed{s}: autograd step differs from fused"
            d = _diff(a, b, params)
            worst = max(worst, d)
            assert d <= BOUND, f"{name}: {v}/seed{s} max parameter difference {d:.3e} after {STEPS} float64 steps"
            stats = [k for k in b if k.endswith(("running_mean", "running_var"))]
            if v == "bn" and name == "func":
                assert stats == [], "replace_all_batch_norm_modules_ leaves no running statistics"
            elif v == "bn":
                assert len(stats) == 4 and _diff(a, b, stats) <= BOUND, f"{name}: running statistics differ"
                assert all(torch.equal(a[k], b[k]) for k in b if k.endswith("num_batches_tracked"))
    print(f"{name} vs bnbench stacked (fused), {STEPS} float64 steps: max parameter difference {worst:.3e}")


def test_patched_vmap_bn_evaluates_with_batch_statistics(trained):
    """The 'func' peer's BN member in eval mode is not bnbench's (running statistics): it takes the
    evaluated batch's own statistics, so a sample's output depends on its batch, and one sample
    alone fails. Its no-BN member, the loop and 'func-stats' evaluate as bnbench does."""
    racers, splits = trained
    ref, func = racers["stacked-fused"], racers["func"]
    x = splits.test_x[:1000]
    with_stats = ref.eval_logits("bn", x)
    for name in ("loop", "func-stats"):
        assert (racers[name].eval_logits("bn", x) - with_stats).abs().max().item() <= BOUND, name
    assert (func.eval_logits("nobn", x) - ref.eval_logits("nobn", x)).abs().max().item() <= BOUND
    batch_stats = func.eval_logits("bn", x)
    gap = (batch_stats - with_stats).abs().max().item()
    assert gap > 1e-2, f"patched BN's eval should differ from running-statistics eval; max |diff| {gap:.3e}"
    first_ten = func.eval_logits("bn", x[:10])
    assert (first_ten - batch_stats[:, :10]).abs().max().item() > 1e-2, "the same samples in another batch"
    assert (ref.eval_logits("bn", x[:10]) - with_stats[:, :10]).abs().max().item() <= BOUND
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        func.eval_logits("bn", x[:1])
    print(f"patched BN eval vs running-statistics eval after {STEPS} steps: max |logit diff| {gap:.3f}")


def test_vmap_refuses_unbatched_running_statistics():
    """Where torch's 'Patching Batch Norm' limit really is: one module vmapped over data (its
    buffers not batched) cannot update running statistics; stacked buffers (func-stats) can."""
    from bnbench.train.models import reference_mlp

    net = reference_mlp(peers.inits(0, torch.float32), "bn")
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    x = torch.randn(3, 8, 784)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        torch.vmap(lambda xi: torch.func.functional_call(net, (params, buffers), (xi,)))(x)


def test_stack_module_state_takes_one_structure():
    """BN and no-BN members cannot share one torch.func ensemble: two stacks, two vmapped calls."""
    from bnbench.train.models import reference_mlp

    bn, nobn = (reference_mlp(peers.inits(0, torch.float32), v) for v in ("bn", "nobn"))
    with pytest.raises(KeyError):
        torch.func.stack_module_state([bn, nobn])
    ens = peers.FuncEnsemble(SEEDS, VARIANTS, torch.float64)
    assert list(ens.ensembles) == ["bn", "nobn"]


def test_one_optimizer_over_stacked_state_couples_members(mnist_cpu, accelerator):
    """Stacked members share one param group (one lr, betas, eps): a per-member lr tensor is
    refused; a non-elementwise step such as clip_grad_norm_ mixes the members' gradients."""
    ens = peers.FuncEnsemble(SEEDS, ("nobn",), torch.float64)
    params = list(ens.ensembles["nobn"].params.values())
    assert len(ens.optimizer.param_groups) == 1 and all(p.shape[0] == len(SEEDS) for p in params)
    with pytest.raises(ValueError):
        torch.optim.Adam(params, lr=torch.tensor([1e-3, 2e-3], dtype=torch.float64))
    splits = mnist_cpu["float64"]
    xb = splits.train_x[:200].view(2, 100, -1)
    yb = splits.train_y[:200].view(2, 100)

    def clipped_member0(scale_member1: float) -> list[torch.Tensor]:
        e = ens.ensembles["nobn"]
        ens.optimizer.zero_grad()
        e.losses(e.params, e.buffers, xb, yb).sum().backward()
        for p in params:
            p.grad[1] *= scale_member1
        torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
        return [p.grad[0].clone() for p in params]

    a, b = clipped_member0(1.0), clipped_member0(10.0)
    assert any(not torch.equal(x, y) for x, y in zip(a, b)), "member 0's clipped gradient depends on member 1's"
    loop = peers.LoopOfModels(SEEDS, ("nobn",), torch.float64)
    assert len(loop.optimizers) == len(SEEDS) * 1  # the loop: one optimizer per member, anything per member


def test_bnbench_stacked_peer_takes_either_step(mnist_cpu, accelerator):
    splits = mnist_cpu["float64"]
    for impl in ("fused", "autograd"):
        p = peers.make_peer(f"stacked-{impl}", SEEDS, VARIANTS, splits, accelerator, "float64")
        assert {p.trainer.step_impl(v, s) for v in VARIANTS for s in SEEDS} == {impl}


def test_members_for_k():
    assert peers.members_for(1) == ((0,), ("bn",))
    assert peers.members_for(8) == ((0, 1, 2, 3), ("bn", "nobn"))
    with pytest.raises(ValueError):
        peers.members_for(3)


def test_memory_probe_sees_torch_tensors_and_their_peak():
    """peak_rss_delta counts what torch allocates (tracemalloc would not), and a transient peak."""
    import tracemalloc

    n = 16 * 2**20  # 64 MiB of float32
    tracemalloc.start()
    try:
        held = torch.ones(n)
        assert tracemalloc.get_traced_memory()[1] < 2**20, "tracemalloc does not see torch's allocations"
    finally:
        tracemalloc.stop()
    del held
    kept, grown, method = peers.peak_rss_delta(lambda: torch.ones(n))
    assert grown >= 0.9 * 4 * n, (grown, method)
    del kept
    total, peak, method = peers.peak_rss_delta(lambda: float(torch.ones(n).sum()))
    if method == "peak-rss":
        assert peak >= 0.9 * 4 * n, peak  # freed before the call returned, still counted


def test_peer_bench_cases_collect():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "bench" / "test_peers.py"), "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for peer in peers.PEERS:
        for k in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            assert f"test_peer_step[{peer}-K{k}]" in proc.stdout


# -- the figure and table, from a synthetic pytest-benchmark JSON -----------------------------------
SYNTH_RATES = {"loop": 1_000.0, "func": 10_000.0, "func-stats": 8_000.0, "stacked-autograd": 15_000.0,
               "stacked-fused": 20_000.0}


def _synthetic(path, ks=(1, 2, 4), drop=("func", 4)):
    benchmarks = [{"name": "test_matmul_rate", "params": None, "extra_info": {"gflop_per_s": 64.0},
                   "stats": {"median": 0.27}}]
    for peer, rate in SYNTH_RATES.items():
        for k in ks:
            if (peer, k) == drop:
                continue
            median = k * 100 / (rate * k)  # member-samples/s = rate x K
            benchmarks.append({"name": f"test_peer_step[{peer}-K{k}]", "params": {"peer": peer, "k": k},
                               "extra_info": {"peer": peer, "k": k, "batch": 100, "member_samples_per_s": rate * k,
                                              "peak_bytes_per_member": 512 * 1024.0, "gflop_per_s": 64.0,
                                              "arithmetic_limit_member_samples_per_s": 400_000.0},
                               "stats": {"median": median}})
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_figure_and_table_from_a_saved_json(tmp_path):
    src = _synthetic(tmp_path / "0009_x.json")
    data = figures.rows(src)
    assert len(data) == 5 * 3 - 1 and all(r["peer"] in SYNTH_RATES for r in data)
    assert [r["peer"] for r in data][:3] == ["loop"] * 3 and [r["k"] for r in data][:3] == [1, 2, 4]
    table = figures.markdown_table(data, source="reports/bench/x.json")
    lines = table.splitlines()
    # the limit from the session's matmul rate over the FLOP a step does (a stored limit is not used: runs before
    # 2026-12-07 stored one over a FLOP count that was 1.46x too high)
    limit = 64e9 / figures.STEP_FLOP
    assert f"arithmetic limit {limit:,.0f} member-samples/s at 64 GFLOP/s" in lines[0] and figures.STEP_FLOP == 108_416
    head = lines[2]
    assert head.startswith("| K | loop | torch.func | torch.func + stats | bnbench autograd | bnbench fused |")
    k2 = next(line for line in lines if line.startswith("| 2 |"))
    assert f"| 2,000 | 20,000 | 16,000 | 30,000 | 40,000 | 2.0× | 2.5× | 20.0× | {100 * 40_000 / limit:.0f}% |" in k2
    # several runs: the median of each case, the range kept
    twice = figures.combine([data, [dict(r, member_samples_per_s=3 * r["member_samples_per_s"]) for r in data]])
    fused2 = next(r for r in twice if (r["peer"], r["k"]) == ("stacked-fused", 2))
    assert fused2["member_samples_per_s"] == 80_000 and (fused2["low"], fused2["high"], fused2["runs"]) == (40_000, 120_000, 2)
    k4 = next(line for line in lines if line.startswith("| 4 |"))
    assert "| 4,000 | — |" in k4  # the missing case
    assert "(KiB/member)" in table and "| 1 | 512 | 512 |" in table
    out = figures.draw(data, tmp_path / "peers.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_figure_command_picks_the_newest_json_with_peer_cases(tmp_path, capsys):
    _synthetic(tmp_path / "0001_a.json")
    (tmp_path / "0002_b.json").write_text(json.dumps({"benchmarks": [{"name": "test_matmul_rate", "stats": {"median": 1}}]}))
    assert figures.newest(tmp_path).name == "0001_a.json"
    assert figures.newest(tmp_path / "none") is None
    png = tmp_path / "fig.png"
    assert figures.main([str(tmp_path / "0001_a.json"), "--out", str(png)]) == 0
    assert png.is_file() and capsys.readouterr().out.startswith("From `")
    assert figures.main([str(tmp_path / "0002_b.json"), "--out", str(png)]) == 2
