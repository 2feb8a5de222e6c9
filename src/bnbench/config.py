"""Configuration: one frozen dataclass, presets as plain values, validation.

Everything that changes a result is a field of Config, declared once with `setting(...)`:
its help text, kind and role live in the field's metadata, and from there come the
`bnbench run` options (cli.py), the keys a sweep file may set (sweep.py), the argv
that rebuilds a config (run_argv), the row columns that are settings (row_settings),
the report's configuration key (report.py) and the unit id. A new setting is one line
here plus its use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass

# What follows each hidden Linear (train/norms.py): BatchNorm1d, nothing, LayerNorm, GroupNorm,
# RMSNorm, Batch Renormalization. The lab's two come first, and stay the default.
VARIANTS = ("bn", "nobn", "ln", "gn", "rms", "brn")
DEFAULT_VARIANTS = ("bn", "nobn")
GN_CHANNELS_PER_GROUP = 8  # gn's default group count leaves at least this many channels per group
DATASETS = ("mnist", "fashion-mnist")
ENGINES = ("stacked", "reference")
STEP_IMPLS = ("fused", "autograd")  # train/step.py: the hand-written step or autograd, bitwise the same
ACTIVATIONS = ("relu", "sigmoid", "tanh")
OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "float64")

# Part of every unit's identity: bump it when a change to bnbench alters any number a
# run records (not for refactors), so that sweeps rerun what the change affects.
# 2 (2026-11-28): stacked parameters stored 64-byte aligned per member (models.ALIGN_BYTES), which
# changes the last bits of fused-optimizer updates of members that sat in a vector tail.
TRAINING_CODE_VERSION = 2
TRAIN_SAMPLES = 60_000  # MNIST and Fashion-MNIST alike: steps per epoch = this // global batch
# Bounds checked where a number is parsed, so that no value reaches an overflow or a huge allocation.
MAX_SEED = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; rows hold seeds in int64 columns
MAX_SEEDS = 2_000_000  # seeds of one config (a million members is already far beyond any device's memory)
MAX_EPOCHS = 1_000_000
MAX_EVALUATIONS = 100_000  # evaluation windows of one run: rows per member
MAX_TIMEOUT_S = 7 * 86_400  # --dist-timeout, [sweep] dist_timeout: a week

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


# -- one declaration per setting ----------------------------------------------------------
# Kinds: str, int, float, bool, and the lists ints, strs, floats, seeds ("0-4,7" on the command line).
TUPLE_KINDS = ("ints", "strs", "floats", "seeds")


def setting(default, help: str, kind: str, *, choices=None, check: str | None = None, column: str | bool = False,
            sweep: bool = True, identity: bool = True, later: bool = False, group: str | None = None,
            metavar: str | None = None):
    """A Config field with what every consumer needs to know about it.

    check: "positive" / "non_negative" (numbers); None allowed where the default is None.
    column: a row column of every result (True: described by `help`, a string: by that text).
    sweep: a sweep file may set it. identity: part of the unit id.
    later: added after the first release: enters the unit id only when it differs from its
    default, so that units that do not use it keep their ids and sweeps already done stay done.
    """
    meta = dict(help=help, kind=kind, choices=choices, check=check, column=help if column is True else column,
                sweep=sweep, identity=identity, later=later, group=group, metavar=metavar)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    preset: str = setting(DEFAULT_PRESET, "preset the config started from", "str", choices=tuple(PRESETS),
                          column=True, identity=False)  # its values are in the id, not its name
    dataset: str = setting("mnist", "mnist / fashion-mnist", "str", choices=DATASETS, column=True)
    hidden: tuple[int, ...] = setting((32, 32), "hidden widths, e.g. 32,32", "ints", column="hidden widths, e.g. '32,32'")
    activation: str = setting("relu", "relu / sigmoid / tanh", "str", choices=ACTIVATIONS, column=True)
    optimizer: str = setting("adam", "adam / sgd", "str", choices=OPTIMIZERS, column=True)
    lr: float = setting(1e-3, "learning rate", "float", check="positive", column=True)
    momentum: float = setting(0.0, "SGD momentum (0 for adam)", "float", column=True)
    batch_size: int | None = setting(100, "global mini-batch in samples, split over a data-parallel group", "int",
                                     check="positive",
                                     column="global mini-batch: samples per member per step over its dp processes")
    per_device_batch: int | None = setting(
        None, "instead: samples per process per step (global = this x dp)", "int", check="positive",
        column="samples per member per step in each process (batch_size / dp)")
    epochs: int = setting(15, "passes over the training set", "int", check="positive",
                          column="epochs configured for the run")
    seeds: tuple[int, ...] = setting((0, 1, 2, 3, 4), "init and data-order seeds, e.g. 0,3,7 or 0-9", "seeds")
    variants: tuple[str, ...] = setting(DEFAULT_VARIANTS, "comma list of: bn (BatchNorm1d), nobn (none), ln "
                                        "(LayerNorm), gn (GroupNorm), rms (RMSNorm), brn (Batch Renormalization)",
                                        "strs", choices=VARIANTS)
    engine: str = setting("stacked", "stacked (all members in batched matmuls) / reference (one nn.Sequential each)",
                          "str", choices=ENGINES, column=True)
    step_impl: str = setting("fused", "how a stacked step is computed: fused (hand-written backward, Adam's kernel "
                             "called directly, each where it applies and after its self-check) / autograd; "
                             "bitwise the same numbers", "str", choices=STEP_IMPLS, identity=False, later=True)
    dtype: str = setting("float32", "float32 / float64", "str", choices=DTYPES, column=True)
    sync_bn: bool = setting(False, "BN training statistics over the global batch across processes (--sync-bn)",
                            "bool", column=True)
    dp: int | None = setting(None, "processes per data-parallel group (DDP); processes / dp seed groups train shares "
                             "of the members apart (default: as many seed groups as fit)", "int", check="positive",
                             column="processes that train each member together (DDP); world_size / dp seed groups",
                             identity=False, metavar="N")  # the resolved dp enters unit_id
    cpu: bool = setting(False, "train on the CPU even when a GPU is visible", "bool",
                        sweep=False, identity=False)  # sweeps say `device`; the device kind is in the id
    compile: bool = setting(False, "units stepped through torch.compile (--compile); compile time is in meta.json",
                            "bool", column=True)
    tf32: bool = setting(False, "TF32 matmuls allowed on the GPU (--tf32); off by default, for comparability",
                         "bool", column=True)
    cost_probe: bool = setting(True, "before training, time each variant alone as one stack of the run's shape for a "
                               "few steps (rows: variant_samples_per_s; off: null); training is bitwise unchanged",
                               "bool", identity=False, later=True)
    eval_batch: int = setting(10_000, "samples per evaluation chunk: memory, and how the evaluation's float32 "
                              "matmuls round (losses can differ in the last digits, ~1e-8 relative)", "int",
                              check="positive")
    repeat: int = setting(0, "index of a repeated launch of the same config (0 unless a sweep sets repeats)", "int",
                          check="non_negative", column=True, sweep=False)  # sweeps say [sweep] repeats
    bn_drop_bias: bool = setting(False, "BN members' hidden Linears have no bias; BN's shift replaces it "
                                 "(--bn-drop-bias)", "bool", column=True, later=True)
    eval_every: int | None = setting(None, "steps per evaluation window (null: once per epoch)", "int",
                                     check="positive", column=True, later=True, metavar="STEPS")
    # The normalizations' own settings (train/norms.py says where each default comes from).
    gn_groups: int | None = setting(None, "GroupNorm's groups for gn members (default: the most that leave at least 8 "
                                    "channels per group in every hidden layer: 4 for 32 units)", "int", check="positive",
                                    column=True, later=True, metavar="G")
    brn_r_max: float = setting(3.0, "Batch Renormalization's largest r once relaxed (Ioffe 2017: 3)", "float",
                               column=True, later=True)
    brn_d_max: float = setting(5.0, "Batch Renormalization's largest |d| once relaxed (Ioffe 2017: 5)", "float",
                               column=True, later=True)
    brn_warmup: int = setting(5000, "steps of plain BN (r_max 1, d_max 0) before brn relaxes (Ioffe 2017: 5,000)",
                              "int", check="non_negative", column=True, later=True, metavar="STEPS")
    brn_r_full: int = setting(40_000, "step at which brn reaches brn_r_max, linearly from the warm-up's end "
                              "(Ioffe 2017: 40,000)", "int", check="positive", column=True, later=True, metavar="STEP")
    brn_d_full: int = setting(25_000, "step at which brn reaches brn_d_max (Ioffe 2017: 25,000)", "int",
                              check="positive", column=True, later=True, metavar="STEP")
    # Instruments (instruments.py): measured on the side, training itself is bitwise unchanged.
    instrument: bool = setting(False, "record per-layer gradient norms, pre-activation percentiles and ICS measures",
                               "bool", later=True, group="instruments")
    instrument_every: int = setting(100, "steps between gradient-norm and percentile records", "int",
                                    check="positive", later=True, group="instruments", metavar="N")
    ics_every: int = setting(1000, "steps between Santurkar et al. ICS and gradient-predictiveness measures", "int",
                             check="positive", later=True, group="instruments", metavar="M")
    ics_etas: tuple[float, ...] = setting((0.05, 0.1, 0.2, 0.4), "step sizes along the gradient for predictiveness",
                                          "floats", later=True, group="instruments", metavar="ETAS")

    def __post_init__(self):
        # One spelling per value, so that equal configs hash equal (lr 1 is lr 1.0; lists are tuples).
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if kind in TUPLE_KINDS and isinstance(value, list):
                value = tuple(value)
            if kind == "floats" and isinstance(value, tuple):
                value = tuple(_as_float(v) for v in value)
            elif kind == "float":
                value = _as_float(value)
            object.__setattr__(self, f.name, value)
        validate(self)

    def gn_groups_for(self) -> int:
        """gn's group count: the setting, or the most groups that divide every hidden width and leave
        at least GN_CHANNELS_PER_GROUP channels each (1, LayerNorm's grouping, when no width has 8).
        Wu & He (2018) use 32 groups of a conv layer's many channels; an MLP's few units are better
        served by a sensible group size than by a group count."""
        if self.gn_groups is not None:
            return self.gn_groups
        g = math.gcd(*self.hidden)
        return max([d for d in range(1, g + 1) if g % d == 0 and g // d >= GN_CHANNELS_PER_GROUP] or [1])

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    def unit_id(self, world_size: int, device_kind: str, torch_version: str, dp: int | None = None) -> str:
        """The identity of one launch of this config: equal ids give equal results.

        Everything that changes a number is in it; the preset's name is not (its
        values are), nor is `cpu` (the device kind is). Stable across processes and
        machines: sweeps use it to skip what is done. dp: the layout's resolved
        data-parallel size; a launch that is one DDP group (dp = world size, all that
        existed before seed groups) keeps the id it always had.
        """
        values = self.to_dict()
        fields = {f.name: values[f.name] for f in dataclasses.fields(self) if f.metadata["identity"]
                  and not (f.metadata["later"] and getattr(self, f.name) == f.default)}
        ident = {"config": fields, "world_size": world_size, "device": device_kind,
                 "torch": torch_version, "training_code": TRAINING_CODE_VERSION}
        if dp is not None and dp != world_size:
            ident["dp"] = dp
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def global_batch(self, dp: int) -> int:
        """Samples per member per step over the dp processes of a data-parallel group; an error
        if they cannot split evenly."""
        if self.per_device_batch is not None:
            return self.per_device_batch * dp
        if self.batch_size % dp:
            raise ConfigError(
                f"global batch {self.batch_size} does not split over {dp} data-parallel processes; "
                f"use a multiple of {dp}, a --dp that divides it, or --per-device-batch"
            )
        return self.batch_size

    def eval_steps(self, dp: int, train_samples: int = TRAIN_SAMPLES) -> list[int]:
        """The steps after which a run evaluates and writes rows: every epoch's end, or every
        eval_every steps and the last step."""
        per_epoch = train_samples // self.global_batch(dp)
        if per_epoch == 0:
            return []  # a batch larger than the data: the Trainer refuses it, naming both
        total = self.epochs * per_epoch
        every = self.eval_every or per_epoch
        count = -(-total // every)  # counted before the list is made
        if count > MAX_EVALUATIONS:
            raise ConfigError(f"{self.epochs:,} epochs of {per_epoch:,} steps evaluated every {every:,} steps make "
                              f"{count:,} evaluations, more than {MAX_EVALUATIONS:,}: fewer --epochs or a larger "
                              f"--eval-every")
        return sorted({*range(every, total + 1, every), total})

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (784, *self.hidden, 10)


def _as_float(value):
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# -- what the other modules derive from the declarations ------------------------------
def settings(cls=Config) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def flag(name: str) -> str:
    """The command-line option of a setting: eval_every -> --eval-every."""
    return "--" + name.replace("_", "-")


def sweep_kinds(cls=Config) -> dict[str, str]:
    """Setting -> kind, for every setting a sweep file may set."""
    return {f.name: f.metadata["kind"] for f in settings(cls) if f.metadata["sweep"]}


def row_settings(cls=Config) -> dict[str, str]:
    """Setting -> description, for the settings that are columns of every results row."""
    return {f.name: f.metadata["column"] for f in settings(cls) if f.metadata["column"]}


def row_values(cfg: Config) -> dict:
    """The row columns that are settings, as rows hold them (lists as 'a,b' strings)."""
    return {name: ",".join(map(str, v)) if isinstance(v := getattr(cfg, name), tuple) else v
            for name in row_settings(type(cfg))}


def run_argv(cfg: Config) -> list[str]:
    """`bnbench run` options that rebuild cfg exactly (a test round-trips them)."""
    argv = []
    for f in settings(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue  # the default: batch_size gives way to per_device_batch, eval_every once per epoch
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif isinstance(value, tuple):
            argv += [flag(f.name), ",".join(map(repr if f.metadata["kind"] == "floats" else str, value))]
        else:
            argv += [flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return argv


def _one_of(name: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: Config) -> None:
    # What the declarations say: choices and signs.
    for f in settings(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if value is None and "None" in str(f.type):
            continue  # an optional setting left out (batch_size gives way to per_device_batch)
        if m["choices"] is not None:
            if m["kind"] == "strs":
                if not value:
                    raise ConfigError(f"no {f.name} given; valid: {', '.join(m['choices'])}")
                for v in value:
                    _one_of(f.name.rstrip("s"), v, m["choices"])
                if len(set(value)) != len(value):
                    raise ConfigError(f"{f.name.rstrip('s')} listed twice in {','.join(value)}")
            else:
                _one_of(f.name, value, m["choices"])
        if m["kind"] == "int" and m["check"]:
            low = 1 if m["check"] == "positive" else 0
            if not _is_int(value) or value < low:
                raise ConfigError(f"{f.name} must be a {m['check'].replace('_', '-')} integer, got {value!r}")
    # What relates settings to each other, or needs more than a sign.
    if (cfg.batch_size is None) == (cfg.per_device_batch is None):
        raise ConfigError("give the global --batch-size or --per-device-batch, not both")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and cfg.lr < float("inf")):
        raise ConfigError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if not (0.0 <= cfg.momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.momentum and cfg.optimizer != "sgd":
        raise ConfigError(f"momentum applies to --optimizer sgd only, not {cfg.optimizer}")
    if not cfg.hidden or any((not _is_int(h)) or h <= 0 for h in cfg.hidden):
        raise ConfigError(f"hidden must be one or more positive layer widths, got {cfg.hidden!r}")
    if not cfg.ics_etas or not all(isinstance(e, float) and 0 < e < float("inf") for e in cfg.ics_etas):
        raise ConfigError(f"ics_etas must be one or more positive finite step sizes, got {cfg.ics_etas!r}")
    if cfg.epochs > MAX_EPOCHS:
        raise ConfigError(f"epochs must be at most {MAX_EPOCHS:,}, got {cfg.epochs:,}")
    if not cfg.seeds:
        raise ConfigError("no seeds given")
    if len(cfg.seeds) > MAX_SEEDS:
        raise ConfigError(f"{len(cfg.seeds):,} seeds, more than the {MAX_SEEDS:,} one config may hold")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seed listed twice in {_short(cfg.seeds)}")
    if any(s < 0 or s > MAX_SEED for s in cfg.seeds):
        raise ConfigError(f"seeds must be in 0 .. {MAX_SEED} (2^63 - 1: torch.manual_seed's range as rows hold it), "
                          f"got {_short(cfg.seeds)}")
    _validate_norms(cfg)


def _validate_norms(cfg: Config) -> None:
    """The normalizations' settings, checked before any work (train/norms.py)."""
    if "gn" in cfg.variants:
        g, common = cfg.gn_groups_for(), math.gcd(*cfg.hidden)
        if any(w // g < 2 for w in cfg.hidden):  # one channel a group: its mean is itself, the output its shift
            raise ConfigError(f"gn_groups {g} leaves a group of one channel in hidden width {min(cfg.hidden)}: GroupNorm "
                              "would output its shift alone; use at most half the smallest width")
        bad = [w for w in cfg.hidden if w % g]
        if bad:
            fits = [d for d in range(1, common + 1) if common % d == 0]
            raise ConfigError(f"gn_groups {g} does not divide hidden width {bad[0]} (hidden "
                              f"{','.join(map(str, cfg.hidden))}); groups that divide every width: "
                              f"{', '.join(map(str, fits))}")
    if "brn" in cfg.variants:
        if not (isinstance(cfg.brn_r_max, float) and 1.0 <= cfg.brn_r_max < float("inf")):
            raise ConfigError(f"brn_r_max must be a finite number >= 1 (1: r is always 1), got {cfg.brn_r_max!r}")
        if not (isinstance(cfg.brn_d_max, float) and 0.0 <= cfg.brn_d_max < float("inf")):
            raise ConfigError(f"brn_d_max must be a finite number >= 0 (0: d is always 0), got {cfg.brn_d_max!r}")
        for name in ("brn_r_full", "brn_d_full"):
            if getattr(cfg, name) < cfg.brn_warmup:
                raise ConfigError(f"{name} ({getattr(cfg, name)}) comes before the end of brn_warmup "
                                  f"({cfg.brn_warmup}): the limits relax after the warm-up")
    per_sample = [v for v in cfg.variants if v in ("ln", "gn", "rms")]
    if cfg.sync_bn and per_sample and not {"bn", "brn"} & set(cfg.variants):
        raise ConfigError(f"--sync-bn synchronises batch statistics, and {','.join(per_sample)} have none (they "
                          "normalize each sample alone); add bn or brn to --variants, or drop --sync-bn")
    if cfg.instrument and not set(cfg.variants) <= {"bn", "nobn"}:
        other = [v for v in cfg.variants if v not in ("bn", "nobn")]
        raise ConfigError(f"--instrument measures bn and nobn members; {','.join(other)} cannot be instrumented yet")


def _short(values: tuple) -> str:
    """A tuple as an error line shows it: the first few values of a long one."""
    return str(values) if len(values) <= 8 else f"({', '.join(map(str, values[:8]))}, ... {len(values):,} in all)"


# -- parsing the command line's spellings ---------------------------------------------
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,3,7' -> (0, 3, 7); '0-9' -> (0, ..., 9); '0-2,7' -> (0, 1, 2, 7)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        if not part.strip():
            raise ConfigError(f"malformed --seeds {text!r}: empty item; use e.g. 0,3,7 or 0-9")
        m = _RANGE.match(part)
        if m:
            lo, hi = _seed_int(text, m.group(1)), _seed_int(text, m.group(2))
            if hi < lo:
                raise ConfigError(f"malformed --seeds {text!r}: range {part.strip()} runs backwards")
            _seed_bounds(text, hi, len(seeds) + hi - lo + 1)  # before the range is made
            seeds.extend(range(lo, hi + 1))
        elif part.strip().isdigit():
            _seed_bounds(text, _seed_int(text, part), len(seeds) + 1)
            seeds.append(int(part))
        else:
            raise ConfigError(
                f"malformed --seeds {text!r}: {part.strip()!r} is not a non-negative integer or range a-b"
            )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"malformed --seeds {text!r}: a seed is listed twice")
    return tuple(seeds)


def _seed_int(text: str, digits: str) -> int:
    digits = digits.strip()
    if len(digits) > 25:  # int() of thousands of digits is refused, or slow
        raise ConfigError(f"--seeds {_clip(text)}: a seed of {len(digits):,} digits is above {MAX_SEED} (2^63 - 1: "
                          f"torch.manual_seed's range as rows hold it)")
    return int(digits)


def _seed_bounds(text: str, largest: int, count: int) -> None:
    if largest > MAX_SEED:
        raise ConfigError(f"--seeds {_clip(text)}: seed {largest} is above {MAX_SEED} (2^63 - 1: torch.manual_seed's "
                          f"range as rows hold it)")
    if count > MAX_SEEDS:
        raise ConfigError(f"--seeds {_clip(text)}: {count:,} seeds, more than the {MAX_SEEDS:,} one config may hold")


def _clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= 60 else text[:57] + "..."


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


def make_config(preset: str = DEFAULT_PRESET, cls=Config, **overrides) -> Config:
    """A preset's values with the non-None overrides applied."""
    _one_of("preset", preset, tuple(PRESETS))
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("per_device_batch") is not None:
        if overrides.get("batch_size") is not None:
            raise ConfigError("give the global --batch-size or --per-device-batch, not both")
        values["batch_size"] = None  # the preset's global batch gives way to the per-process one
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return cls(preset=preset, **values)
