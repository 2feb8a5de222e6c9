"""The stacked engine is K independent torch.nn models: proved against the reference engine."""
from __future__ import annotations


import pytest
import torch

from bnbench.config import make_config
from bnbench.train.engine import Trainer, epoch_permutation
from bnbench.train.models import StackedMLP, init_linears, reference_mlp

from conftest import subset

SEEDS = (0, 1, 2)


def _train(cfg, splits, accelerator, epochs=1):
    t = Trainer(cfg, splits, accelerator)
    for e in range(1, epochs + 1):
        t.train_epoch(e)
    return t


def _max_diff(a: dict, b: dict, keys=None) -> float:
    keys = keys or a.keys()
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys if a[k].is_floating_point())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_equals_reference_float64(mnist_cpu, accelerator, optimizer):
    # 6,000 samples / batch 100 = 60 steps per epoch; two epochs = 120 steps.
    splits = subset(mnist_cpu["float64"], 6000, 2000)
    kw = dict(seeds=SEEDS, epochs=2, dtype="float64", optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05, momentum=0.9 if optimizer == "sgd" else 0.0)
    stacked = _train(make_config(engine="stacked", **kw), splits, accelerator, epochs=2)
    ref = _train(make_config(engine="reference", **kw), splits, accelerator, epochs=2)
    assert stacked.steps_done == ref.steps_done == 120
    # How far the engines drift apart in float32 is measured by bench/float32_drift.py, not here.
    worst = 0.0
    for v in ("bn", "nobn"):
        for s in SEEDS:
            a, b = stacked.member_state(v, s), ref.member_state(v, s)
            params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
            d = _max_diff(a, b, params)
            worst = max(worst, d)
            assert d <= 1e-9, f"{v}/seed{s}: max parameter difference {d:.3e} in float64"
            if v == "bn":
                stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
                assert _max_diff(a, b, stats) <= 1e-9, f"{v}/seed{s}: running stats differ"
                assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("num_batches_tracked"))
    for x, y in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y)):
        ls, cs, ns = stacked.evaluate(x, y)
        lr_, cr, nr = ref.evaluate(x, y)
        assert (ls - lr_).abs().max().item() <= 1e-9
        assert torch.equal(cs, cr) and ns == nr == len(y), "accuracy must agree exactly"
    print(f"{optimizer}, 120 steps: max parameter difference float64 {worst:.3e}")


def test_bn_and_nobn_share_init_and_batches(accelerator, mnist_cpu):
    cfg = make_config(seeds=(3, 4), epochs=1)
    t = Trainer(cfg, subset(mnist_cpu["float32"], 1000, 100), accelerator)
    for s in (3, 4):
        bn, nobn = t.member_state("bn", s), t.member_state("nobn", s)
        # Sequential indices: bn = Linear(0) BN(1) ReLU(2) Linear(3) ...; nobn = Linear(0) ReLU(1) Linear(2) ...
        pairs = [("0", "0"), ("3", "2"), ("6", "4")]
        for kb, kn in pairs:
            assert torch.equal(bn[f"{kb}.weight"], nobn[f"{kn}.weight"])
            assert torch.equal(bn[f"{kb}.bias"], nobn[f"{kn}.bias"])
        # ... and exactly what nn.Linear draws under torch.manual_seed(seed)
        torch.manual_seed(s)
        lin = torch.nn.Linear(784, 32)
        assert torch.equal(bn["0.weight"], lin.weight.detach())
    assert not torch.equal(t.member_state("bn", 3)["0.weight"], t.member_state("bn", 4)["0.weight"])
    # One permutation per seed and epoch, whatever the variant; seeds and epochs differ.
    order = t.epoch_order(1)
    assert torch.equal(order[0], epoch_permutation(3, 1, 1000))
    assert not torch.equal(order[0], order[1])
    assert not torch.equal(epoch_permutation(3, 1, 1000), epoch_permutation(3, 2, 1000))
    assert torch.equal(torch.sort(order[0]).values, torch.arange(1000))


def test_training_batches_are_shared_by_variants(accelerator, mnist_cpu):
    # Record the samples each member's model actually sees in a step.
    cfg = make_config(seeds=(0, 1), epochs=1, engine="reference", batch_size=50)
    splits = subset(mnist_cpu["float32"], 200, 50)
    t = Trainer(cfg, splits, accelerator)
    seen: dict = {}
    for u in t.stacks:
        key = t.members[u.members.start]
        u.model.register_forward_pre_hook(lambda m, args, key=key: seen.setdefault(key, []).append(args[0].clone()) if m.training else None)
    t.train_epoch(1)
    for s in (0, 1):
        assert len(seen[("bn", s)]) == 4
        for a, b in zip(seen[("bn", s)], seen[("nobn", s)]):
            assert torch.equal(a, b)
    assert not torch.equal(seen[("bn", 0)][0], seen[("bn", 1)][0])


def test_stacked_bn_is_per_member_batchnorm(mnist_cpu):
    # One F.batch_norm over K*C channels == K separate BatchNorm1d layers, train and eval.
    inits = [init_linears(s, (784, 8, 6, 10)) for s in range(3)]
    inits = [[(w.double(), b.double()) for w, b in m] for m in inits]
    st = StackedMLP(inits, "bn")
    refs = [reference_mlp(m, "bn") for m in inits]
    x = mnist_cpu["float64"].train_x[:96].view(3, 32, 784)
    out = st(x)
    for k in range(3):
        assert torch.allclose(out[k], refs[k](x[k]), atol=1e-12, rtol=0)
        assert _max_diff(st.member_state_dict(k), refs[k].state_dict()) <= 1e-12
    st.eval()
    for r in refs:
        r.eval()
    xe = mnist_cpu["float64"].test_x[:40]
    oe = st(xe)
    for k in range(3):
        assert torch.allclose(oe[k], refs[k](xe), atol=1e-12, rtol=0)


def test_same_config_same_numbers(accelerator, mnist_cpu):
    splits = subset(mnist_cpu["float32"], 2000, 500)
    cfg = make_config(seeds=(0, 1), epochs=1)
    a, b = _train(cfg, splits, accelerator), _train(cfg, splits, accelerator)
    for v in ("bn", "nobn"):
        for s in (0, 1):
            sa, sb = a.member_state(v, s), b.member_state(v, s)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compile_changes_nothing_but_rounding(mnist_cpu, accelerator):
    """--compile: the warm-up compiles on a throw-away batch and restores every parameter and
    buffer; the compiled steps then follow eager torch to float64 rounding."""
    splits = subset(mnist_cpu["float64"], 1000, 500)
    kw = dict(seeds=(0, 1), dtype="float64", variants=("bn",), optimizer="sgd", lr=0.05, momentum=0.9)
    eager = Trainer(make_config(**kw), splits, accelerator)
    compiled = Trainer(make_config(compile=True, **kw), splits, accelerator)
    before = compiled.member_state("bn", 1)
    assert compiled.warm_up() > 0 and eager.warm_up() == 0.0
    after = compiled.member_state("bn", 1)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    eager.train_epoch(1)
    compiled.train_epoch(1)
    for s in (0, 1):
        a, b = eager.member_state("bn", s), compiled.member_state("bn", s)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-12


FUSED_CASES = {
    "lab": dict(),  # both variants of each seed in one module (one GEMM per seed)
    "bn-only": dict(variants=("bn",)),
    "nobn-only-tanh": dict(variants=("nobn",), activation="tanh"),
    "drop-bias-sigmoid": dict(bn_drop_bias=True, activation="sigmoid"),  # one module per variant
    "float64-sgd": dict(dtype="float64", optimizer="sgd", lr=0.05, momentum=0.9),
    "wide-3-layers": dict(hidden=(24, 16, 8), seeds=(0,)),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_hand_written_step_is_autograd_and_adam_bitwise(mnist_cpu, accelerator, case):
    """What a default step runs (fused.StackedLosses' backward, optim.FusedAdamStep) against
    --step-impl autograd (autograd through StackedMLP.forward, the optimizer's own step): equal bit
    for bit, gradients after one step, then every parameter, buffer and loss after 40."""
    from bnbench.train.optim import FusedAdamStep

    kw = {**dict(seeds=(0, 1)), **FUSED_CASES[case]}
    splits = subset(mnist_cpu[kw.get("dtype", "float32")], 4000, 100)  # 40 steps an epoch
    fast = Trainer(make_config(**kw), splits, accelerator)
    plain = Trainer(make_config(step_impl="autograd", **kw), splits, accelerator)
    order = fast.epoch_order(1)
    sums = [torch.zeros(len(fast.members), dtype=torch.float64) for _ in range(2)]
    for t in range(40):
        for tr, ls in zip((fast, plain), sums):
            tr.step(*tr.batch_at(order, t), ls)
        if t == 0:
            for a, b in zip(fast.stacks, plain.stacks):
                for (name, p), q in zip(a.net.named_parameters(), b.net.parameters()):
                    assert torch.equal(p.grad, q.grad), f"{case}: gradient of {name} after one step"
    assert torch.equal(*sums), case
    for member in fast.members:
        a, b = fast.member_state(*member), plain.member_state(*member)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{case}: {member} after 40 steps"
    xb, yb = fast.batch_at(fast.epoch_order(2), 0)
    for tr, impl, node in ((fast, "fused", "StackedLossesBackward"), (plain, "autograd", None)):
        for u in tr.stacks:  # each took the path it says it took
            assert u.step_impl == impl and all(tr.step_impl(*m) == impl for m in tr.members[u.members])
            name = type(u.losses(u.model, xb[u.rows], yb[u.rows]).grad_fn).__name__
            assert (name == node) if node else name != "StackedLossesBackward"
    assert all(isinstance(g.update, FusedAdamStep) == (fast.cfg.optimizer == "adam") for g in fast.optimizer_groups)
    assert not any(isinstance(g.update, FusedAdamStep) for g in plain.optimizer_groups)


def test_fused_adam_step_gives_way_to_hooks_and_missing_gradients(accelerator, mnist_cpu):
    from bnbench.train.optim import FusedAdamStep

    t = Trainer(make_config(seeds=(0,)), subset(mnist_cpu["float32"], 500, 100), accelerator)
    (group,) = t.optimizer_groups
    update = group.update
    assert isinstance(update, FusedAdamStep)
    calls = []
    handle = update.opt.register_step_pre_hook(lambda *a: calls.append(1))
    order = t.epoch_order(1)
    t.step(*t.batch_at(order, 0), torch.zeros(2, dtype=torch.float64))
    t.step(*t.batch_at(order, 1), torch.zeros(2, dtype=torch.float64))
    handle.remove()
    assert calls == [1, 1], "Adam's step hooks must run: the step goes through Adam.step while any is registered"
    steps = [update.opt.state[p]["step"].item() for p in update.opt.param_groups[0]["params"]]
    assert steps == [2.0] * len(steps)


def test_fused_losses_follow_the_module_as_it_changes(mnist_cpu):
    """fused.py keeps views of a StackedMLP's parameters between steps: they must see in-place
    updates (an optimizer's) and be remade when storage moves (.to()); padded operands (width 24)
    are copies, made again every step. Each time, bitwise the losses of forward + cross-entropy."""
    import copy

    from bnbench.train.fused import fused_losses
    from bnbench.train.models import member_losses

    inits = [init_linears(s, (784, 24, 10)) for s in range(2)]
    net = StackedMLP(inits, ("bn", "nobn"))
    data = mnist_cpu["float32"]
    x, y = data.train_x[:200].view(2, 100, 784), data.train_y[:200].view(2, 100)

    def same():
        other = copy.deepcopy(net)  # the same state, through forward + cross-entropy (one BN update each)
        fused, plain = fused_losses(net, x, y), member_losses(other(x), y)
        assert type(fused.grad_fn).__name__ == "StackedLossesBackward"
        return torch.equal(fused, plain) and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                                                    other.state_dict().values()))

    assert same()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)  # in place, as Adam steps
    assert same()
    net.to(torch.float64)  # new storage: the plan is remade
    x = x.double()
    assert same()


def test_fused_adam_step_follows_a_loaded_optimizer_state(accelerator, mnist_cpu):
    """Optimizer.load_state_dict replaces Adam's state tensors: the direct call must step the new
    ones (those state_dict() returns), exactly as Adam.step would."""
    import copy

    splits = subset(mnist_cpu["float32"], 1000, 100)
    fast = Trainer(make_config(seeds=(0,)), splits, accelerator)
    plain = Trainer(make_config(seeds=(0,), step_impl="autograd"), splits, accelerator)
    order = fast.epoch_order(1)
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
    for t in range(8):
        for tr, ls in zip((fast, plain), sums):
            if t == 4:
                opt = tr.optimizer_groups[0].optimizer
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new tensors, as from a file
            tr.step(*tr.batch_at(order, t), ls)
    states = [tr.optimizer_groups[0].optimizer.state_dict()["state"] for tr in (fast, plain)]
    assert [s["step"].item() for s in states[0].values()] == [8.0] * len(states[0])
    for a, b in zip(states[0].values(), states[1].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(*sums)


def test_fused_losses_as_autograd_would_behave(mnist_cpu):
    """Beyond a plain step: a retained graph gives the same gradients twice; a parameter changed in
    place between forward and backward is refused, as autograd refuses it; an input that wants its
    own gradient goes through forward + cross-entropy, which gives it one."""
    from bnbench.train.step import Losses

    inits = [init_linears(s, (784, 8, 10)) for s in range(2)]
    net = StackedMLP(inits, ("bn", "nobn"))
    losses_of = Losses(net, hand_written=True)
    data = mnist_cpu["float32"]
    x, y = data.train_x[:100].view(2, 50, 784), data.train_y[:100].view(2, 50)
    params = list(net.parameters())
    losses = losses_of(x, y)
    first = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    second = torch.autograd.grad(losses.sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    losses = losses_of(x, y)
    with torch.no_grad():
        params[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses.sum().backward()
    xg = x.clone().requires_grad_(True)
    losses = losses_of(xg, y)
    assert type(losses.grad_fn).__name__ != "StackedLossesBackward"
    losses.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("fault", ["loss changed in member_losses alone", "activation backward off"])
def test_a_hand_written_step_that_differs_falls_back_to_autograd(accelerator, mnist_cpu, monkeypatch, capfd, fault):
    """The seam's self-check: a loss changed where only autograd's path reads it (label smoothing
    added to member_losses, say), or a hand-written formula that is off, is found before training;
    one line says so and the process trains on autograd, whose numbers are then the run's."""
    import torch.nn.functional as F

    from bnbench.train import fused
    from bnbench.train import step as seam

    monkeypatch.setattr(seam, "_verdicts", {})  # this process's earlier verdicts do not count here
    if fault.startswith("loss"):
        def smoothed(logits, labels):
            labels = labels.repeat(logits.shape[0] // labels.shape[0], 1)
            return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", label_smoothing=0.1).mean(1)

        monkeypatch.setattr(seam, "member_losses", smoothed)
    else:
        monkeypatch.setitem(fused.ACTIVATION_BACKWARD, "relu", lambda g, out: 1.5 * torch.ops.aten.threshold_backward(g, out, 0))
    splits = subset(mnist_cpu["float32"], 500, 100)
    t = Trainer(make_config(seeds=(0, 1)), splits, accelerator)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the hand-written step differs from autograd here" in err[0], err
    assert "training on autograd" in err[0]
    assert [u.step_impl for u in t.stacks] == ["autograd"] and t.step_impl("bn", 0) == "autograd"
    from bnbench.train.optim import FusedAdamStep

    assert not isinstance(t.optimizer_groups[0].update, FusedAdamStep)  # the direct Adam call was not verified either
    plain = Trainer(make_config(seeds=(0, 1), step_impl="autograd"), splits, accelerator)
    order = t.epoch_order(1)
    for step in range(3):
        for tr in (t, plain):
            tr.step(*tr.batch_at(order, step), torch.zeros(4, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(t.stacks[0].net.state_dict().values(), plain.stacks[0].net.state_dict().values()))
    Trainer(make_config(seeds=(0, 1)), splits, accelerator)  # once per process and kind of stack: no second line
    assert capfd.readouterr().err.strip() == ""


def test_the_self_check_passes_where_the_hand_written_step_is_right(accelerator, mnist_cpu):
    from bnbench.train import step as seam

    for kw in FUSED_CASES.values():
        t = Trainer(make_config(**{**dict(seeds=(0, 1)), **kw}), subset(mnist_cpu[kw.get("dtype", "float32")], 200, 100),
                    accelerator)
        for u in t.stacks:
            assert seam.compare(t.cfg, u.net) is None and u.step_impl == "fused", kw


def test_the_self_check_runs_for_a_net_in_a_process_group(tmp_path, monkeypatch):
    """A net that holds a process group (any data-parallel launch) is checked on copies that share the
    group (a ProcessGroup cannot be copied): the hand-written step is taken, not refused by the copy."""
    import torch.distributed as dist

    from bnbench.train import step as seam

    monkeypatch.setattr(seam, "_verdicts", {})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = StackedMLP([init_linears(0, (784, 32, 32, 10))], ("bn", "nobn"), process_group=dist.group.WORLD)
        assert seam.self_check(make_config(seeds=(0,)), net) is None
        assert seam.hand_written(make_config(seeds=(0,)), net, sync_bn=False)
    finally:
        dist.destroy_process_group()
