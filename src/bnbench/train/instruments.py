"""Instruments (--instrument): what BN changes inside the network, measured beside training.

Per member, every `instrument_every` steps (`step` = updates applied so far):
  grad_norm     ||dL/dW||_2 of each Linear layer's weight: the step's own gradient
  preact        15/50/85th percentiles of the input to the nonlinearity of PROBE_NEURONS of the
                last hidden layer over a fixed probe batch (Ioffe & Szegedy 2015, Figure 1b,c)
every `ics_every` steps (Santurkar et al. 2018, "How does batch normalization help optimization?"):
  ics_distance  ||G - G'||_2: a layer's weight gradient before (G) and after (G') the step's
                update of the layers below it, same batch (their Definition 2.1); layers 2..L
  ics_cosine    cos(G, G')
  grad_norm_all ||g||_2, g = grad L(w) over all parameters (scale for the two below)
  grad_change   ||grad L(w) - grad L(w - eta g)||_2 over all parameters, per eta:
                gradient predictiveness (their section 3.1); small = the gradient stays a good guide
  loss_along    L(w - eta g): the loss landscape along the gradient
Every extra forward runs in train mode (BN normalises with the batch's own statistics, as in
a training step) on copies of the BN buffers, and gradients come from torch.autograd.grad, so
no parameter, buffer, .grad, optimizer state or RNG of training is touched: training is
bitwise the same with instruments on or off (tests/test_instruments.py). Rows go to
DIR/instruments.jsonl, one value per row.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .models import layer_blocks, preactivations

PROBE_SAMPLES = 1000  # the first 1,000 test images: a fixed batch, the same for every member and step
PROBE_NEURONS = (0, 1, 2)  # neurons of the last hidden layer whose input distribution is traced
QUANTILES = (0.15, 0.5, 0.85)  # the paper's Figure 1(b, c)

# What each measure's row carries besides its value (README: the instruments schema).
MEASURES = {
    "grad_norm": "layer", "preact": "layer, neuron, q", "ics_distance": "layer", "ics_cosine": "layer",
    "grad_norm_all": "", "grad_change": "eta", "loss_along": "eta",
}


class Instruments:
    """Measures the stacks of a Trainer at its steps; rows() hands over what is pending."""

    def __init__(self, cfg, members: list[tuple[str, int]], probe_x: torch.Tensor, sync=lambda: None):
        self.every, self.ics_every, self.etas = cfg.instrument_every, cfg.ics_every, cfg.ics_etas
        self.members = members
        self.probe = probe_x[:PROBE_SAMPLES]
        self.sync = sync  # waits for the device, so that `seconds` is the instruments' own time
        self.seconds = 0.0  # spent measuring: taken out of the training time the rows report
        self.pending: list[tuple[int, str, int, torch.Tensor, list[dict]]] = []
        self._before: dict[int, tuple[dict, dict]] = {}
        self._blocks: dict[int, list[list[str]]] = {}  # per stack: its layers' parameter names

    def blocks(self, u) -> list[list[str]]:
        if id(u) not in self._blocks:
            self._blocks[id(u)] = layer_blocks(u.net)
        return self._blocks[id(u)]

    # -- called by Trainer.step ---------------------------------------------------------------
    def before_step(self, u, xb: torch.Tensor, yb: torch.Tensor, step: int) -> None:
        """After the step's backward, before its update: the gradients and the weights w_t."""
        often, ics = step % self.every == 0, step % self.ics_every == 0
        if not (often or ics):
            return
        t0 = self._start()
        net, blocks = u.net, self.blocks(u)
        params = dict(net.named_parameters())
        k = u.members.stop - u.members.start
        with torch.no_grad():
            if often:
                norms = torch.stack([params[b[0]].grad.reshape(k, -1).norm(dim=1) for b in blocks], 1)
                self._add(step, "grad_norm", u, norms, [{"layer": i + 1} for i in range(len(blocks))])
                h = preactivations(net, self.probe, _buffer_copies(net))[-1][:, :, list(PROBE_NEURONS)]  # [K, P, U]
                q = torch.quantile(h, torch.tensor(QUANTILES, dtype=h.dtype, device=h.device), dim=1)  # [Q, K, U]
                labels = [{"layer": len(blocks) - 1, "neuron": n, "q": qq} for n in PROBE_NEURONS for qq in QUANTILES]
                self._add(step, "preact", u, q.permute(1, 2, 0).reshape(k, -1), labels)
        if ics:
            w = {n: p.detach().clone() for n, p in params.items()}
            g = {n: p.grad.detach().clone() for n, p in params.items()}
            self._before[id(u)] = (w, g)
            changes, losses = [], []
            for eta in self.etas:
                loss, grads = _gradients(u, {n: w[n] - eta * g[n] for n in w}, xb, yb, list(w))
                changes.append(_norm(k, [grads[n] - g[n] for n in w]))
                losses.append(loss)
            self._add(step, "grad_norm_all", u, _norm(k, list(g.values())).unsqueeze(1), [{}])
            labels = [{"eta": eta} for eta in self.etas]
            self._add(step, "grad_change", u, torch.stack(changes, 1), labels)
            self._add(step, "loss_along", u, torch.stack(losses, 1), labels)
        self._stop(t0)

    def after_step(self, u, xb: torch.Tensor, yb: torch.Tensor, step: int) -> None:
        """After the update: G' of each layer l >= 2 with layers < l at w_{t+1}, the rest at w_t."""
        if step % self.ics_every:
            return
        t0 = self._start()
        w, g = self._before.pop(id(u))
        now = {n: p.detach() for n, p in u.net.named_parameters()}
        blocks = self.blocks(u)
        k = u.members.stop - u.members.start
        dist, cos = [], []
        for layer in range(1, len(blocks)):
            below = {n for b in blocks[:layer] for n in b}
            name = blocks[layer][0]
            _, g2 = _gradients(u, {n: now[n] if n in below else w[n] for n in w}, xb, yb, [name])
            a, b = g[name].reshape(k, -1), g2[name].reshape(k, -1)
            dist.append((a - b).norm(dim=1))
            cos.append(F.cosine_similarity(a, b, dim=1))
        labels = [{"layer": layer + 1} for layer in range(1, len(blocks))]
        self._add(step, "ics_distance", u, torch.stack(dist, 1), labels)
        self._add(step, "ics_cosine", u, torch.stack(cos, 1), labels)
        self._stop(t0)

    # -- records -----------------------------------------------------------------------------
    def _add(self, step: int, measure: str, u, values: torch.Tensor, labels: list[dict]) -> None:
        # Kept on the device until rows(): no host synchronisation at the measured steps.
        self.pending.append((step, measure, u.members.start, values.detach(), labels))

    def rows(self, static: dict) -> list[dict]:
        """Every pending measurement as rows, one value each; pending is emptied."""
        out = []
        for step, measure, start, values, labels in self.pending:
            for k, member_values in enumerate(values.double().cpu().tolist()):
                variant, seed = self.members[start + k]
                for label, value in zip(labels, member_values):
                    out.append({**static, "variant": variant, "seed": seed, "step": step, "measure": measure,
                                **label, "value": value})
        self.pending = []
        return out

    def _start(self) -> float:
        self.sync()
        return time.perf_counter()

    def _stop(self, t0: float) -> None:
        self.sync()
        self.seconds += time.perf_counter() - t0


def _buffer_copies(net) -> dict[str, torch.Tensor]:
    """A train-mode forward updates BN running statistics: give it copies to update."""
    return {n: b.clone() for n, b in net.named_buffers()}


def _gradients(u, state: dict[str, torch.Tensor], xb, yb, wrt: list[str]) -> tuple[torch.Tensor, dict]:
    """Per-member losses [K] at parameters `state` on the batch, and their gradients with respect
    to the parameters named in `wrt` (summing member losses keeps each member's gradient its own)."""
    with torch.enable_grad():
        params = {n: t.detach().requires_grad_(n in wrt) for n, t in state.items()}
        full = {**params, **_buffer_copies(u.net)}
        losses = u.losses_module.through(lambda x: functional_call(u.net, full, (x,)), xb, yb)
        grads = torch.autograd.grad(losses.sum(), [params[n] for n in wrt])
    return losses.detach(), dict(zip(wrt, grads))


def _norm(k: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    """[K]: each member's 2-norm over all the tensors (member-major layout: [K, ...] or [K*C])."""
    return torch.sqrt(sum((t.reshape(k, -1) ** 2).sum(1) for t in tensors))
