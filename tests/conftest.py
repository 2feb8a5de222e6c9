"""Shared fixtures: real MNIST from ../shared (or BNBENCH_DATA_ROOT), a private cache, small subsets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def mnist_root() -> Path:
    env = os.environ.get("BNBENCH_DATA_ROOT")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not (root / "MNIST" / "raw").is_dir() and not any(root.glob("train-images-idx3-ubyte*")):
        # Loud, not skipped: CI always has ../shared beside the checkout.
        pytest.fail(f"MNIST not found under {root}: set BNBENCH_DATA_ROOT to a folder holding MNIST/raw/")
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return mnist_root()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Each test its own empty cache, never the user's: no test sees another's downloads.
    monkeypatch.setenv("BNBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def mnist_cpu(tmp_path_factory):
    """Full MNIST on the CPU as float64 and float32 Splits (loaded once for the session)."""
    from bnbench.train import data

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNBENCH_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        return {
            "float32": data.load("mnist", mnist_root(), device="cpu", dtype=torch.float32),
            "float64": data.load("mnist", mnist_root(), device="cpu", dtype=torch.float64),
        }


def subset(splits, n_train: int, n_test: int):
    from bnbench.train.data import Splits

    return Splits(splits.train_x[:n_train], splits.train_y[:n_train], splits.test_x[:n_test], splits.test_y[:n_test], splits.sources)


def make_setup(accelerator, splits=None, data_root=None, on_trainer=None):
    """The run's Setup with the session's accelerator and data; on_trainer(trainer) sees or perturbs
    the members before training."""
    from bnbench.training import Setup

    class TestSetup(Setup):
        def trainer(self, *args):
            trainer = super().trainer(*args)
            if on_trainer is not None:
                on_trainer(trainer)
            return trainer

    return TestSetup(data_root=data_root, accelerator=accelerator, splits=splits)


@pytest.fixture(scope="session")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MB filesystem (tmpfs, mounted as root) to fill up; None where mounting is not allowed,
    and the test then injects the same OSError where the write happens, and says so."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield mnt if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(folder: Path) -> Path:
    """Take every free byte of folder's filesystem; returns the filler (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
