"""The one seam between the plain step and the fast one: autograd or the hand-written backward,
Adam.step or the direct fused call. The engine asks here, and nowhere else, how a stack computes
its losses and how its optimizer steps.

    --step-impl fused     (default) the hand-written backward (fused.py) where it applies and has
                          passed its self-check in this process; Adam's fused kernel called directly
                          (optim.FusedAdamStep) where that applies
    --step-impl autograd  autograd through StackedMLP.forward and the optimizer's own step

Both give the same numbers, bit for bit on the CPU, so the choice is not part of a unit's identity;
each row says which one its member took (column step_impl).

The self-check: the first time a process would take the hand-written step for a kind of stack
(shapes, variants, activation, dtype, device), it trains two copies of that stack for two steps
on a small random batch, one through the hand-written losses and the direct Adam call, one
through autograd and Adam.step, and compares losses, gradients, parameters and buffers: exactly on
the CPU, within CUDA_RTOL of the largest value on a GPU (cuDNN and atomics may reorder sums). If
they differ, it says so in one line on stderr and the process trains on autograd.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from . import fused
from .models import StackedMLP, member_losses
from .optim import FusedAdamStep, make_optimizer, unwrapped

STEP_IMPLS = ("fused", "autograd")
CUDA_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative to the largest |value| of a tensor


class Losses(nn.Module):
    """What a step calls, and what DDP wraps: (x [S, B, in], labels [S, B]) -> each member's mean
    cross-entropy [members], variant-major. Wrapping the net (not a function around it) keeps DDP's
    forward in the call, as DDP needs, whichever way the losses are computed."""

    def __init__(self, net: nn.Module, hand_written: bool):
        super().__init__()
        self.net = net
        self.stacked = isinstance(net, StackedMLP)
        self.hand_written = hand_written and self.stacked  # take fused.StackedLosses wherever it applies

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hand_written and fused.applies(self.net, x):
            return fused.fused_losses(self.net, x, labels)
        return self.through(self.net, x, labels)

    def through(self, model: Callable, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same losses through autograd, with `model` any callable x -> logits of this net (the
        instruments pass a torch.func.functional_call with other weights)."""
        if self.stacked:
            return member_losses(model(x), labels)
        return F.cross_entropy(model(x[0]), labels[0]).unsqueeze(0)  # one member: exactly the lab's step

    @property
    def step_impl(self) -> str:
        """What this stack's step takes: fused (hand-written) or autograd."""
        return "fused" if self.hand_written else "autograd"


def call(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A stack's losses as a step computes them (torch.compile compiles this function)."""
    return model(x, labels)


# -- choosing -------------------------------------------------------------------------------------
_verdicts: dict[tuple, str | None] = {}  # per process: kind of stack -> None (agrees) or how it differs


def hand_written(cfg: Config, net: nn.Module, sync_bn: bool) -> bool:
    """Whether a stack's training losses take the hand-written backward: chosen, applicable to this
    stack as built (a StackedMLP of bn and nobn members only, no sync BN, no --compile, which traces
    autograd's graph) and
    agreeing with autograd in this process's self-check."""
    if cfg.step_impl != "fused" or cfg.compile or not isinstance(net, StackedMLP) or not net.plain or (sync_bn and net.bn):
        return False
    return self_check(cfg, net) is None


def update_of(cfg: Config, opt, verified: bool = True) -> Callable[[], None]:
    """The optimizer's step as the engine calls it once per step: the direct fused Adam call where
    it applies, is chosen and has been verified (the self-check steps it against Adam.step), else the
    optimizer's own step (through Accelerate's wrapper only where the wrapper does more than forward
    the call)."""
    inner = unwrapped(opt)
    if cfg.step_impl == "fused" and verified and FusedAdamStep.applies(inner):
        return FusedAdamStep(inner)
    return inner.step


def zero_grad_of(opt) -> Callable[[], None]:
    """opt.zero_grad(set_to_none=True), through the wrapper only where it does more than forward."""
    inner = unwrapped(opt)
    return lambda: inner.zero_grad(set_to_none=True)


# -- the self-check -------------------------------------------------------------------------------
def _kind(net: StackedMLP) -> tuple:
    p = net.weights[0]
    return (tuple(net.shapes), net.variants, net.activation, tuple(net.bias_index), net.n_seeds, p.dtype,
            p.device.type, fused.__name__)


def self_check(cfg: Config, net: StackedMLP) -> str | None:
    """None when the hand-written step agrees with autograd on a copy of net (once per process and
    kind of stack); else one line saying where they differ, printed once."""
    key = (_kind(net), cfg.optimizer)
    if key not in _verdicts:
        try:
            _verdicts[key] = compare(cfg, net)
        except Exception as e:  # a private op missing or changed in this torch: autograd still works
            _verdicts[key] = f"{type(e).__name__}: {e}".splitlines()[0]
        if _verdicts[key] is not None:
            print(f"bnbench: the hand-written step differs from autograd here ({_verdicts[key]}); "
                  "training on autograd and Adam.step (--step-impl autograd)", file=sys.stderr, flush=True)
    return _verdicts[key]


def compare(cfg: Config, net: StackedMLP, batch: int = 8, steps: int = 2) -> str | None:
    """Two copies of net, `steps` training steps on one random batch: hand-written losses and the
    direct Adam call against autograd and the optimizer's own step. None if they agree (exactly on
    the CPU, within CUDA_RTOL on a GPU), else what differs first. The direct call takes over from
    the second step (the first one makes Adam's state), hence two steps."""
    # The copies share the net's process group (a torch ProcessGroup cannot be copied, nor need it be:
    # the hand-written step applies without sync BN, so the group is never used by the copies).
    memo = {} if net.process_group is None else {id(net.process_group): net.process_group}
    fast, plain = copy.deepcopy(net, dict(memo)).train(), copy.deepcopy(net, dict(memo)).train()
    p0 = net.weights[0]
    gen = torch.Generator().manual_seed(0)
    fin, classes = net.shapes[0][1], net.shapes[-1][0]
    x = torch.randn(net.n_seeds, batch, fin, generator=gen, dtype=p0.dtype).to(p0.device)
    y = torch.randint(0, classes, (net.n_seeds, batch), generator=gen).to(p0.device)
    opts = [make_optimizer(cfg, m.parameters(), fused=True) for m in (fast, plain)]
    updates = [update_of(cfg, opts[0]), opts[1].step]
    rtol = None if p0.device.type == "cpu" else CUDA_RTOL.get(p0.dtype, 1e-5)
    for t in range(steps):
        losses = [fused.fused_losses(fast, x, y), member_losses(plain(x), y)]
        if type(losses[0].grad_fn).__name__ != "StackedLossesBackward":
            return "the hand-written losses were not taken"
        for m, loss in zip((fast, plain), losses):
            m.zero_grad(set_to_none=True)
            loss.sum().backward()
        if (why := _differ("losses", *losses, rtol)) is not None:
            return f"step {t + 1}: {why}"
        for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
            if (why := _differ(f"gradient of {name}", a.grad, b.grad, rtol)) is not None:
                return f"step {t + 1}: {why}"
        for update in updates:
            update()
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        if (why := _differ(f"{name} after {steps} steps", a, b, rtol)) is not None:
            return why
    return None


def _differ(what: str, a: torch.Tensor, b: torch.Tensor, rtol: float | None) -> str | None:
    a, b = a.detach(), b.detach()
    if rtol is None or not a.is_floating_point():
        return None if torch.equal(a, b) else f"{what} not bitwise equal"
    scale = b.abs().max().item() if b.numel() else 0.0
    worst = (a - b).abs().max().item() if b.numel() else 0.0
    return None if worst <= rtol * scale else f"{what} differs by {worst:.3g} (bound {rtol:g} x {scale:.3g})"
