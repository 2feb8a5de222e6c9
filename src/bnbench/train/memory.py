"""What a run's members will take in memory, checked against the device before anything is allocated.

An estimate from the config alone (torch-free arithmetic): a launch that cannot fit stops with one
line that says how to make it fit, instead of dying in the allocator (`--seeds 0-1000000` did).
"""
from __future__ import annotations

import math
import os

from ..config import Config, ConfigError

BASE_BYTES = 300 * 2**20  # what torch and Python hold apart from the members and data, not counting shared libraries
SHARE = 0.9  # of the memory the device has available: the rest is the OS's and other processes'


def member_bytes(cfg: Config, per_process_batch: int) -> int:
    """One member's share: parameters with their gradients and two Adam moments, a training step's
    activations (4 per unit: output, BN, activation, and each one's gradient ~ 6 buffers), and an
    evaluation chunk's forward activations, which dominate at the default --eval-batch 10,000."""
    widths = cfg.layer_sizes
    params = sum(a * b + b for a, b in zip(widths, widths[1:])) + 4 * sum(cfg.hidden)  # + BN's affine and buffers
    units = sum(widths[1:])
    floats = 4 * params + 6 * per_process_batch * units + 2 * cfg.eval_batch * units
    return floats * (8 if cfg.dtype == "float64" else 4)


def needed_bytes(cfg: Config, members: int, per_process_batch: int) -> int:
    from .data import DATASETS  # the files' shapes (imported here: data needs torch, this module does not)

    files = DATASETS[cfg.dataset].files
    pixels = sum(math.prod(files[role].shape) for role in ("train_x", "test_x"))
    data = pixels * (8 if cfg.dtype == "float64" else 4)
    return BASE_BYTES + data + members * member_bytes(cfg, per_process_batch)


def available_bytes(device) -> int | None:
    """Free memory of the device a process trains on (CUDA: free on the GPU; CPU: MemAvailable)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: Config, members: int, per_process_batch: int, device, processes_here: int = 1) -> None:
    """ConfigError unless `members` (the most any process of the launch holds) fit `processes_here`
    times in the device's available memory."""
    need = needed_bytes(cfg, members, per_process_batch) * processes_here
    have = available_bytes(device)
    if have is None or need <= SHARE * have:
        return
    each = member_bytes(cfg, per_process_batch)
    fit = max(0, int((SHARE * have / processes_here - needed_bytes(cfg, 0, per_process_batch)) // each))
    gib = 2**30
    raise ConfigError(
        f"{members:,} members per process{f' x {processes_here} processes' if processes_here > 1 else ''} need about "
        f"{need / gib:,.1f} GiB ({each / 2**20:,.1f} MiB per member, most of it an evaluation chunk of --eval-batch "
        f"{cfg.eval_batch:,}), more than {SHARE:.0%} of the {have / gib:,.1f} GiB available on {device}: about {fit:,} "
        f"fit. {_remedy(cfg, members, fit)}")


def _remedy(cfg: Config, members: int, fit: int) -> str:
    """What would help: fewer seeds only where there are several; below one member per variant, a
    smaller --eval-batch or fewer variants (or a smaller net)."""
    if len(cfg.seeds) > 1 and fit >= len(cfg.variants):
        return ("Use fewer seeds per launch (a sweep's seeds_per_unit), a smaller --eval-batch, or more processes "
                "(seed groups share the members out).")
    fewer = "fewer --variants, " if len(cfg.variants) > 1 else ""
    return (f"Even one seed's {len(cfg.variants)} member(s) do not fit: use a smaller --eval-batch, {fewer}or "
            f"narrower --hidden layers.")
