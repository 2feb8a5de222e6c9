"""Layout: how W processes share one run, as a mesh of seed groups x data-parallel groups.

    W = seed_groups x dp         rank r: seed group r // dp, position r % dp inside it

Seed groups never communicate: each trains its own share of the run's members (variant x
seed), so W groups train W times the members in about the time of one, and a member's
numbers do not depend on which group trains it. Inside a group, dp processes train the
group's members together on slices of each global batch (DDP), with --sync-bn
normalising over the group's global batch. Ranks of one data-parallel group are
consecutive, so on many machines a group stays on one machine where it can.

Torch-free: the main job checks a layout before it starts any process, sweeps use it for
unit ids, and every rank derives the same layout from the same config and W.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TRAIN_SAMPLES, Config, ConfigError


@dataclass(frozen=True)
class Layout:
    world: int  # processes of the launch
    dp: int  # processes per data-parallel group
    members: int  # variant x seed members of the run

    @property
    def seed_groups(self) -> int:
        return self.world // self.dp

    def sizes(self) -> list[int]:
        """Members per seed group: as even as they go, larger shares first (10 on 8: 2,2,1,1,1,1,1,1)."""
        q, r = divmod(self.members, self.seed_groups)
        return [q + 1] * r + [q] * (self.seed_groups - r)

    def share(self, group: int) -> slice:
        """Positions, in the run's member order (variant-major), of the members `group` trains."""
        sizes = self.sizes()
        start = sum(sizes[:group])
        return slice(start, start + sizes[group])

    def group_of_rank(self, rank: int) -> int:
        return rank // self.dp

    def dp_rank(self, rank: int) -> int:
        return rank % self.dp

    def line(self) -> str:
        """What a person reads: `8 processes: 8 seed groups x dp 1 (members per group 2,2,1,1,1,1,1,1)`."""
        procs = f"{self.world} process{'es' if self.world > 1 else ''}"
        groups = f"{self.seed_groups} seed group{'s' if self.seed_groups > 1 else ''}"
        sizes = self.sizes()
        share = f"{sizes[0]} member{'s' if sizes[0] > 1 else ''} each" if len(set(sizes)) == 1 else f"members per group {','.join(map(str, sizes))}"
        return f"{procs}: {groups} x dp {self.dp} ({share})"


SYNC_BN_DP1 = ("--sync-bn with dp 1: each process holds its members' whole batch, so BN already normalises over "
               "the global batch; give --dp N to spread a batch over N processes")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits(cfg: Config, dp: int) -> bool:
    return cfg.per_device_batch is not None or cfg.batch_size % dp == 0


def choose_layout(cfg: Config, world: int) -> Layout:
    """The layout of `cfg` on `world` processes: cfg.dp if given, else the fewest processes per
    data-parallel group that fit (seed groups first: they never communicate, while DDP of these
    small models measured slower than one process, reports/ddp/scaling.csv). Errors say what fits."""
    members = len(cfg.variants) * len(cfg.seeds)
    what = (f"{members} member{'s' if members > 1 else ''} ({len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''} x "
            f"{len(cfg.variants)} variant{'s' if len(cfg.variants) > 1 else ''})")
    if cfg.dp is not None:
        if world % cfg.dp:
            raise ConfigError(f"--dp {cfg.dp} does not divide the {world} processes (processes = seed groups x dp); "
                              f"use one of: {', '.join(map(str, _divisors(world)))}")
        if world // cfg.dp > members:
            raise ConfigError(f"{world} processes with --dp {cfg.dp} make {world // cfg.dp} seed groups, more than the "
                              f"{what}: give at least {-(-world // cfg.dp // len(cfg.variants))} seeds, or a larger --dp")
        cfg.global_batch(cfg.dp)  # raises when the batch does not split over the group
        return Layout(world, cfg.dp, members)
    for dp in _divisors(world):
        if world // dp <= members and _splits(cfg, dp):
            return Layout(world, dp, members)
    fits = [f"--seeds 0-{-(-world // dp // len(cfg.variants)) - 1} ({world // dp} seed groups x dp {dp})"
            for dp in _divisors(world) if _splits(cfg, dp)][:2]
    raise ConfigError(f"no layout of {world} processes fits {what} with global batch {cfg.batch_size}: seed groups "
                      f"need a member each, and a data-parallel group must split the batch. Try "
                      f"{' or '.join(fits) if fits else '--per-device-batch'}, or fewer processes")


# Variants whose normalisation reads a batch's statistics: train/norms.py's BATCH_NORMS (dist may not import
# train; tests/test_faults3.py checks that the two agree).
BATCH_STATISTICS = ("bn", "brn")


def check_launch(cfg: Config, world: int, dp: int, train_samples: int = TRAIN_SAMPLES,
                 batch_statistics=BATCH_STATISTICS) -> None:
    """What a launch of `cfg` on `world` processes in data-parallel groups of `dp` can be refused for before
    any process starts: the checks the Trainer makes in every rank (train/engine.py, Trainer._check), with the
    same words, run by the launcher's pre-flight (main_job.py, cli.py) and by a sweep's plan (sweeps/plan.py);
    and the number of evaluations, counted before they are listed."""
    batch = cfg.global_batch(dp)
    if batch > train_samples:
        raise ConfigError(f"global batch {batch} exceeds the {train_samples} training samples")
    bn_batch = batch if cfg.sync_bn else batch // dp  # sync BN: statistics over the global batch
    if set(cfg.variants) & set(batch_statistics) and bn_batch < 2:
        raise ConfigError(f"BatchNorm needs at least 2 samples per batch; it would see {bn_batch}")
    if cfg.instrument and world > 1:
        raise ConfigError(f"--instrument measures in one process; this launch has {world}. "
                          "Launch it without --nproc / several processes.")
    cfg.eval_steps(dp, train_samples)  # raises where there would be too many to list
