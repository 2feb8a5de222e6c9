"""The optimizers, and the cheapest call that runs each one's step exactly.

In a small net's step, Python around the kernels is a real share: Accelerate's optimizer wrapper
and torch.optim.Adam.step each spend more on checks than the arithmetic needs (bench/test_step.py
times both; docs/performance.md has the figures). Where the wrapper or the loop around the kernel
would only forward the call, the call goes straight to what it would reach, with the same
arguments, so the update is bitwise the same (tests/test_engines.py steps both ways side by side).
step.py, the seam, decides where it is used.
"""
from __future__ import annotations

import importlib

import torch

_torch_optimizer = importlib.import_module("torch.optim.optimizer")  # its global step hooks (torch.optim hides the module)

from ..config import Config


def make_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD. fused=True (stacked engine) runs one kernel per parameter instead of
    ~10 elementwise ops: same update rule, 3x less time in a step dominated by per-op overhead."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, **kw)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, **kw)


def unwrapped(opt) -> torch.optim.Optimizer:
    """What Accelerate's AcceleratedOptimizer would call, when all it would do is call it.

    Its step looks for an optional package (lomo_optim) on every call, and its zero_grad inspects
    the wrapped method's signature: measurable in a small net's step. With no GradScaler, no XLA and no gradient accumulation (bnbench has none) both
    only forward the call. Anything else keeps the wrapper."""
    from accelerate.utils import DistributedType

    inner = getattr(opt, "optimizer", None)
    if inner is None or getattr(opt, "scaler", None) is not None:
        return opt
    if opt.accelerator_state.distributed_type == DistributedType.XLA or not opt.gradient_state.sync_gradients:
        return opt
    return inner


class FusedAdamStep:
    """torch.optim.Adam(fused=True)'s step on the CPU or a GPU, as one call of the kernel it ends in.

    Adam.step spends about as long in Python (grouping, state checks, hooks) as its kernel takes
    for a small net (bench/test_step.py::test_optimizer_step times both). For one param group of
    plain Adam whose parameters all have gradients and state, it increments the steps and calls
    torch._fused_adam_ with the group's values; this does exactly that, reading the group and the
    state afresh every call (~50 µs), so a changed lr, a loaded or cleared state or a new parameter
    is seen. Its state stays Adam's own (state_dict, checkpoints). Anything else (first step, a
    missing gradient, hooks, another group, amsgrad, maximize, capturable, tensor hyperparameters,
    mixed devices or dtypes) goes through Adam.step."""

    def __init__(self, opt: torch.optim.Adam):
        self.opt = opt

    @staticmethod
    def applies(opt) -> bool:
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or not hasattr(torch, "_fused_adam_"):
            return False
        g = opt.param_groups[0]
        plain = not any(isinstance(x, torch.Tensor) for x in (g["lr"], *g["betas"], g["eps"], g["weight_decay"]))
        return plain and g.get("fused") is True and not any(g.get(k) for k in ("amsgrad", "maximize", "capturable",
                                                                                 "differentiable", "decoupled_weight_decay"))

    def _hooked(self) -> bool:
        o, t = self.opt, _torch_optimizer
        return bool(o._optimizer_step_pre_hooks or o._optimizer_step_post_hooks
                    or t._global_optimizer_pre_hooks or t._global_optimizer_post_hooks)

    def _lists(self):
        """(params, grads, exp_avgs, exp_avg_sqs, steps) as Adam.step would gather them, or None
        where Adam.step would do something else."""
        params = self.opt.param_groups[0]["params"]
        state = self.opt.state
        grads, avgs, sqs, steps = [], [], [], []
        kind = None
        for p in params:
            st = state.get(p)
            if p.grad is None or not st or "exp_avg" not in st or (p.device, p.dtype) != (kind or (p.device, p.dtype)):
                return None
            kind = (p.device, p.dtype)
            grads.append(p.grad)
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        return params, grads, avgs, sqs, steps

    def __call__(self) -> None:
        lists = None if self._hooked() or not self.applies(self.opt) else self._lists()
        if lists is None:
            self.opt.step()
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = lists
        g = self.opt.param_groups[0]
        beta1, beta2 = g["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
