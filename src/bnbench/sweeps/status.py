"""What a results folder holds, for a person and for pandas: `bnbench status` and `bnbench export`.

    bnbench status runs/my                # a sweep's units: done / running / failed / left; a folder of runs: each run
    bnbench export runs/my --format parquet

Readers only: they take no lock that a sweep would have to wait for, and they create nothing in the
folder they read (a status of any folder leaves it as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pandas as pd

from ..config import ConfigError
from ..store.folder import LOCK_FILE, META_FILE, RESULTS_FILE, FolderLock
from ..store.record import live_status
from ..store.results import ResultsProblem, done_units, read_events, read_results, refuse_own_file
from .plan import Unit

PLAN_FILE = "plan.json"


def _meta_runs(out: Path) -> dict[str, dict]:
    try:
        runs = json.loads((out / META_FILE).read_text())["runs"]
        return runs if isinstance(runs, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _rows(out: Path):
    try:
        return read_results(out)
    except ResultsProblem as e:  # no rows yet; a file that is there but cannot be read is a problem
        return pd.DataFrame(), ([str(e)] if os.path.lexists(out / RESULTS_FILE) else [])


def unit_table(out: Path, units: list[Unit], running: bool):
    """One row per planned unit: its state, epochs recorded, and why it failed."""
    rows, problems = _rows(out)
    events, event_problems = read_events(out)
    done = done_units(rows, units)
    recorded = rows.groupby("unit")["epoch"].max() if "unit" in rows else pd.Series(dtype=float)
    if any(e.get("event") == "submitted" for e in events.values()):
        from .slurm import queue, shown

        jobs = queue()  # once: SLURM's state of every job
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
        elif last.get("event") == "submitted":
            state, detail, epochs = shown(out, u, last, jobs, running)
        elif last.get("event") == "start" and running:
            state, detail = "running", ""
        elif last.get("event") in ("start", "interrupted"):
            state, detail = "interrupted", "reruns from the start on resume"
        else:
            state, detail = "left", ""
        table.append({"unit": u.index, "state": state, "what": u.label, "procs": f"{u.nproc}x{u.device}",
                      "epochs": f"{epochs}/{u.config.epochs}" if u.config else "-", "id": u.id, "detail": detail or ""})
    return pd.DataFrame(table), problems + event_problems


def status(out: str | os.PathLike) -> int:
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"no results folder {out}")
    running = _sweep_running(out)
    plan_path = out / PLAN_FILE
    if not plan_path.exists():
        return _status_of_runs(out, running)
    try:
        doc = json.loads(plan_path.read_text())
        units = [Unit.from_dict(u) for u in doc["units"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{plan_path} is unreadable ({type(e).__name__}: {e}); rerunning the sweep file into {out} "
                          f"writes it again (rows are kept)") from None
    table, problems = unit_table(out, units, running)
    counts = table["state"].value_counts()
    print(f"sweep {out} ({doc['file']}, planned {doc['created']}): {len(table)} units; "
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "queued", "running", "submitted", "ended", "failed",
                                                                "interrupted", "left", "diverged")
                      if counts.get(s, 0) or s in ("done", "left", "failed")))
    if running:
        print(f"  a sweep holds the folder now: {FolderLock(out).holder()}")
    print(table.drop(columns=["id"]).to_string(index=False))
    _print_problems(problems)
    return 0


def _sweep_running(out: Path) -> bool:
    if not os.path.lexists(out / LOCK_FILE):
        return False  # no sweep ever held it (a sweep makes the lock file first); and none is made here
    try:
        with FolderLock(out) as lock:
            return lock.is_held()
    except OSError:
        return False


def _status_of_runs(out: Path, running: bool) -> int:
    """A folder of plain `bnbench run`s: each run's status and rows."""
    rows, problems = _rows(out)
    meta = {}
    if (out / META_FILE).exists():
        try:
            meta = json.loads((out / META_FILE).read_text())["runs"]
        except (ValueError, KeyError, TypeError) as e:
            problems = problems + [f"{out / META_FILE}: unreadable ({type(e).__name__}: {e}); runs' status unknown "
                                   f"(the next run into the folder moves it aside and starts a new one)"]
    if not isinstance(meta, dict):
        meta = {}
    # Every run of the rows too, where meta.json does not know it (the report lists them as well).
    ids = sorted(set(meta) | (set(rows["run_id"].dropna().astype(str)) if "run_id" in rows else set()))
    table = []
    for rid in ids:
        m = meta.get(rid) if isinstance(meta.get(rid), dict) else {}
        mine = rows[rows["run_id"] == rid] if "run_id" in rows else rows.iloc[:0]
        recorded = mine["epoch"].max() if len(mine) and "epoch" in mine else 0
        configured = (m.get("config") or {}).get("epochs", "?") if isinstance(m.get("config"), dict) else "?"
        table.append({"run_id": rid, "status": live_status(m) if m else "not in meta.json", "rows": len(mine),
                      "epochs": f"{recorded:g}/{configured}", "error": m.get("error", "")})
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
    dest = Path(dest) if dest else out / f"results.{fmt}"
    refuse_own_file(dest, "--out")  # an export never writes over what it reads, nor any folder's own file
    if dest.is_dir():
        raise ConfigError(f"--out {dest} is a folder: give a file to write, e.g. {dest / f'results.{fmt}'}")
    if not dest.parent.is_dir():
        raise ConfigError(f"--out {dest}: there is no folder {dest.parent} to write it in")
    try:
        rows, problems = read_results(out)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    for p in problems:
        print(f"bnbench: warning: {p} (not exported)", file=sys.stderr)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        if fmt == "csv":
            rows.to_csv(tmp, index=False)
        else:
            rows.to_parquet(tmp, index=False)
        os.replace(tmp, dest)
    except OSError as e:
        if e.errno is None:  # pandas' own refusals carry no errno
            raise ConfigError(f"cannot write {dest}: {e}") from None
        raise OSError(e.errno, e.strerror, str(dest)) from e
    except Exception as e:  # pyarrow refuses a column of mixed types that the row checks let through
        raise ConfigError(f"cannot write {dest}: {type(e).__name__}: {e}; --format csv takes any column") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return dest
