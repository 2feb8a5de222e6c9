"""Configuration: presets as plain values, CLI overrides, validation.

One frozen dataclass describes a run. Everything that changes a result lives
here, so that a results row plus its config reproduces the numbers.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

VARIANTS = ("bn", "nobn")  # BatchNorm1d after each hidden Linear / the plain MLP
DATASETS = ("mnist", "fashion-mnist")
ENGINES = ("stacked", "reference")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "float64")

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
}
DEFAULT_PRESET = "seed"


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class Config:
    preset: str = DEFAULT_PRESET
    dataset: str = "mnist"
    hidden: tuple[int, ...] = (32, 32)
    activation: str = "relu"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    batch_size: int = 100
    epochs: int = 15
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: tuple[str, ...] = VARIANTS
    engine: str = "stacked"
    dtype: str = "float32"
    sync_bn: bool = False  # cross-process BN statistics (needs world size > 1 to matter)
    cpu: bool = False  # force the CPU even when a GPU is visible
    eval_batch: int = 10_000  # samples per evaluation chunk (memory only, not the result)

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["seeds"] = list(self.seeds)
        d["variants"] = list(self.variants)
        return d

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
    for name in ("batch_size", "epochs", "eval_batch"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and cfg.lr < float("inf")):
        raise ConfigError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if not (0.0 <= cfg.momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.momentum and cfg.optimizer != "sgd":
        raise ConfigError(f"momentum applies to --optimizer sgd only, not {cfg.optimizer}")
    if not cfg.hidden or any((not isinstance(h, int)) or h <= 0 for h in cfg.hidden):
        raise ConfigError(f"hidden must be one or more positive layer widths, got {cfg.hidden!r}")
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


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def make_config(preset: str = DEFAULT_PRESET, **overrides) -> Config:
    """A preset's values with the non-None overrides applied."""
    _one_of("preset", preset, tuple(PRESETS))
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return Config(preset=preset, **values)
