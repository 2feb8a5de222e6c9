"""A prototype, not the engine: the default step with both variants of each seed in one set of tensors.

Issue 18's first direction, measured before it is built: the BN and no-BN members of a seed see the same
batch, so their first layers can be ONE GEMM per seed ([64, 784] x [784, b]) and the later layers one bmm
over all 2K members; BN applies to the BN half (a copy out of the interleaved layout and a cat back).
Same shapes, optimizer and arithmetic as the default run (5 seeds x bn, nobn, batch 100, fused Adam);
compare its median with test_default_step_threads[2] of the same session. Not built into the engine
yet: a member's first-layer GEMM would then have another shape in a one-process run than in a seed
group holding one variant, and the bitwise equality of seed groups with one process rests on equal shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

K, B, V, C = 5, 100, 2, 32  # seeds, batch, variants (member m = V*seed + variant; variant 0 has BN), width


def paired_step(x: torch.Tensor, y: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    p = {"w1": torch.randn(K, V * C, 784, generator=g) * 0.03, "b1": torch.zeros(K, V * C, 1),
         "w2": torch.randn(V * K, C, C, generator=g) * 0.1, "b2": torch.zeros(V * K, C, 1),
         "w3": torch.randn(V * K, 10, C, generator=g) * 0.1, "b3": torch.zeros(V * K, 10, 1),
         "g1": torch.ones(K * C), "s1": torch.zeros(K * C), "g2": torch.ones(K * C), "s2": torch.zeros(K * C)}
    params = {k: torch.nn.Parameter(v) for k, v in p.items()}
    stats = [(torch.zeros(K * C), torch.ones(K * C)) for _ in range(2)]
    opt = torch.optim.Adam(params.values(), lr=1e-3, fused=True)
    labels = y.repeat_interleave(V, 0)

    def bn_half(h, i):  # h [K, V, C, b]: BN on variant 0, identity on the others
        bn = F.batch_norm(h[:, 0].reshape(1, K * C, -1), *stats[i], params[f"g{i + 1}"], params[f"s{i + 1}"],
                          True, 0.1, 1e-5).view(K, 1, C, -1)
        return torch.cat([bn, h[:, 1:]], 1)

    def step():
        opt.zero_grad(set_to_none=True)
        h = torch.baddbmm(params["b1"], params["w1"], x.transpose(1, 2)).view(K, V, C, B)
        h = F.relu(bn_half(h, 0)).view(V * K, C, B)
        h = torch.baddbmm(params["b2"], params["w2"], h).view(K, V, C, B)
        h = F.relu(bn_half(h, 1)).view(V * K, C, B)
        logits = torch.baddbmm(params["b3"], params["w3"], h)
        F.cross_entropy(logits, labels, reduction="none").mean(1).sum().backward()
        opt.step()

    return step


def test_paired_step_prototype(benchmark, mnist):
    idx = torch.randperm(mnist.train_x.shape[0], generator=torch.Generator().manual_seed(1))[: K * B]
    step = paired_step(mnist.train_x[idx].view(K, B, 784), mnist.train_y[idx].view(K, B))
    benchmark.pedantic(step, rounds=30, iterations=5, warmup_rounds=3)
    benchmark.extra_info["member_samples_per_s"] = V * K * B / benchmark.stats.stats.median
