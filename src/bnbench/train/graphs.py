"""A Trainer's step restructured for CUDA-graph capture, and captured where CUDA is there.

A default step is 30-40 small kernels; on a GPU, launching them from Python takes longer than
running them, and a graph replays them all with one launch. What capture needs, step by step:
  - static inputs: the step's batch is copied into buffers allocated once (copy_ is one kernel);
  - gradients: set to None once before capture, so that the captured backward writes them into
    the graph's memory; they are never freed between replays (no zero_grad while replaying);
  - the loss accumulator: a buffer allocated once, added to inside the graph;
  - Adam with a capturable state (step counts on the device, no host sync in its update);
  - warm-up on a side stream before capture (lazy state, cuBLAS/cuDNN handles, the
    hand-written step's plan); its effect on parameters, buffers and optimizer state is undone.
Without capture (the CPU, or capture=False on a GPU) the same restructured step runs eagerly,
and then it is bitwise Trainer.step (tests/test_graphs.py); on CUDA, bench/gpu_check.py compares
the captured step with the uncaptured one over 100 steps.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .engine import Trainer
from .optim import unwrapped


class GraphStep:
    """trainer's step as step(xb, yb): one replay of a captured graph when capture=True (CUDA
    only), else the same work eagerly. loss_sum [members] accumulates each member's batch loss.

    capturable: build Adam with capturable=True (the default with capture, as capture requires);
    compare a captured step with an uncaptured one of the same capturable=True to isolate capture.
    One process, no DDP, no --compile, no instruments: what a graph of one device can hold."""

    def __init__(self, trainer: Trainer, capture: bool = False, capturable: bool | None = None, warmup: int = 3):
        t = self.trainer = trainer
        if t.world_size > 1 or t.instruments is not None or t.cfg.compile:
            raise ValueError("GraphStep: one process, without --instrument or --compile")
        if capture and t.device.type != "cuda":
            raise ValueError("GraphStep: capture needs a CUDA device")
        capturable = capture if capturable is None else capturable
        if capturable:
            self._capturable_optimizers()
        n_in = t.splits.train_x.shape[1]
        self.x = torch.zeros(len(t.batch_seeds), t.local_batch, n_in, dtype=t.splits.train_x.dtype, device=t.device)
        self.y = torch.zeros(len(t.batch_seeds), t.local_batch, dtype=t.splits.train_y.dtype, device=t.device)
        self.loss_sum = torch.zeros(len(t.members), dtype=torch.float64, device=t.device)
        self.graph = None
        if capture:
            self._capture(warmup)

    def _capturable_optimizers(self) -> None:
        """Each optimizer group's Adam remade with capturable=True over the same parameters (before any
        step: its state is empty), its update through Adam.step (the direct call leaves capturable alone)."""
        for group in self.trainer.optimizer_groups:
            opt = unwrapped(group.optimizer)  # one process: Accelerate's wrapper only forwards
            if len(opt.state):
                raise ValueError("GraphStep: make it before the first step")
            if isinstance(opt, torch.optim.Adam):
                hp = opt.param_groups[0]
                new = torch.optim.Adam(opt.param_groups[0]["params"], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                                       weight_decay=hp["weight_decay"], fused=hp.get("fused"), capturable=True)
                group.optimizer, group.update = new, new.step
                group.zero_grad = lambda new=new: new.zero_grad(set_to_none=True)
                for u in group.stacks:
                    u.optimizer = new

    def _body(self) -> None:
        """What the graph holds: the losses, one backward and one update per optimizer group, the
        losses added to loss_sum; as Trainer.step, reading the static batch."""
        for group in self.trainer.optimizer_groups:
            losses = [u.losses(u.model, self.x[u.rows], self.y[u.rows]) for u in group.stacks]
            total = losses[0].sum()
            for more in losses[1:]:
                total = total + more.sum()
            total.backward()
            group.update()
            for u, lost in zip(group.stacks, losses):
                self.loss_sum[u.members] += lost.detach()

    def _state(self) -> dict:
        t = self.trainer
        return {"nets": [copy.deepcopy(u.net.state_dict()) for u in t.stacks],
                "opts": [copy.deepcopy(g.optimizer.state_dict()) for g in t.optimizer_groups]}

    def prepare_for_capture(self, warmup: int = 3) -> None:
        """Warm-up steps (on a side stream on CUDA, as torch.cuda.graphs asks) that make the lazy
        optimizer state, library handles and the hand-written step's plan, then everything they
        changed put back: parameters and buffers as before, the optimizer state's tensors kept but
        zeroed (Adam's fresh state), gradients None. The next step is then the first, as in a fresh
        trainer; on the CPU this is rehearsed without a graph (tests/test_graphs.py)."""
        t = self.trainer
        for u in t.stacks:
            u.model.train()
        before = self._state()
        cuda = t.device.type == "cuda"
        side = torch.cuda.Stream(t.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(max(warmup, 2)):  # two at least: the state exists from the first step on
                for g in t.optimizer_groups:
                    g.optimizer.zero_grad(set_to_none=True)
                self._body()
        if cuda:
            torch.cuda.current_stream(t.device).wait_stream(side)
            torch.cuda.synchronize(t.device)
        self._restore_in_place(before)
        for g in t.optimizer_groups:
            g.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients

    def _capture(self, warmup: int) -> None:
        self.prepare_for_capture(warmup)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _restore_in_place(self, before: dict) -> None:
        """Parameters, buffers and optimizer state back to `before`, keeping the optimizer state's
        tensors (made during warm-up) so that capture records them: Adam's fresh state is its
        moments at zero and its step counts at zero."""
        t = self.trainer
        with torch.no_grad():
            for u, sd in zip(t.stacks, before["nets"]):
                u.net.load_state_dict(sd)
            for g, sd in zip(t.optimizer_groups, before["opts"]):
                if sd["state"]:
                    raise ValueError("GraphStep: make it before the first step")
                for state in g.optimizer.state.values():
                    for v in state.values():
                        if torch.is_tensor(v):
                            v.zero_()
        self.loss_sum.zero_()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.x.copy_(xb)
        self.y.copy_(yb)
        if self.graph is not None:
            self.graph.replay()
        else:
            for g in self.trainer.optimizer_groups:
                g.zero_grad()
            self._body()
