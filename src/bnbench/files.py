"""Durable files: a write that is whole or not at all, and the one-line message for a disk fault.

Shared by the results folder (store/) and the data cache (train/data.py): stdlib only.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path with data, whole or not at all; a failed write (a full disk) leaves no temporary
    file and raises naming path, not the temporary."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    fsync_dir(path.parent)


# The faults of a disk (full, over quota, read-only, not ours): one line that names the file and what to do.
DISK_FAULTS = {
    errno.ENOSPC: "no space left on device writing {f}: free space there, or write elsewhere (--out DIR)",
    errno.EDQUOT: "disk quota exceeded writing {f}: free space there, or write elsewhere (--out DIR)",
    errno.EROFS: "read-only file system: cannot write {f}; use a writable folder",
    errno.EACCES: "permission denied: {f}",
    errno.EPERM: "operation not permitted: {f}",
}


def disk_fault(e: OSError) -> str | None:
    """The one-line message for a disk fault, None for any other OSError (a bug: keep its traceback)."""
    template = DISK_FAULTS.get(e.errno)
    return template.format(f=e.filename or "the results folder") if template else None


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

