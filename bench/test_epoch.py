"""Whole epochs and the loops around them, in the same session as the lab's own loop.

- the lab loop: torchvision MNIST + ToTensor through a shuffled DataLoader of 100, the BN
  and the no-BN nn.Sequential stepped on each batch (lab 9-4, cell by cell): the baseline;
- a training epoch of the stacked engine: the default run (5 seeds x bn,nobn) and 32 seeds;
- the bare step loop (gather + step, nothing else) against `training_function`'s epoch
  (progress, device-side loss accumulation, results rows): the harness overhead;
- one full evaluation (60,000 + 10,000 samples) against a training epoch;
- data preparation from the IDX files (cold) and from the cache (warm);
- the machine's matmul rate, for the arithmetic limit.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from bnbench.config import make_config
from bnbench.train.engine import Trainer
from bnbench.training import Setup, training_function
from bnbench.train.models import init_linears, reference_mlp

SEEDS = {"default": tuple(range(5)), "32seeds": tuple(range(32))}


def test_lab_loop_epoch(benchmark, torchvision_root):
    import torchvision.datasets as dsets
    import torchvision.transforms as transforms

    torch.manual_seed(1)
    train = dsets.MNIST(root=str(torchvision_root), train=True, transform=transforms.ToTensor(), download=False)
    loader = torch.utils.data.DataLoader(dataset=train, batch_size=100, shuffle=True, drop_last=True)
    bn_model = reference_mlp(init_linears(1, (784, 32, 32, 10)), "bn")
    nn_model = reference_mlp(init_linears(1, (784, 32, 32, 10)), "nobn")
    criterion = torch.nn.CrossEntropyLoss()
    bn_optimizer = torch.optim.Adam(bn_model.parameters(), lr=1e-3)
    nn_optimizer = torch.optim.Adam(nn_model.parameters(), lr=1e-3)

    def epoch():
        bn_model.train()
        nn_model.train()
        for X, Y in loader:
            X = X.view(-1, 28 * 28)
            bn_optimizer.zero_grad()
            bn_loss = criterion(bn_model(X), Y)
            bn_loss.backward()
            bn_optimizer.step()
            nn_optimizer.zero_grad()
            nn_loss = criterion(nn_model(X), Y)
            nn_loss.backward()
            nn_optimizer.step()

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=0)
    benchmark.extra_info["member_samples_per_s"] = 2 * 60_000 / benchmark.stats.stats.median


@pytest.mark.parametrize("seeds", list(SEEDS))
def test_train_epoch(benchmark, mnist, accelerator, seeds):
    trainer = Trainer(make_config(seeds=SEEDS[seeds]), mnist, accelerator)
    epochs = iter(range(1, 10**6))
    benchmark.pedantic(lambda: trainer.train_epoch(next(epochs)), rounds=3 if seeds == "default" else 2, warmup_rounds=1)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * 60_000 / benchmark.stats.stats.median


@pytest.mark.parametrize("seeds", ["default"])
def test_full_evaluation(benchmark, mnist, accelerator, seeds):
    trainer = Trainer(make_config(seeds=SEEDS[seeds]), mnist, accelerator)

    def both():
        trainer.evaluate(mnist.train_x, mnist.train_y)
        trainer.evaluate(mnist.test_x, mnist.test_y)

    benchmark.pedantic(both, rounds=5, warmup_rounds=1)


def test_bare_step_loop(benchmark, mnist, accelerator):
    """An epoch of nothing but gather + step: the ceiling for the run's training throughput."""
    trainer = Trainer(make_config(), mnist, accelerator)
    loss_sum = torch.zeros(len(trainer.members), dtype=torch.float64)
    epochs = iter(range(1, 10**6))

    def loop():
        order = trainer.epoch_order(next(epochs))
        for t in range(trainer.steps_per_epoch()):
            trainer.step(*trainer.batch_at(order, t), loss_sum)

    benchmark.pedantic(loop, rounds=3, warmup_rounds=1)
    benchmark.extra_info["member_samples_per_s"] = len(trainer.members) * 60_000 / benchmark.stats.stats.median


def test_run_loop(benchmark, mnist, accelerator, tmp_path):
    """training_function for 3 epochs: its training throughput in epochs 2-3 (the rows' own
    samples_per_s, evaluation excluded; epoch 1 also pays first-touch allocations, as the
    bare loop's warm-up round does) and the wall-clock rate counting evaluation and results."""
    rates, walls = [], []
    runs = iter(range(10**6))
    epochs = 3

    def run():
        out = tmp_path / f"r{next(runs)}"
        t0 = time.perf_counter()
        training_function(make_config(epochs=epochs), out, Setup(accelerator=accelerator, splits=mnist), quiet=False)
        walls.append(time.perf_counter() - t0)
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        rates.extend(r["samples_per_s"] for r in rows if r["epoch"] > 1 and r["seed"] == 0 and r["variant"] == "bn")

    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    members = 10
    benchmark.extra_info["member_samples_per_s"] = sorted(rates)[len(rates) // 2]
    benchmark.extra_info["wall_member_samples_per_s"] = members * epochs * 60_000 / sorted(walls)[len(walls) // 2]


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_data_preparation(benchmark, tmp_path, monkeypatch, cache):
    from bnbench.train import data

    from conftest import data_root

    rounds = iter(range(10**6))

    def load():
        if cache == "cold":  # a fresh, empty cache every round: gunzip, verify md5, parse
            monkeypatch.setenv("BNBENCH_CACHE", str(tmp_path / f"c{next(rounds)}"))
        return data.load("mnist", data_root(), device="cpu")

    if cache == "warm":
        monkeypatch.setenv("BNBENCH_CACHE", str(tmp_path / "warm"))
        load()
    benchmark.pedantic(load, rounds=5, warmup_rounds=0)


def test_matmul_rate(benchmark):
    x = torch.rand(2048, 2048)
    benchmark.pedantic(lambda: x @ x, rounds=10, warmup_rounds=2)
    benchmark.extra_info["gflop_per_s"] = 2 * 2048**3 / benchmark.stats.stats.median / 1e9
