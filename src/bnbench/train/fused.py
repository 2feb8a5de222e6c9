"""A StackedMLP's training losses with a hand-written backward: one autograd node per step.

Through StackedMLP.forward, a default step builds ~40 autograd nodes (GEMMs, views of the stacked
parameters, BN, the copies in and out of the BN half, cross-entropy); their bookkeeping, not their
arithmetic, is a real share of a small net's step (bench/test_step.py::test_default_step_backward
times both; docs/performance.md has the figures). Here the model's own trunk (StackedMLP.trunk,
the layers written once) runs outside autograd and keeps what the backward needs; the backward
calls the ATen ops that autograd's own formulas call (bmm, sum, div, threshold_backward,
_batch_norm_impl_index_backward, nll_loss2d_backward, _log_softmax_backward_data) on the same
operands, so the gradients are bitwise autograd's (tests/test_engines.py proves it, and
step.py checks it once per process before using it).

Training only, without sync BN, taps, an input that wants a gradient or autocast: step.py, the
one seam, chooses (applies()). Its gradients are first-order only (no create_graph), and like
autograd it refuses a backward after a parameter changed in place since the forward.
"""
from __future__ import annotations

import weakref

import torch

from .models import StackedMLP

aten = torch.ops.aten

# What autograd's formulas call for each activation's backward: a function of (grad, output).
ACTIVATION_BACKWARD = {
    "relu": lambda g, out: aten.threshold_backward(g, out, 0),
    "sigmoid": aten.sigmoid_backward,
    "tanh": aten.tanh_backward,
}


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
        self.s, self.v, self.m = net.n_seeds, len(net.variant_bn), net.n_members
        self.params = stacked_params(net)
        self.has_bias = [net.bias_index[i] is not None for i in range(len(net.shapes))]
        self.widths = [fout for fout, _ in net.shapes]
        # per layer: its operands if they are all views (kept), else None (made each step)
        self.cached = []
        for i in range(len(net.shapes)):
            ops = self.operands(i)
            views = all(t is None or any(_same_storage(t, p) for p in self.params) for t in ops[:2] + ops[2][:2])
            self.cached.append(ops if views else None)

    @torch.no_grad()
    def operands(self, i: int) -> tuple:
        """Layer i's (GEMM weight, GEMM bias or None, BN (scale, shift, running mean, running var,
        batches tracked) or (None,) * 5), as StackedMLP.trunk and _bn use them."""
        net = self.net
        w, b = net.gemm_operands(i)
        bn = (None,) * 5
        if net.bn and i < len(net.shapes) - 1:
            bn = (*net.bn_affine(i), getattr(net, f"running_mean{i}"), getattr(net, f"running_var{i}"),
                  getattr(net, f"num_batches_tracked{i}"))
        # Detached: plain aliases of the storage, outside autograd's view tracking, which forbids
        # touching a no-grad view once its base has been updated in place (as every step does).
        detach = lambda t: None if t is None else t.detach()
        return detach(w), detach(b), tuple(map(detach, bn))


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
        momentum, eps = net.bn_momentum, net.bn_eps  # read each step: a module may change them
        ctx.act_backward, ctx.eps = ACTIVATION_BACKWARD[net.activation], eps
        ctx.versions = [p._version for p in params]  # autograd's check: no in-place change before backward
        layers = [ops or plan.operands(i) for i, ops in enumerate(plan.cached)]
        records = {}  # hidden layer -> what BN's backward needs

        def norm(i, a):
            weight, bias, mean, var, tracked = layers[i][2]
            if weight is None:
                return a
            tracked.add_(1)

            def normalize(flat):
                # F.batch_norm's own entry: it picks the kernel (native here, cuDNN where enabled on a GPU)
                # and its backward below is the one autograd would record for that kernel.
                out, save_mean, save_invstd, reserve, impl = aten._batch_norm_impl_index(
                    flat, weight, bias, mean, var, True, momentum, eps, torch.backends.cudnn.enabled)
                records[i] = (flat, save_mean, save_invstd, reserve, impl)
                return out

            return net.bn_members(a, normalize)

        keep = []  # per layer: (GEMM input, activation output or None)
        a = StackedMLP.trunk(net, x, [ops[:2] for ops in layers], norm, keep)
        saved = [(h, records.get(i), r) for i, (h, r) in enumerate(keep)]
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
            w, _, bn = ctx.layers[i]
            if r is not None:  # through the activation, then BN
                g = ctx.act_backward(g, r)
                if record is not None:
                    flat, save_mean, save_invstd, reserve, impl = record
                    weight, _, mean, var, _ = bn

                    def normalize_backward(g_out):
                        g_in, g_w, g_b = aten._batch_norm_impl_index_backward(
                            impl, flat, g_out, weight, mean, var, save_mean, save_invstd, True, ctx.eps,
                            [True, True, True], reserve)
                        bn_w.append(g_w)
                        bn_b.append(g_b)
                        return g_in

                    g = plan.net.bn_members(g, normalize_backward)  # the BN members' part, put back
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


def applies(net, x: torch.Tensor) -> bool:
    """Whether fused_losses gives what autograd would for this call: a StackedMLP of bn and nobn
    members (the normalization it writes by hand) in training without sync BN, one batch per seed, an input that wants no gradient of its own, no autocast."""
    return (isinstance(net, StackedMLP) and net.plain and net.training and not (net.sync_bn and net.bn) and x.dim() == 3
            and not x.requires_grad and not torch.is_autocast_enabled(x.device.type))
