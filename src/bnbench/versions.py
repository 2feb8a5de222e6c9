"""The lowest torch and Accelerate that bnbench runs on, and the one-line refusal below them.

These are the lowest versions a suite run has passed on (docs/layout.md says which run);
pyproject.toml states the same bounds (tests/test_structure.py keeps the two equal).
torch 2.11 is also a correctness bound: below it, the backward of torch.distributed's functional
all_reduce, which carries --sync-bn's gradients across processes, is silently dropped.
"""
from __future__ import annotations

import re

from .config import ConfigError

MINIMUM = {"torch": (2, 11), "accelerate": (1, 15)}
WHY = {
    "torch": "the sync-BN backward through torch.distributed's functional all_reduce needs it (below, its "
             "gradient is silently dropped), and the hand-written step calls ATen ops as 2.11 defines them",
    "accelerate": "the oldest Accelerate the suite has passed on",
}


def parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"unreadable version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check(found: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming the first package below its minimum (found: name -> version, for
    tests; default the installed ones)."""
    if found is None:
        import accelerate
        import torch

        found = {"torch": torch.__version__, "accelerate": accelerate.__version__}
    for name, least in MINIMUM.items():
        if parse(found[name]) < least:
            need = ".".join(map(str, least))
            raise ConfigError(f"bnbench needs {name} >= {need}, found {found[name]}: {WHY[name]}. "
                              f"Install a newer one (pip install '{name}>={need}').")
