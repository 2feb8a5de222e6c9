"""Models: the lab's MLP as torch.nn.Sequential, and K of them stacked into one module.

A *member* is one (variant, seed) network. For a given seed the BN and the
no-BN member start from the same Linear weights: those torch.nn.Linear draws
under torch.manual_seed(seed), layer by layer, as the lab builds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import sync_batch_norm

ACTIVATION_MODULES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
ACTIVATION_FUNCTIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # torch.nn.BatchNorm1d's defaults, as in the lab
# Each member's share of a stacked parameter starts on a 64-byte boundary. torch's fused CPU
# optimizers step a tensor in 64-byte units, vectorised with a scalar tail whose rounding
# differs (contracted multiply-adds): unaligned, a member's update depends on how many members
# share its tensor (measured: fused Adam on biases [2, 1, 10] vs [1, 1, 10] departs within
# 60-480 steps). Aligned, it is bitwise the same in any stack, so seed groups of any size
# reproduce one process. In the lab's net only the output bias (10) needs padding.
ALIGN_BYTES = 64


def _stacked_parameter(parts: list[torch.Tensor]) -> nn.Parameter:
    """[K, n padded to ALIGN_BYTES] from K tensors of n elements each (padding zero; its gradient
    is zero, so every optimizer leaves it zero)."""
    n = parts[0].numel()
    unit = max(1, ALIGN_BYTES // parts[0].element_size())
    flat = torch.zeros(len(parts), -(-n // unit) * unit, dtype=parts[0].dtype)
    flat[:, :n] = torch.stack([p.reshape(-1) for p in parts])
    return nn.Parameter(flat)


def _unpadded(p: torch.Tensor, n: int) -> torch.Tensor:
    # Slicing only where there is padding: a slice's backward writes the gradient into a fresh
    # zeroed tensor, two extra passes over every weight gradient (measured +10% per lab step).
    return p if p.shape[1] == n else p[:, :n]


def init_linears(seed: int, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight [out, in], bias [out]) per layer, exactly as nn.Linear initialises them under seed.

    The global RNG is forked so that building a model never disturbs the caller's stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    return [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in layers]


def reference_mlp(
    inits: list[tuple[torch.Tensor, torch.Tensor]], bn: bool, activation: str = "relu", drop_bias: bool = False
) -> nn.Sequential:
    """The lab's model: Linear -> [BatchNorm1d] -> activation per hidden layer, then Linear.

    drop_bias (with bn): the hidden Linears have no bias, as in Ioffe & Szegedy: BN subtracts
    the mean, so a bias before it does nothing, and BN's shift takes its place."""
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(inits):
        hidden = i < len(inits) - 1
        lin = nn.Linear(w.shape[1], w.shape[0], bias=not (bn and drop_bias and hidden), dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(b)
        layers.append(lin)
        if i < len(inits) - 1:
            if bn:
                layers.append(nn.BatchNorm1d(w.shape[0], momentum=BN_MOMENTUM, eps=BN_EPS, dtype=w.dtype))
            layers.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)


class StackedMLP(nn.Module):
    """K independent MLPs of one architecture as one module.

    Weights are stacked as [K, out, in] (nn.Linear's layout) and activations run
    transposed, [K, C, B]: one torch.baddbmm per layer computes W x^T for every
    member, and per-member BN is ONE F.batch_norm over K*C channels of the same
    memory viewed as [1, K*C, B], each (member, unit) a channel. The [K, B, C]
    layout needed a transposing copy in and out of every BN layer, forward and
    backward; this one, with engine.Trainer's single backward and optimizer for
    both variants, took a default step from 9.7 to 7.7 ms (2 cores, 2026-11-28).
    Members share nothing: gradients, BN statistics and (elementwise) Adam
    states of one member never touch another's. Parameters are stored [K, padded n]
    (ALIGN_BYTES); weight(i), bias(i) and bn_affine(i) are the views the layers use.
    """

    def __init__(
        self,
        member_inits: list[list[tuple[torch.Tensor, torch.Tensor]]],
        bn: bool,
        activation: str = "relu",
        sync_bn: bool = False,
        drop_bias: bool = False,
        group=None,
    ):
        super().__init__()
        self.k = len(member_inits)
        self.bn = bn
        self.sync_bn = sync_bn  # training statistics over every process's batch (distributed.sync_batch_norm)
        self.group = group  # ... of this data-parallel process group (None: the world)
        self.activation = activation
        self.act = ACTIVATION_FUNCTIONS[activation]
        n_layers = len(member_inits[0])
        self.shapes = [tuple(member_inits[0][i][0].shape) for i in range(n_layers)]  # (out, in) per layer
        self.weights = nn.ParameterList(
            _stacked_parameter([m[i][0] for m in member_inits]) for i in range(n_layers)
        )
        # drop_bias: hidden layers of a BN net have no Linear bias (see reference_mlp); biases[j] is
        # then the j-th layer that has one, and bias_index maps layer -> j (or None).
        has_bias = [not (bn and drop_bias and i < n_layers - 1) for i in range(n_layers)]
        self.bias_index = [sum(has_bias[:i]) if has_bias[i] else None for i in range(n_layers)]
        self.biases = nn.ParameterList(
            _stacked_parameter([m[i][1] for m in member_inits]) for i in range(n_layers) if has_bias[i]
        )
        self.widths = [out for out, _ in self.shapes]
        dtype = self.weights[0].dtype
        if bn:
            kc = [self.k * c for c in self.widths[:-1]]
            ones = [[torch.ones(c, dtype=dtype)] * self.k for c in self.widths[:-1]]
            self.bn_weight = nn.ParameterList(_stacked_parameter(p) for p in ones)
            self.bn_bias = nn.ParameterList(_stacked_parameter([torch.zeros_like(x) for x in p]) for p in ones)
            for i, n in enumerate(kc):
                self.register_buffer(f"running_mean{i}", torch.zeros(n, dtype=dtype))
                self.register_buffer(f"running_var{i}", torch.ones(n, dtype=dtype))
                self.register_buffer(f"num_batches_tracked{i}", torch.tensor(0, dtype=torch.long))

    def _bn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h: [K, C, B] (contiguous) -> per-member batch norm over B, [K, C, B]: no copy either way."""
        k, c, b = h.shape
        if self.training:
            getattr(self, f"num_batches_tracked{i}").add_(1)
        flat = h.view(1, k * c, b)  # F.batch_norm's [N, C, L]: statistics over N*L = B per channel
        weight, bias = self.bn_affine(i)
        mean, var = getattr(self, f"running_mean{i}"), getattr(self, f"running_var{i}")
        if self.training and self.sync_bn:
            out = sync_batch_norm(flat[0].t(), mean, var, weight, bias, BN_MOMENTUM, BN_EPS, self.group)  # [B, K*C]
            return out.t().reshape(k, c, b)
        out = F.batch_norm(flat, mean, var, weight, bias, training=self.training, momentum=BN_MOMENTUM, eps=BN_EPS)
        return out.view(k, c, b)

    def weight(self, i: int) -> torch.Tensor:
        """Layer i's weights [K, out, in] (a view of the padded storage)."""
        fout, fin = self.shapes[i]
        return _unpadded(self.weights[i], fout * fin).view(self.k, fout, fin)

    def bias(self, i: int) -> torch.Tensor | None:
        """Layer i's biases [K, out, 1] (a column: activations are [K, C, B]), or None (drop_bias)."""
        j = self.bias_index[i]
        return None if j is None else _unpadded(self.biases[j], self.widths[i]).view(self.k, self.widths[i], 1)

    def bn_affine(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BN layer i's scale and shift over K*C channels (a copy only where C needed padding)."""
        c = self.widths[i]
        return _unpadded(self.bn_weight[i], c).reshape(-1), _unpadded(self.bn_bias[i], c).reshape(-1)

    def forward(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        """x: [K, B, in] (each member its own batch) or [B, in] (one batch for all). Returns [K, B, out]
        (a transposed view of [K, out, B]). taps: a list that receives each hidden layer's input to
        the nonlinearity, [K, B, C] (views)."""
        last = len(self.weights) - 1
        h = x.transpose(-1, -2)  # [K, in, B]: a view; the GEMMs take it transposed
        for i in range(len(self.weights)):
            w, b = self.weight(i), self.bias(i)
            if x.dim() == 2 and i == 0:
                # Shared input (evaluation): one GEMM against all members' weights stacked, [K*out, in].
                # x W^T then a transposing copy: 44 ms for 10,000 samples x 5 members, W x^T 58 ms.
                w2 = w.reshape(-1, w.shape[-1]).t()
                h = torch.addmm(b.reshape(1, -1), x, w2) if b is not None else x @ w2
                h = h.t().contiguous().view(self.k, w.shape[1], -1)
            else:
                h = torch.baddbmm(b, w, h) if b is not None else torch.bmm(w, h)
            if i < last:
                if self.bn:
                    h = self._bn(i, h)
                if taps is not None:
                    taps.append(h.transpose(1, 2))
                h = self.act(h)
        return h.transpose(1, 2)

    def _member_views(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's tensors under the keys of reference_mlp(...).state_dict(), as views into
        the stacked ones (one place for the layout, read by both directions below)."""
        views: dict[str, torch.Tensor] = {}
        idx, last = 0, len(self.weights) - 1
        for i in range(len(self.weights)):
            views[f"{idx}.weight"] = self.weight(i)[k]
            if self.bias(i) is not None:
                views[f"{idx}.bias"] = self.bias(i)[k, :, 0]
            idx += 1
            if i < last:
                if self.bn:
                    sl = slice(k * self.widths[i], (k + 1) * self.widths[i])
                    views[f"{idx}.weight"] = self.bn_weight[i][k, : self.widths[i]]
                    views[f"{idx}.bias"] = self.bn_bias[i][k, : self.widths[i]]
                    views[f"{idx}.running_mean"] = getattr(self, f"running_mean{i}")[sl]
                    views[f"{idx}.running_var"] = getattr(self, f"running_var{i}")[sl]
                    views[f"{idx}.num_batches_tracked"] = getattr(self, f"num_batches_tracked{i}")  # shared by all k
                    idx += 1
                idx += 1  # the activation
        return views

    @torch.no_grad()
    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state under the keys of reference_mlp(...).state_dict()."""
        return {key: v.clone() for key, v in self._member_views(k).items()}

    @torch.no_grad()
    def load_member_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Set member k from a reference_mlp-style state dict (the inverse of member_state_dict)."""
        views = self._member_views(k)
        if set(views) != set(state):
            raise KeyError(f"state keys {sorted(state)} do not match {sorted(views)}")
        for key, v in views.items():
            v.copy_(state[key])


# -- what the instruments read: layers, their parameters, the inputs to the nonlinearities ----------
def layer_blocks(net: nn.Module) -> list[list[str]]:
    """Per Linear layer, the names of its parameters (weight first, then bias and its BN's
    scale and shift), for StackedMLP and reference_mlp alike."""
    if isinstance(net, StackedMLP):
        blocks = []
        for i in range(len(net.weights)):
            names = [f"weights.{i}"]
            if net.bias_index[i] is not None:
                names.append(f"biases.{net.bias_index[i]}")
            if net.bn and i < len(net.weights) - 1:
                names += [f"bn_weight.{i}", f"bn_bias.{i}"]
            blocks.append(names)
        return blocks
    blocks = []
    for name, module in net.named_children():
        if isinstance(module, nn.Linear):
            blocks.append([f"{name}.{p}" for p, _ in module.named_parameters()])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            blocks[-1] += [f"{name}.{p}" for p, _ in module.named_parameters()]
    return blocks


def preactivations(net: nn.Module, x: torch.Tensor, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each hidden layer's input to its nonlinearity, [K, B, C], computed with `state`
    (torch.func.functional_call: parameters and buffers that replace the module's own, so
    that a train-mode forward updates copies of the BN running statistics, not the net's)."""
    from torch.func import functional_call

    taps: list[torch.Tensor] = []
    if isinstance(net, StackedMLP):
        functional_call(net, state, (x,), {"taps": taps})
        return taps
    acts = [m for m in net.children() if isinstance(m, tuple(ACTIVATION_MODULES.values()))]
    hooks = [m.register_forward_pre_hook(lambda m, inp: taps.append(inp[0].unsqueeze(0))) for m in acts]
    try:
        functional_call(net, state, (x,))
    finally:
        for h in hooks:
            h.remove()
    return taps
