"""Sweep files: a TOML grid -> the units of a sweep, each with its config and id, checked key by key.

    [sweep]  how the sweep runs (out, seeds_per_unit, repeats, data_root, dist_timeout, executor)
    [fixed]  run options every unit shares; [grid] lists of values, one unit per combination
    [slurm]  where units run with executor "slurm" (slurm.py): partition, time_min, ...

The keys a sweep file may set and their kinds come from Config's declarations (config.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import MAX_SEED, MAX_TIMEOUT_S, Config, ConfigError, make_config, parse_seeds, sweep_kinds
from ..dist.layout import check_launch, choose_layout
from ..train.memory import check_fits

DEVICES = ("auto", "cpu", "cuda")

# [sweep] keys: how the sweep runs, not what a unit computes.
SWEEP_KEYS = {"out": "str", "seeds_per_unit": "int", "repeats": "int", "data_root": "str", "dist_timeout": "float",
              "max_units": "int", "log_with": "str", "executor": "str"}
EXECUTORS = ("local", "slurm")  # where units run: this machine, or SLURM jobs (slurm.py)
# [slurm] keys -> kind (gpus_per_node may be 0: CPU nodes); `additional`: free sbatch options, name = value.
SLURM_KEYS = {"partition": "str", "time_min": "int", "gpus_per_node": "int", "cpus_per_task": "int", "mem_gb": "float",
              "account": "str", "array_parallelism": "int", "additional": "table"}
# A sweep's units are planned, listed and written to plan.json before any runs: 10,000 plan in a few
# seconds; a grid of 10^6 once took 46 s and 3 GB to list and wrote a 351 MB plan. Raise it on purpose.
MAX_UNITS = 10_000
# Run options a sweep file may set, by kind (config.py declares which); `device` stands for
# `cpu`, [sweep] repeats for `repeat`; nproc and device say where a unit runs.
OPTION_KEYS = {**sweep_kinds(), "nproc": "int", "device": "str"}
_DESCRIBE = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "ints": "a list of integers", "strs": "a list of strings", "floats": "a list of numbers"}


def example() -> str:
    return resources.files("bnbench.sweeps").joinpath("example.toml").read_text()


# -- the sweep file -> units --------------------------------------------------------
@dataclass
class Unit:
    index: int  # 1-based position in the plan
    label: str  # what varies, e.g. "lr=0.1 optim=sgd seeds=0-4"
    nproc: int
    device: str  # cpu / cuda (auto resolved)
    config: Config | None  # None: an invalid combination
    error: str | None = None
    id: str = ""
    same: list = field(default_factory=list)  # labels of later grid points that are this unit (same id): run once

    @property
    def expected_rows(self) -> int:
        c = self.config
        return len(c.eval_steps(choose_layout(c, self.nproc).dp)) * len(c.seeds) * len(c.variants)

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "label": self.label, "nproc": self.nproc, "device": self.device,
                "config": self.config.to_dict() if self.config else None, "error": self.error,
                "expected_rows": self.expected_rows if self.config else None,
                **({"same": self.same} if self.same else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        cfg = Config(**d["config"]) if d["config"] else None
        return cls(d["index"], d["label"], d["nproc"], d["device"], cfg, d["error"], d["id"], list(d.get("same", [])))


@dataclass
class Sweep:
    path: Path
    text: str
    settings: dict  # [sweep]
    fixed: dict
    grid: dict  # key -> list of choices (a choice: a value, or a dict of options for a group key)
    slurm: dict = field(default_factory=dict)  # [slurm]

    @property
    def out(self) -> Path:
        return Path(self.settings.get("out") or Path("runs") / self.path.stem)


def _is(kind: str, value) -> bool:
    """Whether a TOML value is of a scalar kind (a bool is not a number here)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"str": isinstance(value, str), "int": number and isinstance(value, int), "float": number,
            "bool": isinstance(value, bool)}[kind]


def _check_value(where: str, key: str, value):
    """value in its canonical Python type, or a ConfigError naming where it is."""
    kind = OPTION_KEYS[key]
    got = f"got {value!r} ({type(value).__name__})"
    if kind == "seeds":
        if isinstance(value, str):
            try:
                return parse_seeds(value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        kind = "ints"
        big = [v for v in value if isinstance(v, int) and v > MAX_SEED] if isinstance(value, list) else []
        if big:
            raise ConfigError(f"{where}: seed {max(big)} is above {MAX_SEED} (2^63 - 1: torch.manual_seed's range "
                              f"as rows hold it)")
    if kind in ("ints", "strs", "floats"):
        item = {"ints": int, "strs": str, "floats": (int, float)}[kind]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected {_DESCRIBE[kind]}, {got}")
        if kind == "floats" and not all(math.isfinite(v) for v in value):
            raise ConfigError(f"{where}: expected finite numbers, {got}")
        return tuple(float(v) for v in value) if kind == "floats" else tuple(value)
    if not _is(kind, value):
        raise ConfigError(f"{where}: expected {_DESCRIBE[kind]}, {got}")
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, {got}")
    if key == "device" and value not in DEVICES:
        raise ConfigError(f"{where}: unknown device {value!r}; valid: {', '.join(DEVICES)}")
    if key == "nproc" and value < 1:
        raise ConfigError(f"{where}: nproc must be at least 1, got {value}")
    return float(value) if kind == "float" else value


def _unknown(where: str, key: str, valid) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file; every error names the key it is about."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark some editors write is no statement
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key in doc:
        if key not in ("sweep", "fixed", "grid", "slurm"):
            raise _unknown(f"{path}", key, ["sweep", "fixed", "grid", "slurm"])
        if not isinstance(doc[key], dict):
            raise ConfigError(f"{path}: {key} must be a table ([{key}]), got {doc[key]!r}")
    settings = {}
    for key, value in doc.get("sweep", {}).items():
        if key not in SWEEP_KEYS:
            raise _unknown("sweep", key, list(SWEEP_KEYS))
        kind = SWEEP_KEYS[key]
        if not (_is(kind, value) and (kind == "str" or value > 0)):
            want = "a string" if kind == "str" else f"a positive {'integer' if kind == 'int' else 'number'}"
            raise ConfigError(f"sweep.{key}: expected {want}, got {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise ConfigError(f"sweep.{key}: expected a finite number, got {value!r}")
        if key == "dist_timeout" and value > MAX_TIMEOUT_S:
            raise ConfigError(f"sweep.dist_timeout: at most {MAX_TIMEOUT_S:,} seconds (7 days), got {value:g}")
        if kind == "str":
            check_printable(f"sweep.{key}", value)
        settings[key] = value
    if settings.get("executor", "local") not in EXECUTORS:
        raise ConfigError(f"sweep.executor: unknown executor {settings['executor']!r}; valid: {', '.join(EXECUTORS)}")
    slurm = _check_slurm(doc.get("slurm", {}))
    fixed = {}
    for key, value in doc.get("fixed", {}).items():
        if key not in OPTION_KEYS:
            raise _unknown("fixed", key, list(OPTION_KEYS))
        fixed[key] = _check_value(f"fixed.{key}", key, value)
    grid, set_by = {}, {}
    for key, choices in doc.get("grid", {}).items():
        if not isinstance(choices, list):
            raise ConfigError(f"grid.{key}: expected a list of values to try, got {choices!r}")
        if not choices:
            raise ConfigError(f"grid.{key} is an empty list: give at least one value")
        if key == "seeds":
            raise ConfigError("grid.seeds: seeds belong in [fixed] (a unit trains its seeds together); "
                              "[sweep] seeds_per_unit splits them into units")
        if key in OPTION_KEYS:
            grid[key] = [_check_value(f"grid.{key}[{i}]", key, v) for i, v in enumerate(choices)]
            options = {key}
        elif any(isinstance(c, dict) for c in choices) and not all(isinstance(c, dict) for c in choices):
            i = next(i for i, c in enumerate(choices) if not isinstance(c, dict))
            raise ConfigError(f"grid.{key}: a group's choices are tables of options ({{ lr = 0.1, ... }}); "
                              f"grid.{key}[{i}] is {choices[i]!r}")
        elif all(isinstance(c, dict) for c in choices):  # a group: each table sets several options
            grid[key] = []
            for i, table in enumerate(choices):
                if not table:
                    raise ConfigError(f"grid.{key}[{i}] is an empty table")
                for k in table:
                    if k not in OPTION_KEYS or k == "seeds":
                        raise _unknown(f"grid.{key}[{i}]", k, [o for o in OPTION_KEYS if o != "seeds"])
                grid[key].append({k: _check_value(f"grid.{key}[{i}].{k}", k, v) for k, v in table.items()})
            options = {k for table in grid[key] for k in table}
        else:
            raise _unknown("grid", key, list(OPTION_KEYS))
        for option in options:
            if option in set_by:
                raise ConfigError(f"grid.{key} and grid.{set_by[option]} both set {option}: set each option in one place")
            set_by[option] = key
    return Sweep(path, text, settings, fixed, grid, slurm)


def _check_slurm(table: dict) -> dict:
    """[slurm], key by key. Every string reaches the job script submitit writes (#SBATCH --name=value lines):
    a newline or other control character there would end the comment and start a shell command."""
    for key, value in table.items():
        if key not in SLURM_KEYS:
            raise _unknown("slurm", key, list(SLURM_KEYS))
        kind = SLURM_KEYS[key]
        if kind == "table":
            if not isinstance(value, dict):
                raise ConfigError(f"slurm.{key}: expected a table of sbatch options (name = value), got {value!r}")
            for name, v in value.items():
                if not _SBATCH_NAME.fullmatch(name):
                    raise ConfigError(f"slurm.{key}: option name {name!r} is not an sbatch option's name (letters, "
                                      f"digits, - and _)")
                if v is False:
                    raise ConfigError(f"slurm.{key}.{name}: false is no sbatch value: leave the option out instead")
                if not isinstance(v, (str, int, float, bool)):
                    raise ConfigError(f"slurm.{key}.{name}: expected a string, number or true, got {v!r}")
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"slurm.{key}.{name}: expected a finite number, got {v!r}")
                if isinstance(v, str):
                    check_printable(f"slurm.{key}.{name}", v)
        elif not (_is(kind, value) and (kind == "str" or value > 0 or (key == "gpus_per_node" and value == 0))):
            sign = "non-negative" if key == "gpus_per_node" else "positive"
            want = "a string" if kind == "str" else f"a {sign} {'integer' if kind == 'int' else 'number'}"
            raise ConfigError(f"slurm.{key}: expected {want}, got {value!r} ({type(value).__name__})")
        elif kind == "float" and not math.isfinite(value):
            raise ConfigError(f"slurm.{key}: expected a finite number, got {value!r}")
        elif kind == "str":
            check_printable(f"slurm.{key}", value)
    mem = table.get("mem_gb")
    if mem is not None and mem < MIN_MEM_GB:
        raise ConfigError(f"slurm.mem_gb: {mem:g} GB is below {MIN_MEM_GB:g} GB (1 MB): submitit writes whole MB, and "
                          f"SLURM reads --mem=0 as all of a node's memory")
    if mem is not None and mem > MAX_MEM_GB:
        raise ConfigError(f"slurm.mem_gb: {mem:g} GB is above {MAX_MEM_GB:,} GB")
    return dict(table)


_SBATCH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
MIN_MEM_GB = 0.001  # 1 MB: submitit writes int(mem_gb * 1024) MB, and --mem=0 means a whole node's memory
MAX_MEM_GB = 2**20  # a PB


def check_printable(where: str, value: str) -> None:
    """ConfigError for a string that holds a newline or another control character (Unicode category C*:
    line and paragraph separators too), naming where and which."""
    bad = next((c for c in value if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
               None)
    if bad is not None:
        raise ConfigError(f"{where}: {value!r} holds the control character {bad!r} (U+{ord(bad):04X}); values that "
                          f"reach a job script or a shell are plain text on one line")


def _seed_label(seeds: tuple[int, ...]) -> str:
    if len(seeds) > 1 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def _show(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _combinations(sweep: Sweep):
    """(what varies, the options of one unit) for every combination of the grid, in file order."""
    keys = list(sweep.grid)
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        options = dict(sweep.fixed)
        for key, choice in zip(keys, combo):
            options.update(choice if isinstance(choice, dict) else {key: choice})
        yield [f"{k}={_show(c)}" for k, c in zip(keys, combo) if len(sweep.grid[k]) > 1], options


def count_units(sweep: Sweep) -> tuple[int, str]:
    """How many units the sweep plans, counted without planning them, and how (for the error)."""
    combos = math.prod(len(v) for v in sweep.grid.values())
    presets = {sweep.fixed.get("preset", "seed")} | {c.get("preset") for v in sweep.grid.values() for c in v
                                                     if isinstance(c, dict) and c.get("preset")}
    presets |= set(sweep.grid.get("preset", []))
    try:
        seeds = max(len(make_config(p, **({"seeds": sweep.fixed["seeds"]} if "seeds" in sweep.fixed else {})).seeds)
                    for p in presets)
    except ConfigError:
        seeds = 1  # the units' own errors say what is wrong
    size = sweep.settings.get("seeds_per_unit") or seeds
    chunks, repeats = -(-seeds // size), sweep.settings.get("repeats", 1)
    return combos * chunks * repeats, f"{combos:,} grid combinations x {chunks:,} seed chunks x {repeats:,} repeats"


def plan(sweep: Sweep, cuda_available: bool, max_units: int | None = None) -> list[Unit]:
    """Every unit of the sweep, in a fixed order: grid combinations x seed chunks x repeats. Grid points
    that make the same unit (equal id: lr = [0.01, 0.01], or device "auto" and "cpu" on a CPU machine)
    are one unit, run once; it lists the others' labels in `same`."""
    limit = max_units or sweep.settings.get("max_units", MAX_UNITS)
    count, how = count_units(sweep)
    if count > limit:
        raise ConfigError(f"{sweep.path}: {count:,} units ({how}), more than the limit of {limit:,}: narrow the grid, "
                          f"or raise the limit with --max-units N or [sweep] max_units = N (planning, --dry-run and "
                          f"status take about a second per 10,000 units)")
    repeats = sweep.settings.get("repeats", 1)
    units: list[Unit] = []
    by_id: dict[str, Unit] = {}
    for point, (varying, options) in enumerate(_combinations(sweep), start=1):
        nproc = options.pop("nproc", 1)
        device = options.pop("device", "auto")
        if device == "auto":
            device = "cuda" if cuda_available else "cpu"
        try:
            base, error = make_config(options.pop("preset", "seed"), cpu=device == "cpu", **options), None
            seeds = base.seeds
        except ConfigError as e:
            base, error, seeds = None, str(e), options.get("seeds", ())
        size = sweep.settings.get("seeds_per_unit") or max(1, len(seeds))
        chunks = [seeds[i:i + size] for i in range(0, len(seeds), size)] or [()]
        for part in chunks:
            for repeat in range(repeats):
                label = " ".join(varying + ([f"seeds={_seed_label(part)}"] if len(chunks) > 1 else [])
                                 + ([f"repeat={repeat}"] if repeats > 1 else [])) or "(the one configuration)"
                unit = Unit(len(units) + 1, label, nproc, device, None, error)
                _settle(unit, base, part, repeat, cuda_available, options)
                if unit.id in by_id:
                    by_id[unit.id].same.append(f"grid point {point} ({label})")
                    continue
                by_id[unit.id] = unit
                units.append(unit)
    return units


def collapsed_lines(units: list[Unit]) -> list[str]:
    """One line per unit that stands for several grid points, for --dry-run and the sweep's start."""
    return [f"unit {u.index} ({u.label}) is also {', '.join(u.same)}: the same unit, run once"
            for u in units if u.same]


def _settle(unit: Unit, base: Config | None, seeds: tuple, repeat: int, cuda_available: bool, options: dict) -> None:
    """The unit's config and id, or why it cannot run (then an id from its options, for status)."""
    import torch

    if unit.error is None:
        try:
            cfg = dataclasses.replace(base, seeds=seeds, repeat=repeat)
            layout = choose_layout(cfg, unit.nproc)  # the error a launch would give, now
            check_launch(cfg, unit.nproc, layout.dp)  # and those its ranks would give
            if unit.device == "cpu":  # and the memory check (a GPU's is the run's own, on its device)
                check_fits(cfg, max(layout.sizes()), cfg.global_batch(layout.dp) // layout.dp, "cpu", unit.nproc)
            if unit.device == "cuda" and not cuda_available:
                raise ConfigError("device cuda: no CUDA device is visible on this machine")
            unit.config = cfg
            unit.id = cfg.unit_id(unit.nproc, unit.device, torch.__version__, layout.dp)
            return
        except ConfigError as e:
            unit.error = str(e)
    key = json.dumps([options, list(seeds), unit.nproc, unit.device, repeat], sort_keys=True, default=str)
    unit.id = "invalid-" + hashlib.sha256(key.encode()).hexdigest()[:8]
