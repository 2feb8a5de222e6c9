"""The normalizations (train/norms.py) stacked = torch's own modules, in float64; Batch
Renormalization against a hand computation of Ioffe (2017), Algorithm 1; pairing; bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnbench import cli
from bnbench.config import make_config
from bnbench.train.engine import Trainer
from bnbench.train.models import StackedMLP, init_linears, reference_mlp
from bnbench.train.norms import BatchRenorm1d, Renorm, batch_renorm

from conftest import subset

ALL = ("bn", "nobn", "ln", "gn", "rms", "brn")
# BRN's limits relax within the test's 120 steps (warm-up 20, r_max at 80, d_max at 60), so that
# the clipping, the ramp and the running statistics all take part.
BRN_FAST = dict(brn_warmup=20, brn_r_full=80, brn_d_full=60)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_every_normalization_stacked_equals_torchs_modules_float64(mnist_cpu, accelerator, optimizer):
    """All six variants of two seeds in the stacked engine (two StackedMLPs: bn,nobn and the others)
    against the reference engine (one nn.Sequential per member with nn.BatchNorm1d, nn.LayerNorm,
    nn.GroupNorm, nn.RMSNorm, BatchRenorm1d), 120 steps: every parameter and buffer within 1e-9,
    evaluation's losses within 1e-9 and its counts equal."""
    splits = subset(mnist_cpu["float64"], 6000, 2000)  # 60 steps an epoch, two epochs
    kw = dict(variants=ALL, seeds=(0, 1), epochs=2, dtype="float64", optimizer=optimizer, hidden=(32, 16),
              lr=1e-3 if optimizer == "adam" else 0.05, momentum=0.9 if optimizer == "sgd" else 0.0, **BRN_FAST)
    stacked, ref = (Trainer(make_config(engine=e, **kw), splits, accelerator) for e in ("stacked", "reference"))
    assert [u.variant for u in stacked.stacks] == ["bn,nobn", "ln,gn,rms,brn"]
    assert [u.step_impl for u in stacked.stacks] == ["fused", "autograd"]  # bn, nobn keep the hand-written step
    for t in (stacked, ref):
        t.train_epoch(1)
        t.train_epoch(2)
    kinds = {type(m).__name__ for u in ref.stacks for m in u.net}
    assert {"BatchNorm1d", "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm1d"} <= kinds
    for member in stacked.members:
        a, b = stacked.member_state(*member), ref.member_state(*member)
        assert _max_diff(a, b) <= 1e-9, member
        tracked = [k for k in a if k.endswith("num_batches_tracked")]
        assert all(int(a[k]) == int(b[k]) == 120 for k in tracked), member
    for x, y in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y)):
        (ls, cs, _), (lr_, cr, _) = stacked.evaluate(x, y), ref.evaluate(x, y)
        assert (ls - lr_).abs().max().item() <= 1e-9 and torch.equal(cs, cr)
    # The variants really differ: a normalization that did nothing would pass the checks above.
    finals = {v: stacked.member_state(v, 0)["0.weight"] for v in ALL}
    assert all(not torch.equal(finals[v], finals["nobn"]) for v in ALL if v != "nobn")


def test_every_variant_of_a_seed_starts_alike_and_sees_the_same_batches(mnist_cpu, accelerator):
    t = Trainer(make_config(variants=ALL, seeds=(3, 5)), subset(mnist_cpu["float32"], 500, 100), accelerator)
    assert t.batch_seeds == [3, 5] and all(u.rows == slice(0, 2) for u in t.stacks)
    for seed in (3, 5):
        first = {v: t.member_state(v, seed) for v in ALL}
        for v in ALL:
            assert torch.equal(first[v]["0.weight"], first["nobn"]["0.weight"])
            assert torch.equal(first[v]["0.bias"], first["nobn"]["0.bias"])


def test_batch_renorm_is_ioffes_algorithm_by_hand():
    """One BatchRenorm1d step on a batch whose statistics are far from the running ones, so that r
    and d are clipped, computed here element by element from the paper's Algorithm 1."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64) * torch.tensor([0.2, 1.0, 9.0], dtype=torch.float64) + torch.tensor(
        [0.0, 7.0, -0.5], dtype=torch.float64)
    m = BatchRenorm1d(3, Renorm(r_max=2.0, d_max=1.5, warmup=0, r_full=0, d_full=0), dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        m.running_mean.copy_(torch.tensor([0.5, 0.0, 0.0]))
        m.running_std.copy_(torch.tensor([1.0, 2.0, 1.0]))
    mu_old, sigma_old = m.running_mean.clone(), m.running_std.clone()
    y = m(x)
    eps, mom = 1e-5, 0.1
    for c in range(3):
        col = [x[i, c].item() for i in range(6)]
        mu_b = sum(col) / 6
        sigma_b = math.sqrt(sum((v - mu_b) ** 2 for v in col) / 6 + eps)
        r = min(max(sigma_b / sigma_old[c].item(), 1 / 2.0), 2.0)
        d = min(max((mu_b - mu_old[c].item()) / sigma_old[c].item(), -1.5), 1.5)
        for i in range(6):
            want = m.weight[c].item() * ((col[i] - mu_b) / sigma_b * r + d) + m.bias[c].item()
            assert abs(y[i, c].item() - want) <= 1e-12
        assert abs(m.running_mean[c].item() - (mu_old[c].item() + mom * (mu_b - mu_old[c].item()))) <= 1e-12
        assert abs(m.running_std[c].item() - (sigma_old[c].item() + mom * (sigma_b - sigma_old[c].item()))) <= 1e-12
    clipped_r = x.var(0, correction=0).add(eps).sqrt() / sigma_old
    assert (clipped_r > 2.0).any() and (clipped_r < 0.5).any()  # both bounds of r were reached
    m.eval()
    z = torch.randn(4, 3, dtype=torch.float64)
    want = (z - m.running_mean) / m.running_std * m.weight + m.bias
    assert torch.allclose(m(z), want, rtol=0, atol=1e-12)
    # r and d carry no gradient: the batch's own mean and std do.
    m.train()
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_batch_renorm_with_unbounded_limits_is_batch_norm_and_warm_up_is_plain_bn():
    x = torch.randn(8, 4, dtype=torch.float64)
    # Warm-up (r_max 1, d_max 0): exactly BN's training output with the same affine.
    brn = BatchRenorm1d(4, Renorm(warmup=10), dtype=torch.float64)
    bn = nn.BatchNorm1d(4, dtype=torch.float64)
    assert torch.allclose(brn(x), bn(x), rtol=0, atol=1e-12)
    sched = Renorm(r_max=3.0, d_max=5.0, warmup=5000, r_full=40_000, d_full=25_000)
    at = lambda s: tuple(float(v) for v in sched.limits(torch.tensor(s)))  # noqa: E731
    assert at(0) == at(5000) == (1.0, 0.0)
    assert at(15_000) == pytest.approx((1.0 + 2.0 * 10_000 / 35_000, 5.0 * 10_000 / 20_000))
    assert at(25_000)[1] == 5.0 and at(40_000) == at(10**6) == (3.0, 5.0)


def test_a_stacked_module_of_any_variants_holds_the_reference_modules_state():
    """member_state_dict and load_member_state_dict round-trip under nn.Sequential's keys."""
    inits = [init_linears(s, (784, 16, 16, 10)) for s in range(2)]
    net = StackedMLP(inits, ("ln", "gn", "rms", "brn"), gn_groups=2)
    for k, v in enumerate(("ln", "ln", "gn", "gn", "rms", "rms", "brn", "brn")):
        ref = reference_mlp(inits[k % 2], v, gn_groups=2)
        state = net.member_state_dict(k)
        assert set(state) == set(ref.state_dict()), v
        ref.load_state_dict(state)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.25)
        net.load_member_state_dict(k, ref.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(net.member_state_dict(k).values(), ref.state_dict().values()))


@pytest.mark.parametrize("args, expect", [
    (["--variants", "bn,layernorm"], "unknown variant 'layernorm'; valid: bn, nobn, ln, gn, rms, brn"),
    (["--variants", "gn", "--gn-groups", "5"], "gn_groups 5 does not divide hidden width 32"),
    (["--variants", "gn", "--hidden", "12,10", "--gn-groups", "4"], "gn_groups 4 does not divide hidden width 10"),
    (["--variants", "gn", "--gn-groups", "32"], "gn_groups 32 leaves a group of one channel in hidden width 32"),
    (["--variants", "brn", "--brn-r-max", "0.5"], "brn_r_max must be a finite number >= 1"),
    (["--variants", "brn", "--brn-d-max", "-1"], "brn_d_max must be a finite number >= 0"),
    (["--variants", "brn", "--brn-warmup", "50000"], "brn_r_full (40000) comes before the end of brn_warmup"),
    (["--variants", "ln,gn", "--sync-bn"], "--sync-bn synchronises batch statistics, and ln,gn have none"),
    (["--variants", "ln,nobn", "--instrument"], "--instrument measures bn and nobn members; ln cannot"),
])
def test_bad_normalization_settings_are_one_line_before_any_work(tmp_path, capsys, args, expect):
    out = tmp_path / "r"
    assert cli.main(["run", *args, "--seeds", "0", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_gn_groups_default_leaves_eight_channels_per_group():
    assert make_config(variants=("gn",)).gn_groups_for() == 4  # 32 units: 4 groups of 8
    assert make_config(variants=("gn",), hidden=(100, 100, 100)).gn_groups_for() == 10
    assert make_config(variants=("gn",), hidden=(48, 16)).gn_groups_for() == 2
    assert make_config(variants=("gn",), hidden=(6,)).gn_groups_for() == 1


def test_list_shows_the_new_variants(capsys):
    assert cli.main(["list"]) == 0
    assert "variants:    bn, nobn, ln, gn, rms, brn" in capsys.readouterr().out


def test_batch_renorm_function_takes_given_moments():
    """The cross-process path hands in the group's moments; with this process's own, it is the same."""
    x = torch.randn(5, 3, dtype=torch.float64)
    args = lambda: (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))  # noqa: E731
    w, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    own = batch_renorm(x, *args(), w, b, (3.0, 5.0), 0.1, 1e-5, True)
    given = batch_renorm(x, *args(), w, b, (3.0, 5.0), 0.1, 1e-5, True, torch.var_mean(x, dim=0, correction=0))
    assert torch.equal(own, given)
