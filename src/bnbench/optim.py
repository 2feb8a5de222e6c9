"""The optimizers, and the cheapest call that runs each one's step exactly.

A default step is ~7.5 ms on 2 cores, of which Python around the kernels is a real share: Accelerate's
optimizer wrapper and torch.optim.Adam.step each spend more on checks than the arithmetic needs
(measured below). Where the wrapper or the loop around the kernel would only forward the call, the
call goes straight to what it would reach, with the same arguments, so the update is bitwise the
same (tests/test_engines.py steps both ways side by side).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

_torch_optimizer = importlib.import_module("torch.optim.optimizer")  # its global step hooks (torch.optim hides the module)

from .config import Config


def make_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD. fused=True (stacked engine) runs one kernel per parameter instead of
    ~10 elementwise ops: same update rule, 3x less time in a step dominated by per-op overhead."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, **kw)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, **kw)


def unwrapped(opt) -> torch.optim.Optimizer:
    """What Accelerate's AcceleratedOptimizer would call, when all it would do is call it.

    Its step looks for an optional package (lomo_optim) on every call, 0.2-0.3 ms of a 7.3 ms default
    step, and its zero_grad inspects the wrapped method's signature, ~55 µs (accelerate 1.15,
    2026-11-28). With no GradScaler, no XLA and no gradient accumulation (bnbench has none) both
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

    Adam.step spends ~0.3 ms a step (of a 7.5 ms default step, 2 cores, 2026-11-28: 783 vs 470 µs
    for the 10 stacked parameters) in Python: grouping, state checks, hooks. For one param group of
    plain Adam whose parameters all have gradients, it increments the steps and calls
    torch._fused_adam_ with the group's values; this does exactly that. Its state stays Adam's own
    (state_dict, checkpoints). Anything else (first step, a missing gradient, hooks, amsgrad,
    maximize, capturable, another dtype or device mix) goes through Adam.step."""

    def __init__(self, opt: torch.optim.Adam):
        self.opt = opt
        self.lists = None  # (params, exp_avgs, exp_avg_sqs, steps), once Adam has made its state

    @staticmethod
    def applies(opt) -> bool:
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or not hasattr(torch, "_fused_adam_"):
            return False
        g = opt.param_groups[0]
        plain = not any(isinstance(x, torch.Tensor) for x in (g["lr"], *g["betas"], g["eps"], g["weight_decay"]))
        return plain and bool(g.get("fused")) and not any(g.get(k) for k in ("amsgrad", "maximize", "capturable",
                                                                             "differentiable", "decoupled_weight_decay"))

    def _ready(self) -> bool:
        opt = self.opt
        params = opt.param_groups[0]["params"]
        if any(p not in opt.state for p in params):
            return False
        if len({(p.device, p.dtype) for p in params}) != 1:
            return False
        st = [opt.state[p] for p in params]
        self.lists = (params, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [s["step"] for s in st])
        self.owner = (opt.state, params)  # load_state_dict replaces both: the lists are then made again
        return True

    def _hooked(self) -> bool:
        o, t = self.opt, _torch_optimizer
        return bool(o._optimizer_step_pre_hooks or o._optimizer_step_post_hooks
                    or t._global_optimizer_pre_hooks or t._global_optimizer_post_hooks)

    def __call__(self) -> None:
        state, params = self.owner if self.lists is not None else (None, None)
        if self.opt.state is not state or self.opt.param_groups[0]["params"] is not params:
            self.lists = None
        if self._hooked() or (self.lists is None and not self._ready()):
            self.opt.step()
            return
        params, exp_avgs, exp_avg_sqs, steps = self.lists
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            self.lists = None
            self.opt.step()
            return
        g = self.opt.param_groups[0]
        beta1, beta2 = g["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)


def step_of(opt) -> Callable[[], None]:
    """The optimizer's step as the engine calls it once per step."""
    inner = unwrapped(opt)
    if FusedAdamStep.applies(inner):
        return FusedAdamStep(inner)
    return inner.step


def zero_grad_of(opt) -> Callable[[], None]:
    """opt.zero_grad(set_to_none=True), through the wrapper only where it does more than forward."""
    inner = unwrapped(opt)
    return lambda: inner.zero_grad(set_to_none=True)
