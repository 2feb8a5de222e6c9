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
    units.jsonl   what happened to each unit: start / submitted / done / failed / interrupted, with reasons
    logs/         output of units launched as separate processes (jobs/: of SLURM jobs, slurm.py)
One-process units of this machine's default device run inside the sweep's process
(no start-up cost per unit); the others run under `accelerate launch`. With --executor slurm
(slurm.py) every unit is a SLURM job writing to DIR/jobs/, and this process collects them.
"""
from __future__ import annotations

import contextlib

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd

from ..config import ConfigError, run_argv
from ..files import write_atomic
from ..store.folder import EVENTS_FILE, RESULTS_FILE, FolderLock, move_rows_aside, repair_tail
from ..dist.launch import SWEEP_CHILD_ENV, accelerate_command, die_with_parent, failure_cause
from ..store.provenance import utcnow
from ..store.record import update_meta
from ..store.results import append_lines, done_units, new_rows_of_unit, read_events, refuse_own_file, rows_of_unit
from .plan import Sweep, Unit, check_printable, collapsed_lines, load_sweep, plan
from .status import PLAN_FILE, _meta_runs, _rows, unit_table
from ..store.tracking import check_trackers


# -- running ----------------------------------------------------------------------------
@contextlib.contextmanager
def sweep_folder(out: Path):
    """The results folder, made if need be and held exclusively by this sweep (a ConfigError in one line
    where it cannot be written)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out)
    except OSError as e:
        raise ConfigError(f"output folder {out} cannot be written: {e.strerror or e}") from None
    with lock:
        lock.exclusive("sweep")
        yield lock


def _in_notebook() -> bool:
    """A Jupyter kernel (tqdm.auto then draws widgets): bars there too, as on a terminal."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """Units and the epochs of the current unit: bars on a terminal, plain lines in logs, or quiet."""

    def __init__(self, total: int, quiet: bool):
        from tqdm.auto import tqdm

        self.tqdm, self.total, self.n = tqdm, total, 0
        self.mode = "quiet" if quiet else "bars" if sys.stderr.isatty() or _in_notebook() else "lines"
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
        self.trackers = check_trackers(settings["log_with"].split(",")) if settings.get("log_with") else None
        self.events = os.open(out / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.setup = None  # the in-process units' accelerator and data, made on first use

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
        done = done_units(pd.DataFrame(rows_of_unit(self.out, unit.id)), [unit]).get(unit.id)
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
        from ..training import Setup, training_function

        try:
            self.setup = self.setup or Setup(self.data_root, self.timeout, self.trackers,
                                             str(self.out) if self.trackers else None)
            training_function(unit.config, self.out, self.setup, quiet=True, hold_lock=False,
                              on_window=lambda e, rows: self.progress.epoch(e))
            return None
        except Exception as e:  # the unit failed; the sweep goes on
            (self.out / "logs").mkdir(exist_ok=True)
            (self.out / "logs" / f"{unit.id}.log").write_text(traceback.format_exc())
            return f"{type(e).__name__}: {e}"

    def _launch(self, unit: Unit) -> str | None:
        run = ["--out", str(self.out), "--quiet", "--dist-timeout", str(self.timeout), *run_argv(unit.config),
               *(["--log-with", ",".join(self.trackers)] if self.trackers else [])]
        env = {**os.environ, SWEEP_CHILD_ENV: "1"}
        if self.data_root:
            env["BNBENCH_DATA_ROOT"] = str(self.data_root)
        if unit.nproc == 1:
            cmd = [sys.executable, "-m", "bnbench", "run", *run]
        else:
            gpus = 0 if unit.device == "cpu" else _cuda_count()
            cmd, extra = accelerate_command(unit.nproc, run, cpu=unit.device == "cpu", gpus=gpus, timeout=self.timeout)
            env.update(extra)
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
                    # Rank 0 appends each window's rows: they tell how far the unit is.
                    rows, offset = new_rows_of_unit(results, unit.id, offset)
                    if rows:
                        self.progress.epoch(max(r.get("epoch", 0) for r in rows))
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
        return f"exit status {proc.returncode}: {failure_cause(log_path.read_text())} (log: {log_path})"

    def close(self) -> None:
        os.close(self.events)


def run_sweep(path, out=None, quiet: bool = False, data_root=None, dry_run: bool = False, max_units=None,
              log_with=None, executor=None) -> int:
    """Run every unit of the sweep file not yet done in its folder. Exit status: 0 all done, 1 something failed."""
    sweep = load_sweep(path)
    if max_units:
        sweep.settings["max_units"] = max_units
    if log_with:
        sweep.settings["log_with"] = log_with
    if executor:
        sweep.settings["executor"] = executor
    explicit = bool(out)
    out = Path(out) if out else sweep.out
    refuse_own_file(out, "--out" if explicit else "[sweep] out")
    if sweep.settings.get("log_with"):
        check_trackers(sweep.settings["log_with"].split(","))  # before the plan is shown or anything is written
    if dry_run:
        return show_plan(sweep, out)
    if sweep.settings.get("executor") == "slurm":
        from .slurm import check_cluster

        check_printable("--out" if explicit else "sweep.out", str(out.resolve()))  # it is in every job script
        check_cluster(sweep.slurm)  # before the folder is touched, and before any job
    with sweep_folder(out):
        return _run_locked(sweep, out, quiet, data_root)


def _home_device(sweep: Sweep | None = None) -> str:
    if sweep is not None and sweep.settings.get("executor") == "slurm":
        from .slurm import home_device

        return home_device(sweep.slurm)  # the nodes', not this machine's
    return "cuda" if _cuda_count() else "cpu"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def say(text: str) -> None:
    print(text, file=sys.stderr)


def _run_locked(sweep: Sweep, out: Path, quiet: bool, data_root) -> int:
    message = repair_tail(out)
    if message:
        say(f"bnbench: repaired: {message}")
    home = _home_device(sweep)
    units = plan(sweep, cuda_available=home == "cuda")
    previous = _planned_units(out)  # the last sweep's plan (the file may have been edited since)
    write_atomic(out / PLAN_FILE, (json.dumps({"created": utcnow(), "file": str(sweep.path.resolve()),
                                                "units": [u.to_dict() for u in units]}, indent=1) + "\n").encode())
    write_atomic(out / "sweep.toml", sweep.text.encode())
    rows, problems = _rows(out)
    for p in problems:
        say(f"bnbench: warning: {p} (left in place)")
    done = done_units(rows, units)
    todo = [u for u in units if u.id not in done]
    moved = move_rows_aside(out, _unfinished(out, rows, units, todo, previous))
    for run_id, n in moved.items():
        update_meta(out, run_id, {"status": "superseded", "superseded_rows": f"superseded/{run_id}.jsonl"})
        say(f"bnbench: {n} rows of the unfinished run {run_id} moved to {out}/superseded/{run_id}.jsonl; its unit runs again")
    if not quiet:
        say(f"bnbench sweep {sweep.path} -> {out}: {len(units)} units, {len(done)} done before, {len(todo)} to run")
        for line in collapsed_lines(units):
            say(f"  {line}")
    progress = Progress(len(todo), quiet)
    runner = Runner(out, sweep.settings, data_root, progress)
    outcome = {}
    try:
        if sweep.settings.get("executor") == "slurm":
            from .slurm import SlurmUnits

            outcome = SlurmUnits(out, sweep.slurm, runner, progress).run(todo)
        else:
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


def _planned_units(out: Path) -> list[Unit]:
    """The units of the plan.json in the folder (the last sweep's), or none where there is none to read."""
    try:
        return [Unit.from_dict(u) for u in json.loads((out / PLAN_FILE).read_text())["units"]]
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return []




def _unfinished(out: Path, rows: pd.DataFrame, units: list[Unit], todo: list[Unit], previous: list[Unit]):
    """Which rows move to superseded/ before the units left to run: every row of a unit left to run,
    and the rows of any other attempt that did not finish: a unit of the previous plan that is not
    whole (the sweep file was edited after a kill), or a run that meta.json records as anything but
    complete. The sweep holds the folder exclusively, so no such run is still writing. Rows of whole
    units, of complete runs and of runs meta.json does not know stay."""
    planned, todo_ids = {u.id for u in units}, {u.id for u in todo}
    before = [u for u in previous if u.id not in planned]
    whole = {(unit_id, d["run_id"]) for unit_id, d in done_units(rows, before).items()}
    before_ids = {u.id for u in before}
    status = {run_id: m.get("status") for run_id, m in _meta_runs(out).items() if isinstance(m, dict)}

    def select(row: dict) -> bool:
        unit, run_id = row.get("unit"), row.get("run_id")
        if unit in todo_ids:
            return True
        if unit in planned or (unit, run_id) in whole:
            return False
        return unit in before_ids or status.get(run_id, "complete") != "complete"

    return select


# -- the plan, shown ---------------------------------------------------------------------
def show_plan(sweep: Sweep, out: Path) -> int:
    units = plan(sweep, cuda_available=_home_device(sweep) == "cuda")
    table, problems = unit_table(out, units, running=False)
    print(f"sweep {sweep.path} -> {out}: {len(units)} units (dry run: nothing is run or written)")
    print(table.to_string(index=False))
    for line in collapsed_lines(units):
        print(line)
    return 0


from .status import export, status  # noqa: E402, F401 (moved to status.py; importable from here as before)
