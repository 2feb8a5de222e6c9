"""Results: one JSON line per member per epoch, appended durably; run metadata beside it.

DIR/results.jsonl  rows (pandas: pd.read_json(path, lines=True, precise_float=True))
DIR/meta.json      {"runs": {run_id: {config, versions, devices, host, git, ...}}}
Each epoch's rows go out in ONE os.write on an O_APPEND descriptor followed by
fsync, so a crash loses at most the epoch in flight and never interleaves lines.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd

from .config import ConfigError

RESULTS_FILE = "results.jsonl"
META_FILE = "meta.json"

# The row schema: column -> meaning. The README's table is this dict.
SCHEMA: dict[str, str] = {
    "run_id": "one invocation of `bnbench run`; keys meta.json",
    "preset": "preset the config started from",
    "dataset": "mnist / fashion-mnist",
    "variant": "bn (BatchNorm1d after each hidden Linear) / nobn",
    "seed": "init and data-order seed; bn and nobn of one seed share both",
    "epoch": "1-based epoch just completed",
    "step": "optimizer steps taken by this member so far",
    "train_loss": "mean cross-entropy over ALL training samples, eval mode (running stats), after the epoch",
    "train_acc": "correct / total over ALL training samples, eval mode",
    "test_loss": "mean cross-entropy over ALL test samples (10,000 for MNIST), eval mode",
    "test_acc": "correct / total over ALL test samples, eval mode",
    "train_correct": "training samples classified correctly (eval mode)",
    "train_total": "training samples scored (all of them: 60,000 for MNIST)",
    "test_correct": "test samples classified correctly",
    "test_total": "test samples scored (all of them: 10,000 for MNIST)",
    "train_loss_running": "mean mini-batch loss during the epoch (train mode)",
    "train_seconds": "wall time of the epoch's training steps, evaluation excluded (CUDA synchronised)",
    "samples_per_s": "member-samples per second in the epoch, all processes together: members x samples / train_seconds",
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
    "compile": "units stepped through torch.compile (--compile); compile time is in meta.json",
    "tf32": "TF32 matmuls allowed on the GPU (--tf32); off by default",
    "time": "UTC time the row was written (ISO 8601)",
    "bnbench_version": "package version",
    "torch_version": "torch.__version__",
    "git_commit": "commit of the bnbench checkout ('+dirty' if modified), or 'unknown'",
}


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value):
    """JSON has no NaN/inf: a non-finite float becomes null (the row says diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsWriter:
    """Append-only, fsync'd results file. Opening it proves the folder is writable."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / RESULTS_FILE
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            probe = self.dir / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")  # meta.json needs create+rename in the folder too
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output folder {self.dir} cannot be written: {e.strerror or e}") from None
        self._repair_tail()

    def _repair_tail(self) -> None:
        # A crash mid-write can leave a last line without its newline; end it so that
        # our first row starts on a fresh line. The torn line stays, and the reader reports it.
        size = os.fstat(self.fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, rows: list[dict]) -> None:
        data = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, allow_nan=False) + "\n" for r in rows)
        os.write(self.fd, data.encode())
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def update_meta(out_dir: str | os.PathLike, run_id: str, meta: dict) -> None:
    """Merge one run's metadata into DIR/meta.json (atomic replace; other runs kept)."""
    import fcntl

    path = Path(out_dir) / META_FILE
    # Two runs appending to one folder must not lose each other's entries: read-modify-write under a lock.
    with open(Path(out_dir) / ".meta.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _update_meta_locked(path, run_id, meta)


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


def read_results(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """All rows of DIR/results.jsonl and a list of problems (bad lines by number).

    A line that does not parse is never dropped in silence: it is reported with its
    line number, and a torn last line (crash mid-write) is called that.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        raise ResultsProblem(f"no {RESULTS_FILE} in {out_dir}")
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
    return pd.DataFrame(rows), problems
