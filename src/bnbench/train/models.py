"""Models: the lab's MLP as torch.nn.Sequential, and K of them stacked into one module.

A *member* is one (variant, seed) network. For a given seed the BN and the
no-BN member start from the same Linear weights: those torch.nn.Linear draws
under torch.manual_seed(seed), layer by layer, as the lab builds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dist.groups import global_moments, sync_batch_norm
from . import norms
from .norms import NORMS, Renorm, norm_module

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


def reference_mlp(inits: list[tuple[torch.Tensor, torch.Tensor]], norm: str, activation: str = "relu",
                  drop_bias: bool = False, gn_groups: int = 1, renorm: Renorm = Renorm()) -> nn.Sequential:
    """The lab's model: Linear -> [normalization] -> activation per hidden layer, then Linear.
    norm: a variant (norms.NORMS): bn puts BatchNorm1d where the lab does, nobn nothing.

    drop_bias (with bn): the hidden Linears have no bias, as in Ioffe & Szegedy: BN subtracts
    the mean, so a bias before it does nothing, and BN's shift takes its place."""
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(inits):
        hidden = i < len(inits) - 1
        lin = nn.Linear(w.shape[1], w.shape[0], bias=not (norm == "bn" and drop_bias and hidden), dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(b)
        layers.append(lin)
        if hidden:
            module = norm_module(norm, w.shape[0], w.dtype, gn_groups, renorm)
            if module is not None:
                layers.append(module)
            layers.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)


def with_slot(grouped: torch.Tensor, slot: int, part: torch.Tensor) -> torch.Tensor:
    """grouped [S, V, C, B] with variant `slot` replaced by part ([S, C, B] in any contiguous shape):
    one torch.cat, as the BN half goes back among the members (and its gradient, in fused.py's
    backward). Returns [S*V, C, B]."""
    s, v, c, b = grouped.shape
    parts = [grouped[:, :slot], part.view(s, 1, c, b), grouped[:, slot + 1 :]]
    return torch.cat([p for p in parts if p.shape[1]], 1).view(s * v, c, b)


class StackedMLP(nn.Module):
    """The members of S seeds x V variants (variant_bn[v]: variant v has BN) as one module.

    Members are numbered variant-major outside (k = v*S + s, engine.Trainer's order) and stored
    seed-major inside (m = s*V + v): the V members of a seed see the same batch, so their first
    layers are ONE GEMM per seed, [V*out, in] x [in, B] (the layer with most of the FLOPs, its input
    read once), and every later layer one torch.baddbmm over all S*V members. Weights are [out, in]
    (nn.Linear's layout) and activations run transposed, [members, C, B], so that per-member BN is
    ONE F.batch_norm over the BN members' channels viewed as [1, n*C, B]: no copy when every
    member has BN, one out of the interleaved layout and a cat back when some have not
    (docs/performance.md has the measurements that chose this layout). Members share nothing:
    gradients, BN statistics and (elementwise) Adam states of one member never touch another's.
    Parameters are stored [members, padded n] (ALIGN_BYTES), so a member's arithmetic is the same
    in a module of any size; weight(i), bias(i), gemm_operands(i) and bn_affine(i) are the views
    the layers use. The layers are written once, in trunk(): forward() runs it under autograd, and
    the hand-written step (fused.py) runs the same trunk outside autograd, keeping what its
    backward needs.
    """

    bn_momentum, bn_eps = BN_MOMENTUM, BN_EPS  # read each step, by _bn and by fused.py

    def __init__(
        self,
        member_inits: list[list[tuple[torch.Tensor, torch.Tensor]]],
        variants: str | tuple[str, ...],
        activation: str = "relu",
        sync_bn: bool = False,
        drop_bias: bool = False,
        process_group=None,
        gn_groups: int = 1,
        renorm: Renorm = Renorm(),
    ):
        super().__init__()
        self.variants = (variants,) if isinstance(variants, str) else tuple(variants)  # norms.NORMS, each once
        if len(set(self.variants)) != len(self.variants) or not set(self.variants) <= set(NORMS):
            raise ValueError(f"variants must be distinct names of {NORMS}, got {self.variants}")
        self.variant_bn = tuple(v == "bn" for v in self.variants)  # per variant: has BN
        self.n_seeds, v = len(member_inits), len(self.variants)
        self.n_members = self.n_seeds * v
        self.bn = any(self.variant_bn)
        self.bn_slot = [i for i, b in enumerate(self.variant_bn) if b]
        # Only bn and nobn: BN as it always ran (one F.batch_norm over the BN members, the hand-written
        # step's case); any other normalization: each variant's members normalized apart, then one cat.
        self.plain = set(self.variants) <= {"bn", "nobn"}
        self.other_norms = [k for k in self.variants if k not in ("bn", "nobn")]
        if drop_bias and self.bn and v > 1:
            raise ValueError("drop_bias: hold the BN and the no-BN members in separate StackedMLPs")
        self.sync_bn = sync_bn  # BN/BRN training statistics over every process's batch (dist.groups)
        self.process_group = process_group  # ... of this data-parallel process group (None: the world)
        self.gn_groups, self.renorm = gn_groups, renorm
        self.activation = activation
        self.act = ACTIVATION_FUNCTIONS[activation]
        n_layers = len(member_inits[0])
        self.shapes = [tuple(member_inits[0][i][0].shape) for i in range(n_layers)]  # (out, in) per layer
        inside = [m for m in member_inits for _ in range(v)]  # seed-major: every seed's V members start alike
        self.weights = nn.ParameterList(_stacked_parameter([m[i][0] for m in inside]) for i in range(n_layers))
        # drop_bias: hidden layers of a BN net have no Linear bias (see reference_mlp); biases[j] is
        # then the j-th layer that has one, and bias_index maps layer -> j (or None).
        has_bias = [not (self.bn and drop_bias and i < n_layers - 1) for i in range(n_layers)]
        self.bias_index = [sum(has_bias[:i]) if has_bias[i] else None for i in range(n_layers)]
        self.biases = nn.ParameterList(
            _stacked_parameter([m[i][1] for m in inside]) for i in range(n_layers) if has_bias[i]
        )
        self.widths = [out for out, _ in self.shapes]
        dtype = self.weights[0].dtype
        if self.bn:  # the BN members': one per seed
            nb = self.n_seeds * len(self.bn_slot)
            ones = [[torch.ones(c, dtype=dtype)] * nb for c in self.widths[:-1]]
            self.bn_weight = nn.ParameterList(_stacked_parameter(p) for p in ones)
            self.bn_bias = nn.ParameterList(_stacked_parameter([torch.zeros_like(x) for x in p]) for p in ones)
            for i, c in enumerate(self.widths[:-1]):
                self.register_buffer(f"running_mean{i}", torch.zeros(nb * c, dtype=dtype))
                self.register_buffer(f"running_var{i}", torch.ones(nb * c, dtype=dtype))
                self.register_buffer(f"num_batches_tracked{i}", torch.tensor(0, dtype=torch.long))
        # The other normalizations' scale (and shift, but rms), per kind and hidden layer, one row per
        # seed: "ln0", "gn1", ...; brn's running mean and std as buffers. After BN's, so that a bn/nobn
        # module's parameters are what they always were.
        self.norm_weight, self.norm_bias = nn.ParameterDict(), nn.ParameterDict()
        for kind in self.other_norms:
            for i, c in enumerate(self.widths[:-1]):
                self.norm_weight[f"{kind}{i}"] = _stacked_parameter([torch.ones(c, dtype=dtype)] * self.n_seeds)
                if kind != "rms":
                    self.norm_bias[f"{kind}{i}"] = _stacked_parameter([torch.zeros(c, dtype=dtype)] * self.n_seeds)
                if kind == "brn":
                    self.register_buffer(f"brn_running_mean{i}", torch.zeros(self.n_seeds * c, dtype=dtype))
                    self.register_buffer(f"brn_running_std{i}", torch.ones(self.n_seeds * c, dtype=dtype))
                    self.register_buffer(f"brn_num_batches_tracked{i}", torch.tensor(0, dtype=torch.long))

    @property
    def mixed(self) -> bool:
        """Some variants have BN and some not: the BN members are taken out of the interleaved layout."""
        return self.bn and len(self.variant_bn) > len(self.bn_slot)

    def bn_members(self, h: torch.Tensor, normalize) -> torch.Tensor:
        """h [members seed-major, C, B] with the BN members' channels replaced by normalize(flat),
        flat their [1, n*C, B] view (F.batch_norm's [N, C, L]: statistics over B per channel)."""
        m, c, b = h.shape
        if not self.mixed:
            return normalize(h.reshape(1, m * c, b)).view(m, c, b)
        grouped = h.view(self.n_seeds, len(self.variant_bn), c, b)
        part = grouped[:, self.bn_slot[0]]  # the BN variant's members, one per seed
        out = normalize(part.reshape(1, -1, b))
        return with_slot(grouped, self.bn_slot[0], out)

    def _bn_flat(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Hidden layer i's BN of the BN members' channels flat [1, n*C, B] under autograd:
        F.batch_norm, or the cross-process BN with sync_bn in training."""
        weight, bias = self.bn_affine(i)
        mean, var = getattr(self, f"running_mean{i}"), getattr(self, f"running_var{i}")
        if self.training and self.sync_bn:
            out = sync_batch_norm(flat[0].t(), mean, var, weight, bias, self.bn_momentum, self.bn_eps, self.process_group)
            return out.t().reshape(flat.shape)  # [B, n*C] -> [1, n*C, B]
        return F.batch_norm(flat, mean, var, weight, bias, training=self.training, momentum=self.bn_momentum,
                            eps=self.bn_eps)

    def _bn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Hidden layer i's BN of h [members, C, B] (bn and nobn members only)."""
        if self.training:
            getattr(self, f"num_batches_tracked{i}").add_(1)
        return self.bn_members(h, lambda flat: self._bn_flat(i, flat))

    def normalize(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Hidden layer i's normalizations of h [members seed-major, C, B], each variant its own."""
        if self.plain:
            return self._bn(i, h) if self.bn else h
        s, v = self.n_seeds, len(self.variants)
        m, c, b = h.shape
        grouped = h.view(s, v, c, b)
        parts = [self._norm_of(kind, i, grouped[:, slot]) for slot, kind in enumerate(self.variants)]
        return torch.cat([p.reshape(s, 1, c, b) for p in parts], 1).view(m, c, b)

    def _norm_of(self, kind: str, i: int, part: torch.Tensor) -> torch.Tensor:
        """One variant's members' part [S, C, B] of hidden layer i, normalized by its kind (norms.py)."""
        s, c, b = part.shape
        if kind == "nobn":
            return part
        if kind == "bn":
            if self.training:
                getattr(self, f"num_batches_tracked{i}").add_(1)
            return self._bn_flat(i, part.reshape(1, s * c, b)).view(s, c, b)
        weight = _unpadded(self.norm_weight[f"{kind}{i}"], c).reshape(s, c, 1)
        bias = _unpadded(self.norm_bias[f"{kind}{i}"], c).reshape(s, c, 1) if kind != "rms" else None
        if kind == "ln":
            return norms.layer_norm(part, weight, bias)
        if kind == "gn":
            return norms.group_norm(part, self.gn_groups, weight, bias)
        if kind == "rms":
            return norms.rms_norm(part, weight)
        # brn: per channel over the batch, as BN: on the [B, S*C] view of the members' channels
        x = part.reshape(s * c, b).t()
        mean, std = getattr(self, f"brn_running_mean{i}"), getattr(self, f"brn_running_std{i}")
        tracked = getattr(self, f"brn_num_batches_tracked{i}")
        moments, limits = None, (1.0, 0.0)
        if self.training:
            limits = self.renorm.limits(tracked)
            tracked.add_(1)
            if self.sync_bn:
                moments = global_moments(x, mean, self.process_group)[:2]
        out = norms.batch_renorm(x, mean, std, weight.reshape(-1), bias.reshape(-1), limits, BN_MOMENTUM, BN_EPS,
                                 self.training, moments)
        return out.t().reshape(s, c, b)

    def weight(self, i: int) -> torch.Tensor:
        """Layer i's weights [members (seed-major), out, in] (a view of the padded storage)."""
        fout, fin = self.shapes[i]
        return _unpadded(self.weights[i], fout * fin).view(self.n_members, fout, fin)

    def bias(self, i: int) -> torch.Tensor | None:
        """Layer i's biases [members (seed-major), out, 1] (a column: activations are [members, C, B]), or None."""
        j = self.bias_index[i]
        return None if j is None else _unpadded(self.biases[j], self.widths[i]).view(self.n_members, self.widths[i], 1)

    def gemm_operands(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's (weight, bias or None) as its GEMM takes them: layer 0 one [V*out, in] block per
        seed ([S, V*out, in], bias [S, V*out, 1]), every other layer one per member."""
        w, b = self.weight(i), self.bias(i)
        if i == 0:
            fout, fin = self.shapes[0]
            v = len(self.variant_bn)
            w = w.reshape(self.n_seeds, v * fout, fin)
            b = None if b is None else b.reshape(self.n_seeds, v * fout, 1)
        return w, b

    def bn_affine(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BN layer i's scale and shift over the BN members' channels (a copy only where C needed padding)."""
        c = self.widths[i]
        return _unpadded(self.bn_weight[i], c).reshape(-1), _unpadded(self.bn_bias[i], c).reshape(-1)

    def _outside(self, t: torch.Tensor) -> torch.Tensor:
        """[members seed-major, ...] -> [members variant-major, ...] (a copy only when V > 1)."""
        v = len(self.variant_bn)
        if v == 1:
            return t
        return t.view(self.n_seeds, v, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def trunk(self, x: torch.Tensor, operands, norm, keep: list | None = None) -> torch.Tensor:
        """The layers, written once: x [S, B, in] (one batch per seed, shared by its variants) or
        [B, in] (one batch for all) -> logits [members seed-major, out, B].

        operands[i]: layer i's (weight, bias) as gemm_operands(i) gives them; norm(i, a): hidden
        layer i's normalization of a [members, C, B] (a itself where there is none); keep: a list
        that receives, per layer, (its GEMM input, its activation output or None for the last)."""
        last = len(operands) - 1
        h = x.transpose(-1, -2)  # [S, in, B]: a view; the GEMMs take it transposed
        for i, (w, b) in enumerate(operands):
            c, h_in = self.widths[i], h
            if i == 0 and x.dim() == 2:
                # Shared input (evaluation): one GEMM against all members' weights stacked, [members*out, in].
                # x W^T then a transposing copy is faster than W x^T on the CPU (docs/performance.md).
                w2 = w.reshape(-1, w.shape[-1]).t()
                a = torch.addmm(b.reshape(1, -1), x, w2) if b is not None else x @ w2
                a = a.t().contiguous().view(self.n_members, c, -1)
            else:
                a = torch.baddbmm(b, w, h) if b is not None else torch.bmm(w, h)
                if i == 0:
                    a = a.view(self.n_members, c, -1)
            if i == last:
                if keep is not None:
                    keep.append((h_in, None))
                return a
            h = self.act(norm(i, a))
            if keep is not None:
                keep.append((h_in, h))

    def forward(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        """x: [S, B, in] (one batch per seed, shared by its variants) or [B, in] (one batch for all).
        Returns [members, B, out] in variant-major order (a transposed view of [members, out, B]).
        taps: a list that receives each hidden layer's input to the nonlinearity, [members, B, C]."""

        def norm(i, a):
            a = self.normalize(i, a)
            if taps is not None:
                taps.append(self._outside(a).transpose(1, 2))
            return a

        logits = self.trunk(x, [self.gemm_operands(i) for i in range(len(self.shapes))], norm)
        return self._outside(logits).transpose(1, 2)

    def _member_views(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's tensors (k variant-major, as the engine numbers them) under the keys of
        reference_mlp(...).state_dict(), as views into the stacked ones (one place for the layout,
        read by both directions below)."""
        v, s = divmod(k, self.n_seeds)
        m = s * len(self.variants) + v  # its row inside
        kind = self.variants[v]
        bn = kind == "bn"
        views: dict[str, torch.Tensor] = {}
        idx, last = 0, len(self.weights) - 1
        for i in range(len(self.weights)):
            views[f"{idx}.weight"] = self.weight(i)[m]
            if self.bias(i) is not None:
                views[f"{idx}.bias"] = self.bias(i)[m, :, 0]
            idx += 1
            if i < last:
                if bn:
                    c = self.widths[i]
                    r = s * len(self.bn_slot) + self.bn_slot.index(v)  # its row among the BN members
                    sl = slice(r * c, (r + 1) * c)
                    views[f"{idx}.weight"] = self.bn_weight[i][r, :c]
                    views[f"{idx}.bias"] = self.bn_bias[i][r, :c]
                    views[f"{idx}.running_mean"] = getattr(self, f"running_mean{i}")[sl]
                    views[f"{idx}.running_var"] = getattr(self, f"running_var{i}")[sl]
                    views[f"{idx}.num_batches_tracked"] = getattr(self, f"num_batches_tracked{i}")  # shared by all
                    idx += 1
                elif kind != "nobn":  # one row per seed of this kind's parameters and buffers
                    c = self.widths[i]
                    views[f"{idx}.weight"] = self.norm_weight[f"{kind}{i}"][s, :c]
                    if kind != "rms":
                        views[f"{idx}.bias"] = self.norm_bias[f"{kind}{i}"][s, :c]
                    if kind == "brn":
                        sl = slice(s * c, (s + 1) * c)
                        views[f"{idx}.running_mean"] = getattr(self, f"brn_running_mean{i}")[sl]
                        views[f"{idx}.running_std"] = getattr(self, f"brn_running_std{i}")[sl]
                        views[f"{idx}.num_batches_tracked"] = getattr(self, f"brn_num_batches_tracked{i}")
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


def member_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[members] mean cross-entropy: logits [members, b, 10] (variant-major), labels [seeds, b]
    (each seed's batch, shared by its variants; repeated variant-major, as the members)."""
    labels = labels.repeat(logits.shape[0] // labels.shape[0], 1)
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)  # [K, 10, b]: taken as it is


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
