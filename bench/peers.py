"""What a user would write instead of bnbench to train K of the lab's 784-32-32-10 ReLU MLPs at once
(issue 32): the peers that bench/test_peers.py races and tests/test_peers.py proves equal.

Every peer trains the same members, S seeds x variants (bn, nobn), from the same init
(init_linears(seed, sizes), each seed's BN and no-BN member from the same Linear weights) on the same
resident batches: `step(xb, yb)` takes one step's [S, b, 784] inputs and [S, b] labels as
bnbench.train.engine.Trainer.batch_at draws them (one index_select out of the resident training
set; every variant of seed s trains on row s). Timing a peer therefore times training, never a
DataLoader, and the race is between equal computations (tests/test_peers.py: float64 parameters
within 1e-9 of bnbench's stacked engine after 20 steps).

- `LoopOfModels`: the lab's way. K torch.nn models (train.models.reference_mlp), each with its own
  torch.optim.Adam (default options, as the lab), stepped one after the other on each batch.
  It can do anything a model can (running statistics, eval mode, per-member hyperparameters,
  different architectures, stopping one member); it cannot share a kernel between members:
  K optimizers and K times the per-op overhead of a forward, a backward and Adam's loop over the
  parameters (torch's CPU default, neither foreach nor fused), so member-samples/s cannot grow with K.
- `FuncEnsemble`: PyTorch's model-ensembling recipe (the "Model ensembling" tutorial and
  torch.func.stack_module_state's docs): the K models' state stacked by stack_module_state, one
  functional_call of a stateless copy on the meta device under torch.vmap over the stacked state
  and the seeds' batches, one torch.optim.Adam over the stacked parameters. stack_module_state
  needs models of one structure: the BN and the no-BN members are two ensembles, two vmapped calls,
  one backward over their summed losses. With `running_stats=False` (the default, what the brief
  and torch's "Patching Batch Norm" page prescribe) BN goes through
  torch.func.replace_all_batch_norm_modules_: no running statistics, so evaluation falls back to
  batch statistics (a sample's prediction depends on the batch it is evaluated in; a batch of one
  fails). With `running_stats=True` the stacked buffers are vmapped with the parameters (in_dims 0,
  the tutorial's own `vmap(fmodel, in_dims=(0, 0, None))`): the in-place update is then batched on
  batched buffers, which vmap allows, and the running statistics are those of the loop to 1e-9 in
  float64 (torch 2.14.1; tests/test_peers.py). What the patching page forbids is updating
  *unbatched* buffers from a batched input (one module, vmapped over data: per-sample gradients).
- `Stacked`: bnbench's stacked engine itself (train.engine.Trainer over one StackedMLP, one fused
  Adam), with `step_impl="fused"` (the hand-written backward and Adam's kernel called directly) or
  `"autograd"` (autograd through StackedMLP.forward and Adam.step): `--step-impl`.

What the stacked peers (FuncEnsemble, Stacked) share as a cost of stacking: one optimizer over
stacked tensors, so every member of a tensor has the same optimizer and hyperparameters (one lr,
betas, eps per param group; a per-member lr needs another stack), and anything that is not
elementwise (clip_grad_norm_, LAMB/LARS trust ratios, weight-norm based schedules) couples the
members through the shared tensor's norm; every member of a call takes the same batch size.
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bnbench.config import make_config
from bnbench.train.engine import Trainer
from bnbench.train.models import init_linears, reference_mlp

SIZES = (784, 32, 32, 10)  # the lab's net
LR = 1e-3  # the lab's Adam (torch.optim.Adam's default, named there as here)
PEERS = ("loop", "func", "func-stats", "stacked-fused", "stacked-autograd")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def members_for(k: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """K members as the bench lays them out: K = 1 one BN member; otherwise K/2 seeds x (bn, nobn)."""
    if k == 1:
        return (0,), ("bn",)
    if k % 2:
        raise ValueError(f"K = {k}: an even number of members (K/2 seeds x bn, nobn), or 1")
    return tuple(range(k // 2)), ("bn", "nobn")


def inits(seed: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's Linear weights as nn.Linear draws them (the engine's own init), in dtype."""
    return [(w.to(dtype), b.to(dtype)) for w, b in init_linears(seed, SIZES)]


class Peer(Protocol):
    name: str
    seeds: tuple[int, ...]
    variants: tuple[str, ...]

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None: ...

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]: ...


class LoopOfModels:
    """K nn.Sequential members, each with its own Adam, stepped one after the other (the lab's loop
    on resident batches): for each seed's batch, its BN member, then its no-BN member."""

    name = "loop"

    def __init__(self, seeds, variants, dtype=torch.float32, device="cpu"):
        self.seeds, self.variants = tuple(seeds), tuple(variants)
        self.models = {(v, s): reference_mlp(inits(s, dtype), v).to(device) for s in self.seeds for v in self.variants}
        self.optimizers = {key: torch.optim.Adam(m.parameters(), lr=LR) for key, m in self.models.items()}
        self.criterion = nn.CrossEntropyLoss()

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        for i, s in enumerate(self.seeds):
            x, y = xb[i], yb[i]
            for v in self.variants:
                model, opt = self.models[(v, s)], self.optimizers[(v, s)]
                model.train()
                opt.zero_grad()
                self.criterion(model(x), y).backward()
                opt.step()

    @torch.no_grad()
    def eval_logits(self, variant: str, x: torch.Tensor) -> torch.Tensor:
        """[S, n, 10]: each seed's member of `variant` in eval mode (BN with running statistics)."""
        out = []
        for s in self.seeds:
            m = self.models[(variant, s)]
            m.eval()
            out.append(m(x))
        return torch.stack(out)

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.models[(variant, seed)].state_dict().items()}


class _Ensemble:
    """One variant's S members as torch.func ensembles them: stacked params (leaves for the
    optimizer), stacked buffers, a stateless base copy on the meta device."""

    def __init__(self, variant: str, seeds, dtype, device, running_stats: bool):
        models = [reference_mlp(inits(s, dtype), variant).to(device) for s in seeds]
        if variant == "bn" and not running_stats:
            for m in models:
                torch.func.replace_all_batch_norm_modules_(m)
        self.params, self.buffers = torch.func.stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")

        def member_loss(params, buffers, x, y):
            return F.cross_entropy(torch.func.functional_call(self.base, (params, buffers), (x,)), y)

        def member_logits(params, buffers, x):
            return torch.func.functional_call(self.base, (params, buffers), (x,))

        self.losses = torch.vmap(member_loss)  # [S] losses: member s on batch row s
        self.logits = torch.vmap(member_logits, in_dims=(0, 0, None))  # every member on one x


class FuncEnsemble:
    """torch.func's ensembling recipe: per variant one stacked ensemble under vmap; one Adam over
    all stacked parameters; one backward of the summed member losses per step.

    running_stats=False (default): BN patched by replace_all_batch_norm_modules_ (batch statistics
    only, in training and in eval). running_stats=True: the stacked BN buffers vmapped with the
    parameters, so that they are updated per member as nn.BatchNorm1d updates them."""

    def __init__(self, seeds, variants, dtype=torch.float32, device="cpu", running_stats: bool = False):
        self.seeds, self.variants = tuple(seeds), tuple(variants)
        self.running_stats = running_stats
        self.name = "func-stats" if running_stats else "func"
        self.ensembles = {v: _Ensemble(v, self.seeds, dtype, device, running_stats) for v in self.variants}
        self.optimizer = torch.optim.Adam([p for e in self.ensembles.values() for p in e.params.values()], lr=LR)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        total = None
        for e in self.ensembles.values():
            e.base.train()
            loss = e.losses(e.params, e.buffers, xb, yb).sum()  # summed: each member's gradient stays its own
            total = loss if total is None else total + loss
        total.backward()
        self.optimizer.step()

    @torch.no_grad()
    def eval_logits(self, variant: str, x: torch.Tensor) -> torch.Tensor:
        """[S, n, 10]: the variant's members in eval mode on x. Patched BN (running_stats=False)
        has no running statistics and normalizes with x's own batch statistics."""
        e = self.ensembles[variant]
        e.base.eval()
        try:
            return e.logits(e.params, e.buffers, x)
        finally:
            e.base.train()

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]:
        """Under reference_mlp's keys; a patched BN member has no running statistics (parameters only)."""
        e, i = self.ensembles[variant], self.seeds.index(seed)
        return {k: v[i].detach().clone() for d in (e.params, e.buffers) for k, v in d.items()}


class Stacked:
    """bnbench's stacked engine: a Trainer of S seeds x variants (one StackedMLP, one fused Adam),
    stepped as a run steps it (Trainer.step), on the batches it is given."""

    def __init__(self, seeds, variants, splits, accelerator, dtype: str = "float32", step_impl: str = "fused"):
        self.seeds, self.variants = tuple(seeds), tuple(variants)
        self.name = f"stacked-{step_impl}"
        cfg = make_config(seeds=self.seeds, variants=self.variants, dtype=dtype, step_impl=step_impl)
        self.trainer = Trainer(cfg, splits, accelerator)
        self.loss_sum = torch.zeros(len(self.trainer.members), dtype=torch.float64, device=self.trainer.device)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.trainer.step(xb, yb, self.loss_sum)

    @torch.no_grad()
    def eval_logits(self, variant: str, x: torch.Tensor) -> torch.Tensor:
        """[S, n, 10]: the variant's members in eval mode (BN with running statistics)."""
        states = [self.member_state(variant, s) for s in self.seeds]
        out = []
        for s, state in zip(self.seeds, states):
            m = reference_mlp(inits(s, x.dtype), variant).to(x.device)
            m.load_state_dict(state)
            m.eval()
            out.append(m(x))
        return torch.stack(out)

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]:
        return self.trainer.member_state(variant, seed)


def make_peer(name: str, seeds, variants, splits, accelerator, dtype: str = "float32") -> Peer:
    """One of PEERS over the members (seeds x variants), on splits' device, in dtype."""
    tdtype, device = getattr(torch, dtype), splits.train_x.device
    if name == "loop":
        return LoopOfModels(seeds, variants, tdtype, device)
    if name in ("func", "func-stats"):
        return FuncEnsemble(seeds, variants, tdtype, device, running_stats=name == "func-stats")
    if name in ("stacked-fused", "stacked-autograd"):
        return Stacked(seeds, variants, splits, accelerator, dtype, step_impl=name.removeprefix("stacked-"))
    raise ValueError(f"unknown peer {name!r}; one of {', '.join(PEERS)}")


def batch_source(seeds, variants, splits, accelerator, dtype: str = "float32") -> Trainer:
    """A Trainer whose epoch_order / batch_at draw the members' batches exactly as bnbench's engine
    draws them (per seed and epoch one permutation, one index_select per step)."""
    return Trainer(make_config(seeds=tuple(seeds), variants=tuple(variants), dtype=dtype), splits, accelerator)


# -- memory: what a peer holds at its peak, from the process's resident set ------------------------
def _glibc_trim() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), so that memory freed by
    earlier work is not silently reused without showing in the resident set; False where absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS: Linux >= 4.0,
    `echo 5 > /proc/PID/clear_refs`. False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_delta(work) -> tuple[object, int, str]:
    """(work()'s result, bytes, method): the process's peak resident set while work() ran, less its
    resident set just before, after a gc and malloc_trim.

    Why the resident set (psutil, /proc) and not tracemalloc: tracemalloc traces Python's own
    allocator only, and torch allocates tensors with the C allocator (a 40 MB torch.zeros shows as
    80 bytes there). The peak: Linux's VmHWM reset through /proc/self/clear_refs just before, read
    just after ("peak-rss"); where that is not allowed, the resident set after work() ("rss-after",
    which misses the step's transient activations). It counts everything the process touched for
    the peer: tensors, the allocator's slack, Python objects (K modules for the loop), and the
    C libraries' scratch; not the resident training set, which is there before."""
    import gc

    import psutil

    gc.collect()
    _glibc_trim()
    peak_ok = _reset_peak()
    before = psutil.Process().memory_info().rss
    result = work()
    peak = _peak_rss() if peak_ok else None
    if peak is None:
        return result, psutil.Process().memory_info().rss - before, "rss-after"
    return result, peak - before, "peak-rss"
