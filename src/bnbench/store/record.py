"""A run's record in DIR/meta.json: running -> complete / failed / interrupted, never left `running`.

DIR/meta.json      {"runs": {run_id: {config, versions, devices, host, git, ...}}}
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
from pathlib import Path

from ..faults import LOST_PEER, lost_peer
from ..files import write_json_atomic
from .folder import META_FILE
from .provenance import process_alive, process_identity, utcnow

DIED = "died"  # recorded by the next writer for a run whose process ended without recording its end


def update_meta(out_dir: str | os.PathLike, run_id: str, meta: dict, bury: bool = False) -> None:
    """Merge one run's metadata into DIR/meta.json (atomic replace; other runs kept).
    bury: also record as died the runs still `running` whose process is gone (see live_status)."""
    path = Path(out_dir) / META_FILE
    # Two runs appending to one folder must not lose each other's entries: read-modify-write under a lock.
    with open(Path(out_dir) / ".meta.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _update_meta_locked(path, run_id, meta, bury)


def live_status(run: dict) -> str:
    """A run's status as a reader should show it: `running` whose process is gone on this host (SIGKILL,
    OOM, power loss: nothing could record the end) is `died (no process)`."""
    status = run.get("status", "?")
    if status == "running" and process_alive(run) is False:
        return f"{DIED} (no process)"
    return status


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


def _update_meta_locked(path: Path, run_id: str, meta: dict, bury: bool = False) -> None:
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
    if bury:
        for other_id, run in doc.get("runs", {}).items():
            if other_id != run_id and live_status(run).startswith(DIED):
                run.update(status=DIED, error=f"process {run.get('pid')} on {run.get('hostname')} ended without recording "
                                              f"the end of the run (SIGKILL, out of memory, power loss, or a disk too full "
                                              f"to record it); found {utcnow()}")
    doc.setdefault("runs", {}).setdefault(run_id, {}).update(meta)
    write_json_atomic(path, doc)




class RunRecord:
    """One run's entry in meta.json, written by the writing rank only (main=False: a no-op).

    The final status is written with SIGTERM and SIGINT deferred: a launcher that loses one
    rank SIGTERMs the others while they record their own failure.
    """

    def __init__(self, out_dir, run_id: str, main: bool):
        self.out_dir, self.run_id, self.main = out_dir, run_id, main

    def start(self, meta: dict) -> None:
        """The run's first record: status running, the writing process, and the dead runs of the folder buried."""
        if self.main:
            update_meta(self.out_dir, self.run_id, {"status": "running", **meta, **process_identity()}, bury=True)

    def update(self, meta: dict) -> None:
        if self.main:
            update_meta(self.out_dir, self.run_id, meta)

    def finish(self, status: str, **meta) -> None:
        if self.main:
            with signals_deferred():
                update_meta(self.out_dir, self.run_id, {"status": status, "finished": utcnow(), **meta})

    def ended_by(self, error: BaseException) -> None:
        """Record how a run that raised ended: interrupted (Ctrl-C, SIGTERM) or failed."""
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        raw = f"{type(error).__name__}: {error}"
        # gloo's own words for a lost peer (a source line, an address, "GLHF!") say nothing to a reader:
        # the reason in plain words, the raw text beside it.
        why = {"error": LOST_PEER, "detail": raw} if lost_peer(error) else {"error": raw}
        try:
            self.finish(status, **why)
        except OSError as e:  # a full disk: the error that ended the run is the one to report
            print(f"bnbench: warning: could not record status {status!r} in {Path(self.out_dir) / META_FILE}: "
                  f"{e.strerror or e}", file=sys.stderr)
