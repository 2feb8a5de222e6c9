"""A StackedMLP's training losses with a hand-written backward: one autograd node per step.

Through StackedMLP.forward, a default step builds ~40 autograd nodes (GEMMs, views of the stacked
parameters, BN, the copies in and out of the BN half, cross-entropy); their bookkeeping, not their
arithmetic, cost ~0.6 ms of a default step (2 cores, 2026-11-28: 6.45 ms through autograd, 5.89 ms
by hand; bench/test_step.py::test_default_step_backward). Here the forward runs outside autograd and keeps what the backward
needs; the backward calls the ATen ops that autograd's own formulas call (bmm, sum, div,
threshold_backward, _batch_norm_impl_index_backward, nll_loss2d_backward, _log_softmax_backward_data)
on the same operands, so the gradients are bitwise autograd's (tests/test_engines.py proves it).

Training only, without sync BN (its cross-process autograd function stays in StackedMLP.forward),
taps, an input that wants a gradient or autocast: StackedMLP.forward(x, labels=...) chooses; the
engine passes labels unless --compile. Its gradients are first-order only (no create_graph), and
like autograd it refuses a backward after a parameter changed in place since the forward.
"""
from __future__ import annotations

import weakref

import torch

aten = torch.ops.aten

# What autograd's formulas call for each activation's backward: a function of (grad, output).
ACTIVATION_BACKWARD = {
    "relu": lambda g, out: aten.threshold_backward(g, out, 0),
    "sigmoid": aten.sigmoid_backward,
    "tanh": aten.tanh_backward,
}


def with_slot(grouped: torch.Tensor, slot: int, part: torch.Tensor) -> torch.Tensor:
    """grouped [S, V, C, B] with variant `slot` replaced by part ([S, C, B] in any contiguous shape):
    one torch.cat, as the BN half goes back among the members (forward) and its gradient (backward).
    Returns [S*V, C, B]."""
    s, v, c, b = grouped.shape
    parts = [grouped[:, :slot], part.view(s, 1, c, b), grouped[:, slot + 1 :]]
    return torch.cat([p for p in parts if p.shape[1]], 1).view(s * v, c, b)


def _padded_grad(param: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient of a stacked parameter [members, padded n] from that of its unpadded view
    (zero in the padding, as autograd's slice backward gives)."""
    g = g.reshape(param.shape[0], -1)
    if g.shape[1] == param.shape[1]:
        return g
    out = g.new_zeros(param.shape)
    out[:, : g.shape[1]] = g
    return out


class _Plan:
    """What a step reads of a StackedMLP, looked up once: nn.Module attribute and ParameterList
    lookups, padding slices and views cost ~1 ms a step in Python when made every step. Views made
    without autograd share the parameters' storage, so Adam's in-place updates show through; an
    operand that is a copy (a reshape across padding) is made again every step. The plan is rebuilt
    when a parameter's or buffer's storage moves (.to(), a new tensor assigned)."""

    def __init__(self, net):
        self.net, self.key = weakref.proxy(net), _key(net)  # the net owns its plan, not the other way
        self.s, self.v, self.m = net.seeds, len(net.variants), net.k
        self.slot = net.bn_slot[0] if net.bn else None
        self.mixed = net.bn and self.v > len(net.bn_slot)
        self.params = stacked_params(net)
        self.has_bias = [net.bias_index[i] is not None for i in range(len(net.shapes))]
        self.widths = [fout for fout, _ in net.shapes]
        # per layer: its operands if they are all views (kept), else None (made each step)
        self.cached = []
        for i in range(len(net.shapes)):
            ops = self.operands(i)
            views = all(t is None or any(_same_storage(t, p) for p in self.params) for t in ops[:3] + ops[3][:2])
            self.cached.append(ops if views else None)

    @torch.no_grad()
    def operands(self, i: int) -> tuple:
        """Layer i's (weight [members, out, in], GEMM weight, GEMM bias or None, BN (scale, shift,
        running mean, running var, batches tracked) or (None,) * 5), as StackedMLP.forward uses them."""
        net = self.net
        fout, fin = net.shapes[i]
        w, b = net.weight(i), net.bias(i)
        gemm_w, gemm_b = w, b
        if i == 0:  # one GEMM per seed for its V members, as StackedMLP.forward
            gemm_w = w.reshape(self.s, self.v * fout, fin)
            gemm_b = None if b is None else b.reshape(self.s, self.v * fout, 1)
        bn = (None,) * 5
        if net.bn and i < len(net.shapes) - 1:
            bn = (*net.bn_affine(i), getattr(net, f"running_mean{i}"), getattr(net, f"running_var{i}"),
                  getattr(net, f"num_batches_tracked{i}"))
        # Detached: plain aliases of the storage, outside autograd's view tracking, which forbids
        # touching a no-grad view once its base has been updated in place (as every step does).
        detach = lambda t: None if t is None else t.detach()
        return detach(w), detach(gemm_w), detach(gemm_b), tuple(map(detach, bn))


def _same_storage(t: torch.Tensor, p: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()


def _key(net) -> tuple:
    return tuple(t.data_ptr() for t in (*net.parameters(), *net.buffers()))


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> its plan; not in the module,
# so that copying, pickling or saving a module never meets it


def plan_of(net) -> _Plan:
    plan = _plans.get(net)
    if plan is None or plan.key != _key(net):
        plan = _plans[net] = _Plan(net)
    return plan


class StackedLosses(torch.autograd.Function):
    """(plan, x [S, B, in], labels [S, B], *the net's parameters) -> per-member mean cross-entropy
    [members], variant-major (the engine's order), exactly as F.cross_entropy(net(x)...).mean(1)."""

    @staticmethod
    def forward(ctx, plan, x, labels, *params):
        s, v, m = plan.s, plan.v, plan.m
        net = plan.net
        act, momentum, eps = net.act, net.bn_momentum, net.bn_eps  # read each step: a module may change them
        ctx.act_backward, ctx.eps = ACTIVATION_BACKWARD[net.activation], eps
        ctx.versions = [p._version for p in params]  # autograd's check: no in-place change before backward
        last = len(plan.cached) - 1
        saved = []  # per layer: (GEMM input, BN record or None, activation output or None)
        h = x.transpose(-1, -2)  # [S, in, B]
        layers = [ops or plan.operands(i) for i, ops in enumerate(plan.cached)]
        for i, (_, w, b, bn) in enumerate(layers):
            c = plan.widths[i]
            a = torch.baddbmm(b, w, h) if b is not None else torch.bmm(w, h)
            if i == 0:
                a = a.view(m, c, -1)
            if i == last:
                saved.append((h, None, None))
                break
            record = None
            if bn[0] is not None:
                weight, bias, mean, var, tracked = bn
                n_b = a.shape[-1]
                part = a.view(s, v, c, n_b)[:, plan.slot] if plan.mixed else a
                flat = part.reshape(1, -1, n_b)
                tracked.add_(1)
                # F.batch_norm's own entry: it picks the kernel (native here, cuDNN where enabled on a GPU)
                # and its backward below is the one autograd would record for that kernel.
                out, save_mean, save_invstd, reserve, impl = aten._batch_norm_impl_index(
                    flat, weight, bias, mean, var, True, momentum, eps, torch.backends.cudnn.enabled)
                record = (flat, save_mean, save_invstd, reserve, impl)
                if plan.mixed:
                    a = with_slot(a.view(s, v, c, n_b), plan.slot, out)
                else:
                    a = out.view(m, c, n_b)
            r = act(a)
            saved.append((h, record, r))
            h = r
        # Cross-entropy as F.cross_entropy computes it for [m, C, B]: log_softmax over C, then
        # nll_loss2d on the [m, C, 1, B] view; members seed-major here, reordered at the end.
        n_b = a.shape[-1]
        target = labels.unsqueeze(1).expand(s, v, n_b).reshape(m, 1, n_b)
        lsm = torch.log_softmax(a, 1)
        nll, total_weight = aten.nll_loss2d_forward(lsm.view(m, -1, 1, n_b), target, None, 0, -100)
        ctx.plan, ctx.layers, ctx.x, ctx.saved = plan, layers, x, saved
        ctx.lsm, ctx.target, ctx.total_weight = lsm, target, total_weight
        return nll.view(m, n_b).mean(1).view(s, v).t().reshape(m)  # variant-major

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        plan, saved, lsm = ctx.plan, ctx.saved, ctx.lsm
        if [p._version for p in plan.params] != ctx.versions:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                               "operation: a StackedMLP parameter changed between its forward and this backward")
        s, v, m = plan.s, plan.v, plan.m
        n_b = lsm.shape[-1]
        g = grad.view(v, s).t().reshape(m)  # seed-major
        g = g.unsqueeze(1).expand(m, n_b) / n_b  # mean(1)'s backward
        g = aten.nll_loss2d_backward(g.view(m, 1, n_b), lsm.view(m, -1, 1, n_b), ctx.target, None, 0, -100,
                                     ctx.total_weight)
        g = aten._log_softmax_backward_data(g.view(lsm.shape), lsm, 1, lsm.dtype)
        n = len(saved)
        w_grads, b_grads, bn_w, bn_b = [None] * n, [None] * n, [], []
        for i in range(n - 1, -1, -1):
            h, record, r = saved[i]
            w, _, _, bn = ctx.layers[i]
            c = plan.widths[i]
            if r is not None:  # through the activation, then BN
                g = ctx.act_backward(g, r)
                if record is not None:
                    flat, save_mean, save_invstd, reserve, impl = record
                    weight, _, mean, var, _ = bn
                    if plan.mixed:
                        grouped = g.view(s, v, c, n_b)
                        g_out = grouped[:, plan.slot].reshape(flat.shape)
                    else:
                        g_out = g.view(flat.shape)
                    g_in, g_w, g_b = aten._batch_norm_impl_index_backward(
                        impl, flat, g_out, weight, mean, var, save_mean, save_invstd, True, ctx.eps,
                        [True, True, True], reserve)
                    bn_w.append(g_w)
                    bn_b.append(g_b)
                    if plan.mixed:
                        g = with_slot(grouped, plan.slot, g_in)
                    else:
                        g = g_in.view(m, c, n_b)
            if i == 0:  # baddbmm's gradients: batch1 grad @ batch2^T (batch2 = x^T), bias summed over B
                g = g.view(s, -1, n_b)
                w_grads[i] = g.bmm(ctx.x)
            else:
                w_grads[i] = g.bmm(h.transpose(1, 2))
            if plan.has_bias[i]:
                b_grads[i] = g.sum(2, keepdim=True)
            if i > 0:
                g = w.transpose(1, 2).bmm(g)
        grads = w_grads + [b for b in b_grads if b is not None] + bn_w[::-1] + bn_b[::-1]
        return (None, None, None, *(_padded_grad(p, gr) for p, gr in zip(plan.params, grads)))


def stacked_params(net) -> list[torch.Tensor]:
    """The parameters StackedLosses takes, in the order its backward returns their gradients."""
    params = list(net.weights) + list(net.biases)
    if net.bn:
        params += list(net.bn_weight) + list(net.bn_bias)
    return params


def fused_losses(net, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[members] training losses of StackedMLP `net` (variant-major), one autograd node."""
    plan = plan_of(net)
    return StackedLosses.apply(plan, x, labels, *plan.params)
