"""The results store: the row schema, durable appends, and reading rows back.

DIR/results.jsonl  rows (pandas: pd.read_json(path, lines=True, precise_float=True))
DIR/instruments.jsonl  with --instrument: one measured value per row (INSTRUMENT_SCHEMA)
Each epoch's rows go out in ONE os.write on an O_APPEND descriptor followed by
fsync, so a crash loses at most the epoch in flight and never interleaves lines.
The folder around them (lock, repair, moving rows aside) is folder.py's.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

from ..config import VARIANTS, ConfigError, row_settings
from .folder import (
    EVENTS_FILE,
    INSTRUMENTS_FILE,
    LOCK_FILE,
    META_FILE,
    RESULTS_FILE,
    TORN_LOG,
    FolderLock,
    end_torn_line,
    repair_tail,
)

# The row schema: column -> meaning. The README's table is this dict. The columns that are
# settings come from their declarations in config.py (row_settings), in declaration order.
SCHEMA: dict[str, str] = {
    "run_id": "one invocation of `bnbench run`; keys meta.json",
    "unit": "hash of everything that changes the numbers (config, world size, device kind, torch, training code); sweeps skip units already done",
    **row_settings(),
    "variant": "what follows each hidden Linear: bn (BatchNorm1d) / nobn (nothing) / ln (LayerNorm) / gn (GroupNorm) / rms (RMSNorm) / brn (Batch Renormalization)",
    "seed": "init and data-order seed; every variant of one seed shares both",
    "epoch": "epochs completed at this evaluation: 1, 2, ... (fractional with eval_every: 0.5, 1, 1.5, ...)",
    "step": "optimizer steps taken by this member so far",
    "step_impl": "how its steps were computed: fused (hand-written backward, Adam's kernel called directly where it applies) / autograd; --step-impl chooses, bitwise the same numbers (absent before 2026-12-07)",
    "train_loss": "mean cross-entropy over ALL training samples, eval mode (running stats), after the epoch",
    "train_acc": "correct / total over ALL training samples, eval mode",
    "test_loss": "mean cross-entropy over ALL test samples (10,000 for MNIST), eval mode",
    "test_acc": "correct / total over ALL test samples, eval mode",
    "train_correct": "training samples classified correctly (eval mode)",
    "train_total": "training samples scored (all of them: 60,000 for MNIST)",
    "test_correct": "test samples classified correctly",
    "test_total": "test samples scored (all of them: 10,000 for MNIST)",
    "train_loss_running": "mean mini-batch loss during the epoch (train mode)",
    "train_seconds": "wall time of the window's (epoch's) training steps, evaluation and instruments excluded (CUDA synchronised); the slowest seed group's",
    "samples_per_s": "member-samples per second in the window, all processes together: members x samples / train_seconds",
    "variant_samples_per_s": "member-samples per second of this member's variant trained alone, as one stack of the run's shape (all the run's seeds of that variant, whatever share this process trains; the batch per process), timed for a few steps before training on this process (the cost probe: computation only, no collectives); null with --no-cost-probe or --compile (absent before 2026-12-07)",
    "peak_rss_mb": "peak resident memory of a process so far, the largest over the processes, MiB",
    "peak_gpu_mb": "peak GPU memory allocated by torch so far, the largest over the processes, MiB (null on the CPU)",
    "members": "members in the run (all variants and seeds, over every seed group)",
    "diverged": "true once the member's loss was NaN/inf; its metrics are then null",
    "device": "torch device the run trained on: cpu / cuda:N",
    "device_name": "CPU model or GPU name",
    "world_size": "processes in the run (all machines) = seed_groups x dp",
    "seed_groups": "groups of processes that train shares of the members apart, without communicating",
    "seed_group": "the seed group that trained this member (0-based; its ranks are seed_group x dp ...)",
    "backend": "torch.distributed backend: gloo (CPU) / nccl (GPU) / none (one process)",
    "time": "UTC time the row was written (ISO 8601)",
    "bnbench_version": "package version",
    "torch_version": "torch.__version__",
    "git_commit": "commit of the bnbench checkout ('+dirty' if modified), or 'unknown'",
}


# DIR/instruments.jsonl (--instrument), one value per row; instruments.py says how each is measured.
INSTRUMENT_SCHEMA: dict[str, str] = {
    "run_id": "the run, as in results.jsonl",
    "unit": "the unit, as in results.jsonl",
    "repeat": "as in results.jsonl",
    "variant": "bn / nobn",
    "seed": "the member's seed",
    "step": "updates applied before the measurement (0 = at initialisation)",
    "measure": "grad_norm / preact / ics_distance / ics_cosine / grad_norm_all / grad_change / loss_along",
    "layer": "1-based Linear layer (grad_norm, ics_*; preact: the last hidden layer)",
    "neuron": "preact: index of the traced unit in its layer",
    "q": "preact: the quantile, 0.15 / 0.5 / 0.85",
    "eta": "grad_change, loss_along: step size along the negative gradient",
    "value": "the measured value (null if not finite)",
}


def _clean(value):
    """JSON has no NaN/inf: a non-finite float becomes null (the row says diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_lines(fd: int, rows: list[dict], path: Path | None = None) -> None:
    """Whole lines in ONE write, then fsync: a crash leaves at most a torn last line."""
    data = memoryview("".join(json.dumps({k: _clean(v) for k, v in r.items()}, allow_nan=False) + "\n" for r in rows).encode())
    try:
        while data:  # a full disk can take part of a write: what is left then raises ENOSPC
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path) if path else None) from e


class ResultsWriter:
    """Append-only, fsync'd results file. Opening it proves the folder is writable.

    hold_lock: share DIR/.lock for the run (refused while a sweep holds the folder). A
    sweep's own units pass False: the sweep holds it for them.
    """

    def __init__(self, out_dir: str | os.PathLike, hold_lock: bool = True):
        self.dir = Path(out_dir)
        self.lock = None
        self.extra: dict[str, int] = {}  # other files of the folder appended to (instruments.jsonl)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / RESULTS_FILE
            probe = self.dir / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")  # meta.json needs create+rename in the folder too
            probe.unlink()
            if hold_lock:
                self.lock = FolderLock(self.dir)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output folder {self.dir} cannot be written: {e.strerror or e}") from None
        if self.lock is not None:
            try:
                self.lock.shared()
                if self.lock.try_upgrade():  # alone in the folder: a torn tail can be repaired properly
                    message = repair_tail(self.dir)
                    if message:
                        print(f"bnbench: warning: {message}", file=sys.stderr)
                # Back to shared. Also after a refused upgrade: Linux drops the shared lock when a
                # non-blocking upgrade fails (flock(2): conversion is not atomic).
                self.lock.shared()
            except BaseException:  # busy, or a repair that cannot write (full disk): release the folder
                self.close()
                raise
        end_torn_line(self.fd, self.path)

    def append(self, rows: list[dict], name: str = RESULTS_FILE) -> None:
        if name == RESULTS_FILE:
            append_lines(self.fd, rows, self.path)
            return
        if name not in self.extra:
            self.extra[name] = os.open(self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            end_torn_line(self.extra[name], self.dir / name)
        if rows:
            append_lines(self.extra[name], rows, self.dir / name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.extra.values():
            os.close(fd)
        self.extra = {}
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResultsProblem(Exception):
    pass


# A results folder's own files (plan.json and sweep.toml are a sweep's: sweeps/runner.py writes them).
# No command writes over one of them: an export, a run's or a sweep's --out, a tracker's --logging-dir.
OWN_FILES = (RESULTS_FILE, META_FILE, "plan.json", EVENTS_FILE, "sweep.toml", INSTRUMENTS_FILE, LOCK_FILE, ".meta.lock",
             TORN_LOG)
_MARKS = (RESULTS_FILE, META_FILE, "plan.json", EVENTS_FILE, LOCK_FILE)  # a folder holding one is a results folder


def own_file(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(folder, name) where `path`, or a folder above it, is one of a results folder's own files
    (symlinks followed), else None. A results folder: one that holds results.jsonl, meta.json,
    plan.json, units.jsonl or .lock."""
    plain = Path(os.path.abspath(path))
    try:
        resolved = plain.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the plain path still says where it points
        resolved = plain
    for p in dict.fromkeys([plain, *plain.parents, resolved, *resolved.parents]):
        if p.name in OWN_FILES and any(os.path.lexists(p.parent / m) for m in _MARKS):
            return p.parent, p.name
    return None


def refuse_own_file(path: str | os.PathLike, option: str) -> None:
    """A ConfigError (one line, exit 2) where writing to `path` would write over a results folder's own file."""
    hit = own_file(path)
    if hit is not None:
        folder, name = hit
        raise ConfigError(f"{option} {path} is {name} of the results folder {folder}: writing there would destroy "
                          f"it; choose another path")


# What every reader relies on, per file: a row without it, or with another type, is listed by line
# number and left out (foreign rows once passed in silence into exports, or broke the report).
_NUMBER = (int, float)
_REQUIRED = {
    RESULTS_FILE: {"run_id": str, "variant": str, "seed": int, "epoch": _NUMBER, "test_acc": _NUMBER + (type(None),),
                   "diverged": bool},
    INSTRUMENTS_FILE: {"run_id": str, "variant": str, "seed": int, "step": int, "measure": str,
                       "value": _NUMBER + (type(None),)},
}
_NUMBERS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "train_correct", "train_total", "test_correct",
            "test_total", "train_loss_running", "train_seconds", "samples_per_s", "variant_samples_per_s", "world_size", "dp",
            "lr", "batch_size")


def row_problem(row: dict, name: str = RESULTS_FILE) -> str | None:
    """Why a parsed row does not fit its file's schema, or None."""
    required = _REQUIRED[name]
    missing = [k for k in required if k not in row]
    if missing:
        return f"not a {name} row: no {', '.join(missing)}"
    for key, kind in required.items():
        v = row[key]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            return f"{key} is {v!r}: expected {_kind_name(kind)}"
    if row["variant"] not in VARIANTS:
        return f"variant is {row['variant']!r}: expected one of {', '.join(VARIANTS)}"
    for key in _NUMBERS:
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, _NUMBER)):
            return f"{key} is {v!r}: expected a number or null"
    return _range_problem(row) if name == RESULTS_FILE else None


_ACCURACIES = ("train_acc", "test_acc")
_LOSSES = ("train_loss", "test_loss", "train_loss_running")


def _range_problem(row: dict) -> str | None:
    """Values no run writes: an accuracy outside [0, 1], a negative or non-finite loss, a metric that is
    null or not a number (NaN) while the row says the member did not diverge."""
    for key in _ACCURACIES + _LOSSES:
        v = row.get(key)
        if v is None:
            if key in row and not row["diverged"] and key != "train_loss_running":
                return f"{key} is null though diverged is false: a member's metrics are null only once it diverged"
            continue
        if not math.isfinite(v):
            return f"{key} is {v!r}: not a finite number{'' if row['diverged'] else ' though diverged is false'}"
        if key in _ACCURACIES and not 0 <= v <= 1:
            return f"{key} is {v!r}: an accuracy is in [0, 1]"
        if key in _LOSSES and v < 0:
            return f"{key} is {v!r}: a cross-entropy loss is >= 0"
    return None


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(dict.fromkeys("a number" if k in (int, float) and len(kinds) > 1 else names[k] for k in kinds))


def read_jsonl(path: Path, check=None) -> tuple[list[dict], list[str]]:
    """The rows of a JSON-lines file and its problems: bad lines by number, never dropped in silence.
    check(row) -> reason or None: rows it rejects are problems too, and left out."""
    rows, problems = [], []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn_tail = bool(raw) and not raw.endswith(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            why = check(row) if check is not None else None
            if why:
                problems.append(f"{path}:{i}: {why}; left out: {line[:80]!r}")
                continue
            rows.append(row)
        except ValueError as e:
            last = i == len(lines) and torn_tail
            what = "torn last line (interrupted write)" if last else f"unparsable line ({e})"
            problems.append(f"{path}:{i}: {what}: {line[:80]!r}")
    return rows, problems


def read_results(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """All rows of DIR/results.jsonl and a list of problems (bad lines by number).

    A line that does not parse is never dropped in silence: it is reported with its
    line number, and a torn last line (crash mid-write) is called that.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        if path.is_symlink():
            raise ResultsProblem(f"{path} is a symlink that leads nowhere (broken, or a loop): {os.readlink(path)}")
        raise ResultsProblem(f"no {RESULTS_FILE} in {out_dir}")
    try:
        rows, problems = read_jsonl(path, row_problem)
    except OSError as e:
        raise ResultsProblem(f"{path} cannot be read: {e.strerror or e}") from None
    return with_layout(pd.DataFrame(rows)), problems


def with_layout(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before seed groups existed were one data-parallel group of every process:
    where a folder mixes them with newer rows, they get that layout's values instead of blanks
    (which would split one configuration in two)."""
    if "dp" not in df or "world_size" not in df:
        return df
    old = df["dp"].isna()
    if old.any():
        df = df.assign(dp=df["dp"].fillna(df["world_size"]).astype("int64"),
                       seed_groups=df["seed_groups"].fillna(1).astype("int64"),
                       seed_group=df["seed_group"].fillna(0).astype("int64"))
    return df


def rows_of_unit(out_dir: str | os.PathLike, unit_id: str) -> list[dict]:
    """The whole rows of one unit in DIR/results.jsonl, found by parsing each line (torn or
    foreign lines are the readers' to report, not this one's)."""
    try:
        raw = (Path(out_dir) / RESULTS_FILE).read_bytes()
    except OSError:
        return []
    return [row for row in _parsed(raw.splitlines()) if row.get("unit") == unit_id]


def _parsed(lines) -> list[dict]:
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def new_rows_of_unit(path: Path, unit_id: str, offset: int) -> tuple[list[dict], int]:
    """A unit's rows appended to `path` after byte `offset`, and the offset after the last whole line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            new = f.read()
    except OSError:
        return [], offset
    whole = new[: new.rfind(b"\n") + 1]
    return [r for r in _parsed(whole.splitlines()) if r.get("unit") == unit_id], offset + len(whole)


def done_units(rows: pd.DataFrame, units: list) -> dict[str, dict]:
    """The units (sweepfile.Unit) whose every row is in `rows` from one run -> {run_id, diverged, members,
    all_diverged}: what a sweep counts as done in results.jsonl, and collects from a SLURM job's folder."""
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


def read_instruments(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """DIR/instruments.jsonl as a DataFrame (empty if the folder has none) and its problems."""
    path = Path(out_dir) / INSTRUMENTS_FILE
    if not path.exists():
        return pd.DataFrame(), []
    rows, problems = read_jsonl(path, lambda row: row_problem(row, INSTRUMENTS_FILE))
    return pd.DataFrame(rows), problems


def read_events(out_dir: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The last event of each unit of a sweep (DIR/units.jsonl), and that file's problems."""
    path = Path(out_dir) / EVENTS_FILE
    if not path.exists():
        return {}, []
    events, problems = read_jsonl(path)
    return {e.get("unit"): e for e in events}, problems
