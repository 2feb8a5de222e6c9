"""Sweeps: a grid of configurations run into one results folder, crash-safe and resumable.

    bnbench sweep --example > my.toml     # the annotated sample sweep file
    bnbench sweep my.toml                 # runs every unit not done yet; rerun it to resume
    bnbench status runs/my                # done / running / failed / left
    bnbench export runs/my --format parquet

A unit is one launch: one configuration with its seeds x variants, on `nproc`
processes of one device kind. Its id (Config.unit_id) is in every row it writes,
so the rows say what is done: a unit is done when results.jsonl holds all its rows
(epochs x members) from one run. The sweep holds DIR/.lock for its whole life, so
at most one sweep writes a folder. On start it moves the rows of unfinished
attempts to DIR/superseded/ and runs those units again from the start: no row is
lost, none is counted twice. Files beside results.jsonl:
    plan.json     the units of the current sweep file
    sweep.toml    a copy of that file
    units.jsonl   what happened to each unit: start / done / failed / interrupted, with reasons
    logs/         output of units launched as separate processes
One-process units of this machine's default device run inside the sweep's process
(no start-up cost per unit); the others run under `accelerate launch`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from .config import (
    SWEEP_CHILD_ENV,
    Config,
    ConfigError,
    die_with_parent,
    make_config,
    parse_seeds,
)
from .results import (
    EVENTS_FILE,
    META_FILE,
    RESULTS_FILE,
    FolderLock,
    ResultsProblem,
    write_atomic,
    append_lines,
    move_rows_aside,
    read_events,
    read_results,
    repair_tail,
    update_meta,
    utcnow,
)

PLAN_FILE = "plan.json"
DEVICES = ("auto", "cpu", "cuda")

# [sweep] keys: how the sweep runs, not what a unit computes.
SWEEP_KEYS = {"out": "str", "seeds_per_unit": "int", "repeats": "int", "data_root": "str", "dist_timeout": "float"}
# Run options a sweep file may set, by kind. `cpu` is `device`, `repeat` is [sweep] repeats.
_KIND_OF_TYPE = {"str": "str", "int": "int", "int | None": "int", "float": "float", "bool": "bool",
                 "tuple[int, ...]": "ints", "tuple[str, ...]": "strs", "tuple[float, ...]": "floats"}
OPTION_KEYS = {f.name: _KIND_OF_TYPE[f.type] for f in dataclasses.fields(Config) if f.name not in ("cpu", "repeat")}
OPTION_KEYS.update(nproc="int", device="str")
_DESCRIBE = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "ints": "a list of integers", "strs": "a list of strings", "floats": "a list of numbers"}


def example() -> str:
    return resources.files("bnbench").joinpath("sweep_example.toml").read_text()


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

    @property
    def expected_rows(self) -> int:
        c = self.config
        return len(c.eval_steps(self.nproc)) * len(c.seeds) * len(c.variants)

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "label": self.label, "nproc": self.nproc, "device": self.device,
                "config": self.config.to_dict() if self.config else None, "error": self.error,
                "expected_rows": self.expected_rows if self.config else None}

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        cfg = Config(**d["config"]) if d["config"] else None
        return cls(d["index"], d["label"], d["nproc"], d["device"], cfg, d["error"], d["id"])


@dataclass
class Sweep:
    path: Path
    text: str
    settings: dict  # [sweep]
    fixed: dict
    grid: dict  # key -> list of choices (a choice: a value, or a dict of options for a group key)

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
    if key == "seeds" and isinstance(value, str):
        try:
            return parse_seeds(value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if kind in ("ints", "strs", "floats"):
        item = {"ints": int, "strs": str, "floats": (int, float)}[kind]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected {_DESCRIBE[kind]}, {got}")
        return tuple(float(v) for v in value) if kind == "floats" else tuple(value)
    if not _is(kind, value):
        raise ConfigError(f"{where}: expected {_DESCRIBE[kind]}, {got}")
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
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key in doc:
        if key not in ("sweep", "fixed", "grid"):
            raise _unknown(f"{path}", key, ["sweep", "fixed", "grid"])
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
        settings[key] = value
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
    return Sweep(path, text, settings, fixed, grid)


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


def plan(sweep: Sweep, cuda_available: bool) -> list[Unit]:
    """Every unit of the sweep, in a fixed order: grid combinations x seed chunks x repeats."""
    repeats = sweep.settings.get("repeats", 1)
    units: list[Unit] = []
    for varying, options in _combinations(sweep):
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
                units.append(unit)
    return units


def _settle(unit: Unit, base: Config | None, seeds: tuple, repeat: int, cuda_available: bool, options: dict) -> None:
    """The unit's config and id, or why it cannot run (then an id from its options, for status)."""
    import torch

    if unit.error is None:
        try:
            cfg = dataclasses.replace(base, seeds=seeds, repeat=repeat)
            cfg.global_batch(unit.nproc)
            if unit.device == "cuda" and not cuda_available:
                raise ConfigError("device cuda: no CUDA device is visible on this machine")
            unit.config = cfg
            unit.id = cfg.unit_id(unit.nproc, unit.device, torch.__version__)
            return
        except ConfigError as e:
            unit.error = str(e)
    key = json.dumps([options, list(seeds), unit.nproc, unit.device, repeat], sort_keys=True, default=str)
    unit.id = "invalid-" + hashlib.sha256(key.encode()).hexdigest()[:8]


# -- what is done ---------------------------------------------------------------------
def done_units(rows, units: list[Unit]) -> dict[str, dict]:
    """Units whose every row is in results.jsonl from one run -> {run_id, diverged, members, all_diverged}."""
    want = {u.id: u for u in units if u.config is not None}
    if rows.empty or "unit" not in rows.columns:
        return {}
    mine = rows[rows["unit"].isin(want)]
    done = {}
    for (unit_id, run_id), g in mine.groupby(["unit", "run_id"], sort=False):
        u = want[unit_id]
        cells = g[["variant", "seed", "epoch"]].drop_duplicates()
        if len(cells) == u.expected_rows:
            last = g[g["epoch"] == u.config.epochs]
            n_div = int(last["diverged"].fillna(False).astype(bool).sum()) if "diverged" in last else 0
            done.setdefault(unit_id, {"run_id": run_id, "diverged": n_div, "members": len(last),
                                      "all_diverged": n_div == len(last)})
    return done


# -- running ----------------------------------------------------------------------------
def run_argv(cfg: Config) -> list[str]:
    """`bnbench run` options that rebuild cfg exactly (a test round-trips them)."""
    argv = ["--preset", cfg.preset, "--dataset", cfg.dataset, "--hidden", ",".join(map(str, cfg.hidden)),
            "--activation", cfg.activation, "--optimizer", cfg.optimizer, "--lr", repr(cfg.lr),
            "--momentum", repr(cfg.momentum), "--epochs", str(cfg.epochs), "--seeds", ",".join(map(str, cfg.seeds)),
            "--variants", ",".join(cfg.variants), "--engine", cfg.engine, "--dtype", cfg.dtype,
            "--eval-batch", str(cfg.eval_batch), "--repeat", str(cfg.repeat)]
    if cfg.per_device_batch is not None:
        argv += ["--per-device-batch", str(cfg.per_device_batch)]
    else:
        argv += ["--batch-size", str(cfg.batch_size)]
    for flag in ("sync_bn", "cpu", "compile", "tf32", "instrument"):
        if getattr(cfg, flag):
            argv.append("--" + flag.replace("_", "-"))
    argv.append("--bn-drop-bias" if cfg.bn_drop_bias else "--no-bn-drop-bias")  # presets set it either way
    if cfg.eval_every is not None:
        argv += ["--eval-every", str(cfg.eval_every)]
    argv += ["--instrument-every", str(cfg.instrument_every), "--ics-every", str(cfg.ics_every),
             "--ics-etas", ",".join(map(repr, cfg.ics_etas))]
    return argv


def _cause(log: str) -> str:
    """The line of a failed launch's output that says why: bnbench's own error first (rank 0's
    if several), else the last line that mentions an error, else the last line."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    ours = [x for x in lines if re.match(r"bnbench( \[rank \d+\])?: (error|terminated|interrupted)", x)]
    errors = [x for x in lines if "error" in x.lower()]
    return (ours[:1] or errors[-1:] or lines[-1:] or ["no output"])[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    """Units and the epochs of the current unit: bars on a terminal, plain lines in logs, or quiet."""

    def __init__(self, total: int, quiet: bool):
        from tqdm.auto import tqdm

        self.tqdm, self.total, self.n = tqdm, total, 0
        self.mode = "quiet" if quiet else "bars" if sys.stderr.isatty() else "lines"
        self.units = tqdm(total=total, unit="unit", position=0, desc="sweep") if self.mode == "bars" else None
        self.epochs = None

    def say(self, text: str) -> None:
        if self.units is not None:
            self.units.write(text, file=sys.stderr)  # above the bars
        else:
            say(text)

    def start(self, unit: Unit) -> None:
        self.n += 1
        self.unit = unit
        self.head = f"[{self.n}/{self.total}] unit {unit.index} {unit.label}"
        if unit.config is None:
            return  # an invalid combination: it ends at once
        if self.mode == "bars":
            self.epochs = self.tqdm(total=unit.config.epochs, unit="epoch", position=1, leave=False, desc=f"unit {unit.index}")
        elif self.mode == "lines":
            self.say(f"{self.head}: started ({unit.nproc} x {unit.device})")

    def epoch(self, epoch: int) -> None:
        if self.epochs is not None:
            self.epochs.update(epoch - self.epochs.n)
        elif self.mode == "lines":
            self.say(f"{self.head}: epoch {epoch}/{self.unit.config.epochs}")

    def end(self, status: str, detail: str) -> None:
        if self.epochs is not None:
            self.epochs.close()
            self.epochs = None
        if self.units is not None:
            self.units.update(1)
        if self.mode != "quiet" or status != "done":  # failures are shown even when quiet
            self.say(f"{self.head}: {status}{': ' + detail if detail else ''}")

    def close(self) -> None:
        if self.units is not None:
            self.units.close()


class Runner:
    """Runs units into one folder the caller holds exclusively, recording what happens to each."""

    def __init__(self, out: Path, settings: dict, data_root, progress: Progress):
        self.out, self.progress = out, progress
        self.data_root = data_root or settings.get("data_root")
        self.timeout = float(settings.get("dist_timeout", 600.0))
        self.events = os.open(out / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.accelerator = None
        self.splits = {}

    def record(self, unit: Unit, event: str, **extra) -> None:
        append_lines(self.events, [{"time": utcnow(), "unit": unit.id, "index": unit.index, "label": unit.label,
                                    "event": event, **extra}])

    def run(self, unit: Unit, home_device: str) -> str:
        """'done', 'diverged' or 'failed'; KeyboardInterrupt passes through after recording it."""
        self.progress.start(unit)
        if unit.error is not None:
            self.record(unit, "failed", reason=unit.error)
            self.progress.end("failed", unit.error)
            return "failed"
        self.record(unit, "start", nproc=unit.nproc, device=unit.device)
        t0 = time.perf_counter()
        try:
            if unit.nproc == 1 and unit.device == home_device:
                reason = self._in_process(unit)
            else:
                reason = self._launch(unit)
        except KeyboardInterrupt:
            self.record(unit, "interrupted", seconds=round(time.perf_counter() - t0, 3))
            self.progress.end("interrupted", "rerun the sweep to resume")
            raise
        seconds = round(time.perf_counter() - t0, 3)
        done = done_units(pd.DataFrame(self._rows_of(unit)), [unit]).get(unit.id)
        if reason is None and done is None:
            reason = "the unit ended without writing all its rows under its unit id (a bnbench bug: please report it)"
        if reason is not None:
            # Its partial rows leave results.jsonl (kept in superseded/), so that it holds whole units only.
            move_rows_aside(self.out, lambda r: r.get("unit") == unit.id)
            self.record(unit, "failed", reason=reason, seconds=seconds)
            self.progress.end("failed", reason)
            return "failed"
        self.record(unit, "done", run_id=done["run_id"], seconds=seconds, diverged_members=done["diverged"])
        note = f"{done['diverged']}/{done['members']} members diverged, " if done["diverged"] else ""
        state = "diverged" if done["all_diverged"] else "done"
        self.progress.end(state, f"{note}{seconds:.1f} s")
        return state

    def _in_process(self, unit: Unit) -> str | None:
        import torch

        from . import data
        from .distributed import make_accelerator
        from .engine import training_function

        cfg = unit.config
        try:
            if self.accelerator is None:
                self.accelerator = make_accelerator(cfg.cpu, self.timeout)
            key = (cfg.dataset, cfg.dtype)
            if key not in self.splits:
                self.splits[key] = data.load(cfg.dataset, self.data_root, device=self.accelerator.device,
                                             dtype=getattr(torch, cfg.dtype))
            training_function(cfg, self.out, quiet=True, accelerator=self.accelerator, splits=self.splits[key],
                              dist_timeout=self.timeout, hold_lock=False, on_epoch=lambda e, rows: self.progress.epoch(e))
            return None
        except Exception as e:  # the unit failed; the sweep goes on
            (self.out / "logs").mkdir(exist_ok=True)
            (self.out / "logs" / f"{unit.id}.log").write_text(traceback.format_exc())
            return f"{type(e).__name__}: {e}"

    def _launch(self, unit: Unit) -> str | None:
        cfg = unit.config
        env = {**os.environ, SWEEP_CHILD_ENV: "1"}
        if self.data_root:
            env["BNBENCH_DATA_ROOT"] = str(self.data_root)
        run = ["-m", "bnbench", "run", "--out", str(self.out), "--quiet", "--dist-timeout", str(self.timeout), *run_argv(cfg)]
        if unit.nproc == 1:
            cmd = [sys.executable, *run]
        else:
            if unit.device == "cpu":
                env["ACCELERATE_USE_CPU"] = "true"  # real DDP over gloo, not N lone processes
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(unit.nproc),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *run]
        (self.out / "logs").mkdir(exist_ok=True)
        log_path = self.out / "logs" / f"{unit.id}.log"
        parent = os.getpid()
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                    preexec_fn=lambda: die_with_parent(signal.SIGKILL, parent))
            try:
                results = self.out / RESULTS_FILE
                offset = results.stat().st_size if results.exists() else 0
                while proc.poll() is None:
                    time.sleep(0.5)
                    offset = self._poll_epochs(unit, offset)
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGTERM)  # the launcher passes it on to its ranks
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        if proc.returncode == 0:
            return None
        return f"exit status {proc.returncode}: {_cause(log_path.read_text())} (log: {log_path})"

    def _rows_of(self, unit: Unit) -> list[dict]:
        """This unit's whole rows in results.jsonl (a byte search first: the file may be large)."""
        try:
            raw = (self.out / RESULTS_FILE).read_bytes()
        except OSError:
            return []
        needle = f'"unit": "{unit.id}"'.encode()
        rows = []
        for line in raw.splitlines():
            if needle in line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a torn line: the reader reports it
        return rows

    def _poll_epochs(self, unit: Unit, offset: int) -> int:
        """Report the epochs a launched unit appended after `offset` (rank 0 writes each epoch's
        rows); return the offset after the last whole line read."""
        try:
            with open(self.out / RESULTS_FILE, "rb") as f:
                f.seek(offset)
                new = f.read()
        except OSError:
            return offset
        whole = new[: new.rfind(b"\n") + 1]
        needle = f'"unit": "{unit.id}"'.encode()
        epochs = []
        for line in whole.splitlines():
            if needle in line:
                try:
                    epochs.append(json.loads(line).get("epoch", 0))
                except ValueError:
                    pass  # not ours to judge here: the reader reports bad lines
        if epochs:
            self.progress.epoch(max(epochs))
        return offset + len(whole)

    def close(self) -> None:
        os.close(self.events)


def run_sweep(path, out=None, quiet: bool = False, data_root=None, dry_run: bool = False) -> int:
    """Run every unit of the sweep file not yet done in its folder. Exit status: 0 all done, 1 something failed."""
    sweep = load_sweep(path)
    out = Path(out) if out else sweep.out
    if dry_run:
        return show_plan(sweep, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out)
    except OSError as e:
        raise ConfigError(f"output folder {out} cannot be written: {e.strerror or e}") from None
    with lock:
        lock.exclusive("sweep")
        return _run_locked(sweep, out, quiet, data_root)


def _home_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def say(text: str) -> None:
    print(text, file=sys.stderr)


def _run_locked(sweep: Sweep, out: Path, quiet: bool, data_root) -> int:
    message = repair_tail(out)
    if message:
        say(f"bnbench: repaired: {message}")
    home = _home_device()
    units = plan(sweep, cuda_available=home == "cuda")
    write_atomic(out / PLAN_FILE, (json.dumps({"created": utcnow(), "file": str(sweep.path.resolve()),
                                                "units": [u.to_dict() for u in units]}, indent=1) + "\n").encode())
    write_atomic(out / "sweep.toml", sweep.text.encode())
    rows, problems = _rows(out)
    for p in problems:
        say(f"bnbench: warning: {p} (left in place)")
    done = done_units(rows, units)
    todo = [u for u in units if u.id not in done]
    todo_ids = {u.id for u in todo}
    moved = move_rows_aside(out, lambda r: r.get("unit") in todo_ids)
    for run_id, n in moved.items():
        update_meta(out, run_id, {"status": "superseded", "superseded_rows": f"superseded/{run_id}.jsonl"})
        say(f"bnbench: {n} rows of the unfinished run {run_id} moved to {out}/superseded/{run_id}.jsonl; its unit runs again")
    if not quiet:
        say(f"bnbench sweep {sweep.path} -> {out}: {len(units)} units, {len(done)} done before, {len(todo)} to run")
    progress = Progress(len(todo), quiet)
    runner = Runner(out, sweep.settings, data_root, progress)
    outcome = {}
    try:
        for unit in todo:
            outcome[unit.id] = runner.run(unit, home)
    finally:
        runner.close()
        progress.close()
    failed = [u for u in todo if outcome[u.id] == "failed"]
    diverged = [u for u in units if outcome.get(u.id) == "diverged" or done.get(u.id, {}).get("all_diverged")]
    ran = sum(outcome[u.id] != "failed" for u in todo)
    print(f"sweep {out}: {len(done) + ran} of {len(units)} units done ({ran} now), {len(failed)} failed, "
          f"{len(diverged)} with every member diverged")
    events, _ = read_events(out)
    for u in failed:
        print(f"  failed: unit {u.index} {u.label}: {events.get(u.id, {}).get('reason', u.error)}")
    for u in diverged:
        print(f"  diverged: unit {u.index} {u.label}: every member's loss became NaN/inf (rows kept)")
    print(f"results: {out / RESULTS_FILE}; bnbench status {out}; bnbench report {out}")
    return 1 if failed or diverged else 0


def _rows(out: Path):
    try:
        return read_results(out)
    except ResultsProblem:
        return pd.DataFrame(), []


# -- status and export ------------------------------------------------------------------
def unit_table(out: Path, units: list[Unit], running: bool):
    """One row per planned unit: its state, epochs recorded, and why it failed."""
    rows, problems = _rows(out)
    events, event_problems = read_events(out)
    done = done_units(rows, units)
    recorded = rows.groupby("unit")["epoch"].max() if "unit" in rows else pd.Series(dtype=float)
    table = []
    for u in units:
        last = events.get(u.id, {})
        epochs = int(recorded.get(u.id, 0))
        if u.id in done:
            d = done[u.id]
            state = "diverged" if d["all_diverged"] else "done"
            detail = f"{d['diverged']}/{d['members']} diverged" if d["diverged"] else ""
        elif u.error is not None or last.get("event") == "failed":
            state, detail = "failed", last.get("reason", u.error)
        elif last.get("event") == "start" and running:
            state, detail = "running", ""
        elif last.get("event") in ("start", "interrupted"):
            state, detail = "interrupted", "reruns from the start on resume"
        else:
            state, detail = "left", ""
        table.append({"unit": u.index, "state": state, "what": u.label, "procs": f"{u.nproc}x{u.device}",
                      "epochs": f"{epochs}/{u.config.epochs}" if u.config else "-", "id": u.id, "detail": detail or ""})
    return pd.DataFrame(table), problems + event_problems


def show_plan(sweep: Sweep, out: Path) -> int:
    units = plan(sweep, cuda_available=_home_device() == "cuda")
    table, problems = unit_table(out, units, running=False)
    print(f"sweep {sweep.path} -> {out}: {len(units)} units (dry run: nothing is run or written)")
    print(table.to_string(index=False))
    return 0


def status(out: str | os.PathLike) -> int:
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"no results folder {out}")
    running = _sweep_running(out)
    plan_path = out / PLAN_FILE
    if not plan_path.exists():
        return _status_of_runs(out, running)
    doc = json.loads(plan_path.read_text())
    table, problems = unit_table(out, [Unit.from_dict(u) for u in doc["units"]], running)
    counts = table["state"].value_counts()
    print(f"sweep {out} ({doc['file']}, planned {doc['created']}): {len(table)} units; "
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "running", "failed", "interrupted", "left", "diverged")
                      if counts.get(s, 0) or s in ("done", "left", "failed")))
    if running:
        print(f"  a sweep holds the folder now: {FolderLock(out).holder()}")
    print(table.drop(columns=["id"]).to_string(index=False))
    _print_problems(problems)
    return 0


def _sweep_running(out: Path) -> bool:
    try:
        with FolderLock(out) as lock:
            return lock.is_held()
    except OSError:
        return False


def _status_of_runs(out: Path, running: bool) -> int:
    """A folder of plain `bnbench run`s: each run's status and rows."""
    rows, problems = _rows(out)
    meta = json.loads((out / META_FILE).read_text()).get("runs", {}) if (out / META_FILE).exists() else {}
    table = [{"run_id": rid, "status": m.get("status"), "rows": int((rows["run_id"] == rid).sum()) if "run_id" in rows else 0,
              "epochs": m.get("config", {}).get("epochs"), "error": m.get("error", "")} for rid, m in sorted(meta.items())]
    print(f"results folder {out}: {len(table)} runs (no sweep plan here){'; a sweep holds it now' if running else ''}")
    if table:
        print(pd.DataFrame(table).to_string(index=False))
    _print_problems(problems)
    return 0


def _print_problems(problems: list[str]) -> None:
    if problems:
        print(f"{len(problems)} problem lines (left in place, not counted):")
        for p in problems:
            print(f"  {p}")


def export(out: str | os.PathLike, fmt: str, dest=None) -> Path:
    """results.jsonl as one flat CSV or Parquet table (written atomically)."""
    out = Path(out)
    try:
        rows, problems = read_results(out)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    for p in problems:
        print(f"bnbench: warning: {p} (not exported)", file=sys.stderr)
    dest = Path(dest) if dest else out / f"results.{fmt}"
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if fmt == "csv":
        rows.to_csv(tmp, index=False)
    else:
        rows.to_parquet(tmp, index=False)
    os.replace(tmp, dest)
    return dest
