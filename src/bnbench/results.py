"""Results: one JSON line per member per epoch, appended durably; run metadata beside it.

DIR/results.jsonl  rows (pandas: pd.read_json(path, lines=True, precise_float=True))
DIR/instruments.jsonl  with --instrument: one measured value per row (INSTRUMENT_SCHEMA)
DIR/meta.json      {"runs": {run_id: {config, versions, devices, host, git, ...}}}
DIR/.lock          flock: a sweep holds it exclusively, plain runs share it
Each epoch's rows go out in ONE os.write on an O_APPEND descriptor followed by
fsync, so a crash loses at most the epoch in flight and never interleaves lines.
Rows are only ever moved, never deleted: a torn last line goes to DIR/torn.log,
rows of an abandoned attempt to DIR/superseded/<run_id>.jsonl (and .instruments.jsonl).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd

from .config import ConfigError, FolderBusy

RESULTS_FILE = "results.jsonl"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
TORN_LOG = "torn.log"
INSTRUMENTS_FILE = "instruments.jsonl"
EVENTS_FILE = "units.jsonl"  # a sweep's record of each unit: start / done / failed / interrupted
SUPERSEDED_DIR = "superseded"

# The row schema: column -> meaning. The README's table is this dict.
SCHEMA: dict[str, str] = {
    "run_id": "one invocation of `bnbench run`; keys meta.json",
    "unit": "hash of everything that changes the numbers (config, world size, device kind, torch, training code); sweeps skip units already done",
    "repeat": "index of a repeated launch of the same config (0 unless a sweep sets repeats)",
    "preset": "preset the config started from",
    "dataset": "mnist / fashion-mnist",
    "variant": "bn (BatchNorm1d after each hidden Linear) / nobn",
    "seed": "init and data-order seed; bn and nobn of one seed share both",
    "epoch": "epochs completed at this evaluation: 1, 2, ... (fractional with eval_every: 0.5, 1, 1.5, ...)",
    "step": "optimizer steps taken by this member so far",
    "eval_every": "steps per evaluation window (null: once per epoch)",
    "train_loss": "mean cross-entropy over ALL training samples, eval mode (running stats), after the epoch",
    "train_acc": "correct / total over ALL training samples, eval mode",
    "test_loss": "mean cross-entropy over ALL test samples (10,000 for MNIST), eval mode",
    "test_acc": "correct / total over ALL test samples, eval mode",
    "train_correct": "training samples classified correctly (eval mode)",
    "train_total": "training samples scored (all of them: 60,000 for MNIST)",
    "test_correct": "test samples classified correctly",
    "test_total": "test samples scored (all of them: 10,000 for MNIST)",
    "train_loss_running": "mean mini-batch loss during the epoch (train mode)",
    "train_seconds": "wall time of the window's (epoch's) training steps, evaluation and instruments excluded (CUDA synchronised)",
    "samples_per_s": "member-samples per second in the window, all processes together: members x samples / train_seconds",
    "peak_rss_mb": "peak resident memory of the (rank 0) process so far, MiB",
    "peak_gpu_mb": "peak GPU memory allocated by torch so far, MiB (null on the CPU)",
    "members": "members in the run (both variants, all seeds); every process trains all of them on its slice",
    "diverged": "true once the member's loss was NaN/inf; its metrics are then null",
    "batch_size": "global mini-batch: samples per member per step over all processes",
    "per_device_batch": "samples per member per step in each process (batch_size / world_size)",
    "lr": "learning rate",
    "optimizer": "adam / sgd",
    "momentum": "SGD momentum (0 for adam)",
    "hidden": "hidden widths, e.g. '32,32'",
    "activation": "relu / sigmoid / tanh",
    "epochs": "epochs configured for the run",
    "engine": "stacked (all members in batched matmuls) / reference (one nn.Sequential each)",
    "dtype": "float32 / float64",
    "device": "torch device the run trained on: cpu / cuda:N",
    "device_name": "CPU model or GPU name",
    "world_size": "processes in the run (all machines)",
    "backend": "torch.distributed backend: gloo (CPU) / nccl (GPU) / none (one process)",
    "sync_bn": "BN training statistics over the global batch across processes (--sync-bn)",
    "bn_drop_bias": "BN members' hidden Linears have no bias; BN's shift replaces it (--bn-drop-bias)",
    "compile": "units stepped through torch.compile (--compile); compile time is in meta.json",
    "tf32": "TF32 matmuls allowed on the GPU (--tf32); off by default",
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


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value):
    """JSON has no NaN/inf: a non-finite float becomes null (the row says diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_lines(fd: int, rows: list[dict]) -> None:
    """Whole lines in ONE write, then fsync: a crash leaves at most a torn last line."""
    data = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, allow_nan=False) + "\n" for r in rows)
    os.write(fd, data.encode())
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderLock:
    """DIR/.lock, an flock: a sweep holds it exclusively for its whole life, plain runs share it.

    The kernel releases it when its holder dies, even by SIGKILL, so it never goes stale.
    (flock is per machine: on NFS, give each machine its own folder.)
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.owner = False

    def _try(self, mode: int, wait_s: float) -> bool:
        import time

        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                # Brief holders (another run's repair, `bnbench status` probing) let go within ms.
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info or (info.get("host") == socket.gethostname() and not _alive(info.get("pid"))):
            # The file names the last exclusive holder; if that one is gone, plain runs share the folder.
            return "bnbench run(s) writing into it"
        return f"bnbench {info.get('command', 'sweep')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"

    def _busy(self) -> FolderBusy:
        return FolderBusy(
            f"results folder {self.dir} is in use by {self.holder()}: two writers of one folder would run "
            f"the same units twice. Wait for it (bnbench status {self.dir}), stop it, or use another folder."
        )

    def exclusive(self, command: str = "sweep", wait_s: float = 2.0) -> None:
        if not self._try(fcntl.LOCK_EX, wait_s):
            raise self._busy()
        info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": utcnow()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)
        self.owner = True

    def shared(self, wait_s: float = 5.0) -> None:
        if not self._try(fcntl.LOCK_SH, wait_s):
            raise self._busy()
        # A shared holder never writes the info: the file names the last exclusive holder.

    def try_upgrade(self) -> bool:
        """Shared -> exclusive if no one else holds the folder. Either way call shared() after:
        a refused upgrade may have dropped the shared lock."""
        return self._try(fcntl.LOCK_EX, 0.0)

    def is_held(self) -> bool:
        """Whether someone holds it exclusively (a sweep is running)."""
        if self._try(fcntl.LOCK_SH, 0.0):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            if self.owner:
                os.ftruncate(self.fd, 0)  # no longer anyone's: the next refusal must not name us
            os.close(self.fd)  # releases the flock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # someone else's live process


def repair_tail(out_dir: str | os.PathLike) -> str | None:
    """End a torn last line of results.jsonl and instruments.jsonl. Call with the folder held exclusively.

    A last line without its newline that is a whole JSON row only lacks the newline;
    anything else is a torn write: its bytes go to DIR/torn.log (with its line number),
    the file is cut back to its last whole line, and a message says so.
    """
    messages = [m for m in (_repair_tail(Path(out_dir), n) for n in (RESULTS_FILE, INSTRUMENTS_FILE)) if m]
    return "; ".join(messages) or None


def _repair_tail(out_dir: Path, name: str) -> str | None:
    path = out_dir / name
    if not path.exists():
        return None
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return None
    cut = raw.rfind(b"\n") + 1
    tail, line_no = raw[cut:], raw.count(b"\n") + 1
    with open(path, "r+b") as f:
        try:
            if isinstance(json.loads(tail), dict):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
                return None
        except ValueError:
            pass
        with open(Path(out_dir) / TORN_LOG, "ab") as log:
            log.write(f"# {utcnow()} {name}:{line_no}, {len(tail)} bytes\n".encode() + tail + b"\n")
            log.flush()
            os.fsync(log.fileno())
        f.truncate(cut)
        os.fsync(f.fileno())
    return f"{path}:{line_no}: torn last line (interrupted write) of {len(tail)} bytes moved to {Path(out_dir) / TORN_LOG}"


def move_rows_aside(out_dir: str | os.PathLike, select) -> dict[str, int]:
    """Move the rows `select(row)` picks out of results.jsonl into DIR/superseded/<run_id>.jsonl,
    and out of instruments.jsonl into DIR/superseded/<run_id>.instruments.jsonl.

    For the rows of an attempt that did not finish, before its unit runs again: nothing
    is deleted and nothing is counted twice. Unparsable lines stay where they are (the
    reader keeps reporting them). Call with the folder held exclusively. Crash-safe: each
    superseded file is rewritten whole (so a repeat adds nothing), then results.jsonl is
    replaced atomically. Returns results rows moved per run_id.
    """
    _move_aside(Path(out_dir), INSTRUMENTS_FILE, ".instruments.jsonl", select)  # first: results decide "done"
    return _move_aside(Path(out_dir), RESULTS_FILE, ".jsonl", select)


def _move_aside(out_dir: Path, name: str, suffix: str, select) -> dict[str, int]:
    path = out_dir / name
    if not path.exists():
        return {}
    keep, moved = [], {}
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and select(row):
            moved.setdefault(str(row.get("run_id")), []).append(line)
        else:
            keep.append(line)
    if not moved:
        return {}
    aside = out_dir / SUPERSEDED_DIR
    aside.mkdir(exist_ok=True)
    for run_id, lines in moved.items():
        target = aside / f"{run_id}{suffix}"
        old = target.read_bytes().splitlines(keepends=True) if target.exists() else []
        write_atomic(target, b"".join(dict.fromkeys(old + lines)))
    write_atomic(path, b"".join(keep))
    return {run_id: len(lines) for run_id, lines in moved.items()}


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
            except FolderBusy:
                self.close()
                raise
        _end_torn_line(self.fd, self.path)

    def append(self, rows: list[dict], name: str = RESULTS_FILE) -> None:
        if name == RESULTS_FILE:
            append_lines(self.fd, rows)
            return
        if name not in self.extra:
            self.extra[name] = os.open(self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _end_torn_line(self.extra[name], self.dir / name)
        if rows:
            append_lines(self.extra[name], rows)

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


def _end_torn_line(fd: int, path: Path) -> None:
    # Another writer shares the folder, so a torn line cannot be moved: end it, so that our
    # first row starts on a fresh line. It stays in place, and the reader reports it.
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(fd, b"\n")


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def update_meta(out_dir: str | os.PathLike, run_id: str, meta: dict) -> None:
    """Merge one run's metadata into DIR/meta.json (atomic replace; other runs kept)."""
    path = Path(out_dir) / META_FILE
    # Two runs appending to one folder must not lose each other's entries: read-modify-write under a lock.
    with open(Path(out_dir) / ".meta.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _update_meta_locked(path, run_id, meta)


@contextlib.contextmanager
def signals_deferred():
    """SIGTERM and SIGINT wait until the block ends, then reach their usual handlers.

    For the last status write of a run: a launcher that loses one rank SIGTERMs the others,
    and that signal often lands while a rank is recording its failure; interrupted there,
    the run would stay `running` in meta.json for ever. (Python runs handlers in the main
    thread only, so swapping them there is enough; a thread mask would not be: the kernel
    hands a process's signal to any thread that does not block it.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)  # now: the handler it would have met


def _update_meta_locked(path: Path, run_id: str, meta: dict) -> None:
    doc = {"schema": 1, "runs": {}}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            # Never overwrite what we cannot read: keep it aside and say so.
            aside = path.with_name(f"meta.corrupt-{int(os.path.getmtime(path))}.json")
            os.replace(path, aside)
            print(f"bnbench: warning: {path} was unreadable ({e}); moved to {aside}", file=sys.stderr)
            doc = {"schema": 1, "runs": {}}
    doc.setdefault("runs", {}).setdefault(run_id, {}).update(meta)
    write_json_atomic(path, doc)


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        sha = proc.stdout.strip()
        if proc.returncode != 0 or len(sha) != 40:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import accelerate
    import torch
    import torchvision

    from . import __version__

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "bnbench": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
            "pandas": pd.__version__,
        },
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }


class ResultsProblem(Exception):
    pass


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a JSON-lines file and its problems: bad lines by number, never dropped in silence."""
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
        raise ResultsProblem(f"no {RESULTS_FILE} in {out_dir}")
    rows, problems = read_jsonl(path)
    return pd.DataFrame(rows), problems


def read_instruments(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """DIR/instruments.jsonl as a DataFrame (empty if the folder has none) and its problems."""
    path = Path(out_dir) / INSTRUMENTS_FILE
    if not path.exists():
        return pd.DataFrame(), []
    rows, problems = read_jsonl(path)
    return pd.DataFrame(rows), problems


def read_events(out_dir: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The last event of each unit of a sweep (DIR/units.jsonl), and that file's problems."""
    path = Path(out_dir) / EVENTS_FILE
    if not path.exists():
        return {}, []
    events, problems = read_jsonl(path)
    return {e.get("unit"): e for e in events}, problems
