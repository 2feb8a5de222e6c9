"""Shared fixtures: real MNIST from ../shared (or BNBENCH_DATA_ROOT), a private cache, small subsets.

Tests that need something beyond the venv carry a marker per need (registered in pyproject.toml):
`needs_root` (mounts a small tmpfs, starts daemons), `needs_slurm` (Debian's slurmctld, slurmd,
slurm-client and munge: a one-node cluster), `needs_chromium` (Debian's headless chromium) and
`needs_fashion_mnist` (Debian's dataset-fashion-mnist in /usr/share/datasets/fashion-mnist).
`./launch.sh test` as root apt-installs the packages. Each need is checked once per session. Where
one is missing, the test is skipped with one line naming what provides it, except under CI (CI set
and not 0/false/no): there nothing is skipped and the test fails at setup with that same line.
BNBENCH_TEST_MISSING=chromium,root,... makes the named needs count as missing, so that this
behaviour itself can be tested (tests/test_needs.py) on a machine that has them.
"""
from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scancel", "scontrol")
AS_ROOT = "run ./launch.sh test as root, which installs"


def _not_on_path(*names: str, any_of: bool = False) -> str | None:
    gone = [n for n in names if shutil.which(n) is None]
    if not gone or (any_of and len(gone) < len(names)):
        return None
    return f"not on PATH: {', '.join(gone)}"


class Need(NamedTuple):
    what: str  # what the test needs, as the machine's package manager names it
    how: str  # how to get it
    absent: Callable[[], str | None]  # None where present, else what is absent


NEEDS = {
    "root": Need("root", "run ./launch.sh test as root, e.g. sudo ./launch.sh test (it mounts a tmpfs or starts daemons)",
                 lambda: None if os.geteuid() == 0 else f"running as uid {os.geteuid()}"),
    "slurm": Need("Debian's slurmctld, slurmd, slurm-client and munge",
                  f"apt-get install slurmctld slurmd slurm-client munge, or {AS_ROOT} them",
                  lambda: _not_on_path(*SLURM_PROGRAMS)),
    "chromium": Need("Debian's chromium", f"apt-get install chromium, or {AS_ROOT} it",
                     lambda: _not_on_path("chromium", "chromium-browser", any_of=True)),
    "fashion_mnist": Need("Debian's dataset-fashion-mnist", f"apt-get install dataset-fashion-mnist, or {AS_ROOT} it",
                          lambda: None if FASHION_MNIST.is_dir() else f"no {FASHION_MNIST}"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _hidden() -> set[str]:
    """The needs BNBENCH_TEST_MISSING makes count as missing (for tests/test_needs.py)."""
    return {n.strip() for n in os.environ.get("BNBENCH_TEST_MISSING", "").split(",") if n.strip()}


def pytest_configure(config):
    if unknown := _hidden() - NEEDS.keys():
        raise pytest.UsageError(f"BNBENCH_TEST_MISSING: unknown need {', '.join(sorted(unknown))}; valid: {', '.join(NEEDS)}")


@functools.cache
def missing_need(need: str) -> str | None:
    """None where the need is met, else the one line to skip (or, under CI, fail) with."""
    hidden = _hidden()
    n = NEEDS[need]
    absent = "hidden by BNBENCH_TEST_MISSING" if need in hidden else n.absent()
    return None if absent is None else f"needs {n.what} ({absent}): {n.how}"


def _missing(item) -> str | None:
    lines = [line for need in NEEDS if item.get_closest_marker(f"needs_{need}") and (line := missing_need(need))]
    return "; ".join(lines) or None


def pytest_collection_modifyitems(config, items):
    if in_ci():
        return  # never a silent skip in CI: pytest_runtest_setup fails these, with the same line
    for item in items:
        if (line := _missing(item)) is not None:
            item.add_marker(pytest.mark.skip(reason=line))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture (a cluster, a mount): one line, not a traceback from deep inside the test.
    if in_ci() and (line := _missing(item)) is not None:
        pytest.fail(f"{line} [CI is set: not skipped]", pytrace=False)


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
