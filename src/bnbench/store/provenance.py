"""Provenance: what every run records about where and from what it ran (host, versions, git, CPU)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    import pandas as pd
    import torch
    import torchvision

    from .. import __version__

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




def process_identity(pid: int | None = None) -> dict:
    """pid and its start time (clock ticks since boot, Linux): with the host, a record of which process
    wrote a run that survives pid reuse, so a reader can tell a live run from a killed one."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "pid_start": _start_ticks(pid)}


def _start_ticks(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, counted after the command name


def process_alive(record: dict) -> bool | None:
    """Whether the process that wrote a record still runs: None when it cannot be told from here
    (another host, or a record without a pid)."""
    if record.get("hostname") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    start = _start_ticks(record["pid"])
    if start is None:
        return False
    return record.get("pid_start") in (None, start)
