"""The results folder: its file names, the folder lock, atomic writes, tail repair, moving rows aside.

DIR/.lock          flock: a sweep holds it exclusively, plain runs share it
Rows are only ever moved, never deleted: a torn last line goes to DIR/torn.log,
rows of an abandoned attempt to DIR/superseded/<run_id>.jsonl (and .instruments.jsonl).
"""
from __future__ import annotations

import fcntl
import contextlib
import json
import os
import socket
from pathlib import Path

from ..files import write_atomic
from .provenance import utcnow

RESULTS_FILE = "results.jsonl"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
TORN_LOG = "torn.log"
INSTRUMENTS_FILE = "instruments.jsonl"
EVENTS_FILE = "units.jsonl"  # a sweep's record of each unit: start / done / failed / interrupted
SUPERSEDED_DIR = "superseded"


class FolderBusy(RuntimeError):
    """A results folder is held by another sweep."""


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
                if self._current():
                    return True
                # The file we locked was removed meanwhile (remove_untouched after a refused run): lock the new one.
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                continue
            except BlockingIOError:
                # Brief holders (another run's repair, `bnbench status` probing) let go within ms.
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def _current(self) -> bool:
        """Whether our descriptor is still the file at DIR/.lock (not one unlinked since we opened it)."""
        try:
            return os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

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
        log_path = Path(out_dir) / TORN_LOG
        before = log_path.stat().st_size if log_path.exists() else None
        try:
            with open(log_path, "ab") as log:
                log.write(f"# {utcnow()} {name}:{line_no}, {len(tail)} bytes\n".encode() + tail + b"\n")
                log.flush()
                os.fsync(log.fileno())
        except OSError as e:  # a full disk: torn.log as it was, the torn line still in place (nothing lost)
            with contextlib.suppress(OSError):
                os.truncate(log_path, before) if before is not None else log_path.unlink()
            raise OSError(e.errno, e.strerror, str(log_path)) from e
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


def end_torn_line(fd: int, path: Path) -> None:
    # Another writer shares the folder, so a torn line cannot be moved: end it, so that our
    # first row starts on a fresh line. It stays in place, and the reader reports it.
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(fd, b"\n")




def snapshot(out_dir: str | os.PathLike) -> tuple[Path, frozenset[str] | None]:
    """What a results folder holds before a run: (the outermost folder of its path that does not exist yet,
    or the folder itself; its entries, or None where it does not exist). For remove_untouched."""
    path = Path(out_dir)
    if path.is_dir():
        return path, frozenset(os.listdir(path))
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top, None


def remove_untouched(out_dir: str | os.PathLike, before: tuple[Path, frozenset[str] | None]) -> list[str]:
    """After a run that ended before writing anything (a refusal on a rank, an interrupted set-up): remove
    the empty results file, instruments file and lock it made, and the folders it made, so that a refused
    command leaves nothing behind. Nothing that was there before, nothing once anything else was written
    (meta.json: the run was recorded), and nothing while another process holds the folder. The paths removed."""
    path, (top, entries) = Path(out_dir), before
    try:
        now = set(os.listdir(path))
    except OSError:
        return []
    made = now - (entries or set())
    if not made <= {RESULTS_FILE, INSTRUMENTS_FILE, LOCK_FILE}:
        return []
    removed = []
    try:
        if any((path / name).stat().st_size for name in made - {LOCK_FILE}):
            return []
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644) if LOCK_FILE in now else -1
    except OSError:
        return []
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another run or a sweep uses the folder: what we made may be its too
                return []
        for name in sorted(made):
            with contextlib.suppress(OSError):
                (path / name).unlink()
                removed.append(str(path / name))
    finally:
        if fd >= 0:
            os.close(fd)
    if entries is None:  # the folders this run made, innermost first, each only if empty
        folder = path
        while True:
            try:
                folder.rmdir()
            except OSError:
                break
            removed.append(str(folder))
            if folder == top:
                break
            folder = folder.parent
    return removed
