"""Configuration: presets as plain values, CLI overrides, validation.

One frozen dataclass describes a run. Everything that changes a result lives
here, so that a results row plus its config reproduces the numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass

VARIANTS = ("bn", "nobn")  # BatchNorm1d after each hidden Linear / the plain MLP
DATASETS = ("mnist", "fashion-mnist")
ENGINES = ("stacked", "reference")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "float64")

# Part of every unit's identity: bump it when a change to bnbench alters any number a
# run records (not for refactors), so that sweeps rerun what the change affects.
TRAINING_CODE_VERSION = 1
# Fields added after the first release enter a unit's id only when they differ from their
# defaults: a unit that does not use them keeps its id, and sweeps already done stay done.
LATER_FIELDS = ("bn_drop_bias", "eval_every", "instrument", "instrument_every", "ics_every", "ics_etas")
TRAIN_SAMPLES = 60_000  # MNIST and Fashion-MNIST alike: steps per epoch = this // global batch

# Presets are plain dicts of Config fields; the CLI overrides any of them.
PRESETS: dict[str, dict] = {
    # Lab 9-4 exactly: 784-32-32-10 ReLU MLP, Adam lr 1e-3, batch 100, 15 epochs.
    "seed": dict(
        dataset="mnist",
        hidden=(32, 32),  # units per hidden layer
        activation="relu",
        optimizer="adam",
        lr=1e-3,  # learning rate
        momentum=0.0,  # SGD only
        batch_size=100,  # global mini-batch, samples
        epochs=15,  # full passes over the 60,000 training images
        seeds=(0, 1, 2, 3, 4),
    ),
    # Ioffe & Szegedy (2015), section 4.1, Figure 1: 3 hidden layers of 100 sigmoid units, BN
    # before each nonlinearity with the Linear bias dropped (BN's shift beta replaces it), batch 60,
    # 50,000 steps. The paper does not name its optimizer: plain SGD at lr 1.0, the best rate for the
    # no-BN net (tied with 2.0) in reports/lr_scan.toml, so that BN's lead is not bought
    # with a starved baseline. At 0.05 the no-BN net is still at chance after 5,000 steps.
    "ioffe2015": dict(
        dataset="mnist",
        hidden=(100, 100, 100),
        activation="sigmoid",
        bn_drop_bias=True,
        optimizer="sgd",
        lr=1.0,
        momentum=0.0,
        batch_size=60,
        epochs=50,  # x 1,000 steps of 60 = 50,000 steps
        eval_every=500,  # steps per evaluation window: 100 points on the accuracy curve
        seeds=(0, 1, 2, 3, 4),
    ),
}
# Gradients vanishing with depth: 10 sigmoid layers of 100, otherwise as ioffe2015, 10,000 steps.
PRESETS["deep"] = {**PRESETS["ioffe2015"], "hidden": (100,) * 10, "epochs": 10}
DEFAULT_PRESET = "seed"


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong and what is accepted."""


# -- the launcher's environment (torch-free, so that `bnbench --help` stays instant) --
class LaunchError(RuntimeError):
    """The processes of a launch could not form or keep their group."""


class FolderBusy(RuntimeError):
    """A results folder is held by another sweep."""


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch, mpirun) set it; 0 alone."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def launched_world() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


SWEEP_CHILD_ENV = "BNBENCH_SWEEP_CHILD"  # set by a sweep in the processes of its units


def die_with_parent(signum: int, expected_parent: int | None = None) -> None:
    """Linux: have the kernel send `signum` to this process when its parent dies, even by SIGKILL.

    A sweep killed with -9 must not leave its units' processes running and writing.
    A no-op elsewhere. expected_parent: exit at once if the parent is already gone.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid() if expected_parent is None else expected_parent
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took hold
        os.kill(os.getpid(), signum)


@dataclass(frozen=True)
class Config:
    preset: str = DEFAULT_PRESET
    dataset: str = "mnist"
    hidden: tuple[int, ...] = (32, 32)
    activation: str = "relu"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    batch_size: int | None = 100  # global mini-batch, samples, at any world size
    per_device_batch: int | None = None  # instead: samples per process (global = this x world size)
    epochs: int = 15
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: tuple[str, ...] = VARIANTS
    engine: str = "stacked"
    dtype: str = "float32"
    sync_bn: bool = False  # BN statistics over the global batch, across processes
    cpu: bool = False  # force the CPU even when a GPU is visible
    compile: bool = False  # torch.compile each unit's forward+loss (changes rounding, not the maths)
    tf32: bool = False  # TF32 matmuls on Ampere+ GPUs: faster, ~1e-3 relative error; off for comparability
    eval_batch: int = 10_000  # samples per evaluation chunk (memory only, not the result)
    repeat: int = 0  # index of a repeated launch of this config: identity only (throughput spread)
    bn_drop_bias: bool = False  # BN members' hidden Linears have no bias: BN's shift replaces it
    eval_every: int | None = None  # steps per evaluation window; None: once per epoch
    # Instruments (instruments.py): measured on the side, training itself is bitwise unchanged.
    instrument: bool = False  # record gradient norms, pre-activation percentiles, ICS measures
    instrument_every: int = 100  # steps between gradient-norm and percentile records
    ics_every: int = 1000  # steps between the (costlier) Santurkar et al. measures
    ics_etas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # step sizes along -gradient for predictiveness

    def __post_init__(self):
        # One spelling per value, so that equal configs hash equal (lr 1 is lr 1.0; lists are tuples).
        for name in ("hidden", "seeds", "variants", "ics_etas"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "ics_etas", tuple(
            float(e) if isinstance(e, int) and not isinstance(e, bool) else e for e in self.ics_etas))
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        validate(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["seeds"] = list(self.seeds)
        d["variants"] = list(self.variants)
        d["ics_etas"] = list(self.ics_etas)
        return d

    def unit_id(self, world_size: int, device_kind: str, torch_version: str) -> str:
        """The identity of one launch of this config: equal ids give equal results.

        Everything that changes a number is in it; the preset's name is not (its
        values are), nor is `cpu` (the device kind is). Stable across processes and
        machines: sweeps use it to skip what is done.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        fields = {k: v for k, v in self.to_dict().items() if k not in ("preset", "cpu")
                  and not (k in LATER_FIELDS and getattr(self, k) == defaults[k])}
        ident = {"config": fields, "world_size": world_size, "device": device_kind,
                 "torch": torch_version, "training_code": TRAINING_CODE_VERSION}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def global_batch(self, world_size: int) -> int:
        """Samples per member per step over all processes; an error if they cannot split evenly."""
        if self.per_device_batch is not None:
            return self.per_device_batch * world_size
        if self.batch_size % world_size:
            raise ConfigError(
                f"global batch {self.batch_size} does not split over {world_size} processes; "
                f"use a multiple of {world_size}, or --per-device-batch"
            )
        return self.batch_size

    def eval_steps(self, world_size: int, train_samples: int = TRAIN_SAMPLES) -> list[int]:
        """The steps after which a run evaluates and writes rows: every epoch's end, or every
        eval_every steps and the last step."""
        per_epoch = train_samples // self.global_batch(world_size)
        if per_epoch == 0:
            return []  # a batch larger than the data: the Trainer refuses it, naming both
        total = self.epochs * per_epoch
        every = self.eval_every or per_epoch
        return sorted({*range(every, total + 1, every), total})

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (784, *self.hidden, 10)


def _one_of(name: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def validate(cfg: Config) -> None:
    _one_of("preset", cfg.preset, tuple(PRESETS))
    _one_of("dataset", cfg.dataset, DATASETS)
    _one_of("engine", cfg.engine, ENGINES)
    _one_of("activation", cfg.activation, ACTIVATIONS)
    _one_of("optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of("dtype", cfg.dtype, DTYPES)
    if not cfg.variants:
        raise ConfigError("no variants given; valid: " + ", ".join(VARIANTS))
    for v in cfg.variants:
        _one_of("variant", v, VARIANTS)
    if len(set(cfg.variants)) != len(cfg.variants):
        raise ConfigError(f"variant listed twice in {','.join(cfg.variants)}")
    if (cfg.batch_size is None) == (cfg.per_device_batch is None):
        raise ConfigError("give the global --batch-size or --per-device-batch, not both")
    for name in ("batch_size", "per_device_batch", "epochs", "eval_batch", "eval_every", "instrument_every", "ics_every"):
        value = getattr(cfg, name)
        if value is None and name in ("batch_size", "per_device_batch", "eval_every"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(cfg.repeat, bool) or not isinstance(cfg.repeat, int) or cfg.repeat < 0:
        raise ConfigError(f"repeat must be a non-negative integer, got {cfg.repeat!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and cfg.lr < float("inf")):
        raise ConfigError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if not (0.0 <= cfg.momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.momentum and cfg.optimizer != "sgd":
        raise ConfigError(f"momentum applies to --optimizer sgd only, not {cfg.optimizer}")
    if not cfg.hidden or any((not isinstance(h, int)) or h <= 0 for h in cfg.hidden):
        raise ConfigError(f"hidden must be one or more positive layer widths, got {cfg.hidden!r}")
    if not cfg.ics_etas or not all(isinstance(e, float) and 0 < e < float("inf") for e in cfg.ics_etas):
        raise ConfigError(f"ics_etas must be one or more positive finite step sizes, got {cfg.ics_etas!r}")
    if not cfg.seeds:
        raise ConfigError("no seeds given")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seed listed twice in {cfg.seeds}")
    if any(s < 0 for s in cfg.seeds):
        raise ConfigError(f"seeds must be non-negative, got {cfg.seeds}")


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,3,7' -> (0, 3, 7); '0-9' -> (0, ..., 9); '0-2,7' -> (0, 1, 2, 7)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        if not part.strip():
            raise ConfigError(f"malformed --seeds {text!r}: empty item; use e.g. 0,3,7 or 0-9")
        m = _RANGE.match(part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ConfigError(f"malformed --seeds {text!r}: range {part.strip()} runs backwards")
            seeds.extend(range(lo, hi + 1))
        elif part.strip().isdigit():
            seeds.append(int(part))
        else:
            raise ConfigError(
                f"malformed --seeds {text!r}: {part.strip()!r} is not a non-negative integer or range a-b"
            )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"malformed --seeds {text!r}: a seed is listed twice")
    return tuple(seeds)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in str(text).split(","))
    except ValueError:
        raise ConfigError(f"malformed {what} {text!r}: expected comma-separated integers, e.g. 32,32") from None
    return values


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in str(text).split(","))
    except ValueError:
        raise ConfigError(f"malformed {what} {text!r}: expected comma-separated numbers, e.g. 0.05,0.1") from None


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def make_config(preset: str = DEFAULT_PRESET, **overrides) -> Config:
    """A preset's values with the non-None overrides applied."""
    _one_of("preset", preset, tuple(PRESETS))
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("per_device_batch") is not None:
        if overrides.get("batch_size") is not None:
            raise ConfigError("give the global --batch-size or --per-device-batch, not both")
        values["batch_size"] = None  # the preset's global batch gives way to the per-process one
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return Config(preset=preset, **values)
