"""Benchmarks (pytest-benchmark): `./launch.sh bench`. Timing lives here, never in tests/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist():
    from bnbench import data

    root = os.environ.get("BNBENCH_DATA_ROOT") or REPO.parent / "shared" / "data"
    return data.load("mnist", root, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)
