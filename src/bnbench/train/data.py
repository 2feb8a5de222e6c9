"""Data: the four IDX files of MNIST / Fashion-MNIST, verified, cached, resident.

Files are recognised by the MD5 of their *decompressed* content, so any
gzip of the original bytes is accepted (Debian recompresses Fashion-MNIST,
which changes the .gz checksum but not the content). The data root is only
ever read; the parsed uint8 tensors are cached under BNBENCH_CACHE.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..files import write_atomic


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without .gz
    md5: str  # MD5 of the decompressed content
    nbytes: int  # decompressed size
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    torchvision_class: str  # also the folder name torchvision uses: ROOT/<class>/raw/
    files: dict[str, IdxFile]  # role -> file; roles: train_x, train_y, test_x, test_y
    system_dirs: tuple[str, ...] = ()  # where distributions install the files


def _files(md5s: dict[str, str]) -> dict[str, IdxFile]:
    layout = {
        "train_x": ("train-images-idx3-ubyte", (60000, 28, 28)),
        "train_y": ("train-labels-idx1-ubyte", (60000,)),
        "test_x": ("t10k-images-idx3-ubyte", (10000, 28, 28)),
        "test_y": ("t10k-labels-idx1-ubyte", (10000,)),
    }
    out = {}
    for role, (name, shape) in layout.items():
        header = 4 + 4 * len(shape)
        n = 1
        for s in shape:
            n *= s
        out[role] = IdxFile(name, md5s[role], header + n, shape)
    return out


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        _files(
            {
                "train_x": "6bbc9ace898e44ae57da46a324031adb",
                "train_y": "a25bea736e30d166cdddb491f175f624",
                "test_x": "2646ac647ad5339dbf082846283269ea",
                "test_y": "27ae3e4e09519cfbb04c329615203637",
            }
        ),
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "FashionMNIST",
        _files(
            {
                "train_x": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "train_y": "9018921c3c673c538a1fc5bad174d6f9",
                "test_x": "8181f5470baa50b63fa0f6fddb340f0a",
                "test_y": "15d484375f8d13e6eb1aabb0c3f46965",
            }
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian: dataset-fashion-mnist
    ),
}


class DataError(ConfigError):
    """A data file is missing, corrupt or not the expected one."""


def cache_dir() -> Path:
    env = os.environ.get("BNBENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "bnbench"


def data_root_from_env() -> Path | None:
    env = os.environ.get("BNBENCH_DATA_ROOT")
    return Path(env) if env else None


def candidate_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    """Where one root may hold the files: flat, torchvision's NAME/raw/, or NAME/."""
    return [root, root / spec.torchvision_class / "raw", root / spec.torchvision_class]


def _find(spec: DatasetSpec, dirs: list[Path], role: str) -> Path | None:
    name = spec.files[role].name
    for d in dirs:
        for candidate in (d / name, d / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _read_content(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip stream ({e}); the file is corrupt or truncated") from None
    return raw


def verify(path: Path, expected: IdxFile) -> bytes:
    """The decompressed content of path, or a DataError naming what is wrong."""
    content = _read_content(path)
    if len(content) != expected.nbytes:
        raise DataError(
            f"{path}: expected {expected.name} with {expected.nbytes:,} bytes of content, "
            f"found {len(content):,} (truncated or a different file)"
        )
    digest = hashlib.md5(content).hexdigest()
    if digest != expected.md5:
        raise DataError(
            f"{path}: content MD5 is {digest}, expected {expected.md5} for {expected.name}; "
            "the file is corrupt or belongs to another dataset"
        )
    return content


def parse_idx(content: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    # IDX: 2 zero bytes, type 0x08 (uint8), number of dims, then big-endian int32 sizes.
    ndim = len(shape)
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if content[:4] != bytes([0, 0, 8, ndim]) or dims != shape:
        raise DataError(f"IDX header says dims {dims}, expected {shape}")
    return torch.frombuffer(bytearray(content[header:]), dtype=torch.uint8).reshape(shape)


def _stamp(paths: dict[str, Path]) -> dict:
    return {role: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for role, p in paths.items()}


def _idx_md5(t: torch.Tensor) -> str:
    """MD5 of the IDX content a uint8 tensor holds (header + bytes): what the dataset's published MD5
    covers, so a cached tensor is checked against the files it was made from (~0.1 s for MNIST)."""
    h = hashlib.md5(bytes([0, 0, 8, t.dim()]) + b"".join(n.to_bytes(4, "big") for n in t.shape))
    h.update(t.contiguous().numpy())
    return h.hexdigest()


def _cached(spec: DatasetSpec, tensors_file: Path, stamp_file: Path, stamp: dict) -> dict[str, torch.Tensor] | None:
    """The cached tensors when they were made from these files and still hold their content; else None."""
    try:
        if json.loads(stamp_file.read_text()) != stamp:
            return None  # other files, or a changed one: rebuild in silence
    except (OSError, ValueError):
        return None  # no cache yet
    try:
        t = torch.load(tensors_file, weights_only=True)
        bad = [role for role, f in spec.files.items()
               if role not in t or t[role].dtype != torch.uint8 or tuple(t[role].shape) != f.shape or _idx_md5(t[role]) != f.md5]
        why = f"its {', '.join(bad)} differ from the files it was made from (checksum)" if bad else ""
    except Exception as e:  # a torn or foreign file: torch raises RuntimeError, pickle and zip errors
        why = f"it does not load ({type(e).__name__})"
    if not why:
        return t
    print(f"bnbench: data cache {tensors_file}: {why}; rebuilt from the verified files", file=sys.stderr)
    return None


def _write_cache(cache: Path, tensors_file: Path, stamp_file: Path, tensors: dict, stamp: dict) -> None:
    """Best effort, through the folder's atomic write (whole or not at all, no temporary file left):
    a full or unwritable cache only costs speed."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        write_atomic(tensors_file, buffer.getvalue())
        write_atomic(stamp_file, json.dumps(stamp).encode())  # last: the stamp vouches for the tensors
    except Exception as e:  # OSError, or whatever torch raises
        print(f"bnbench: data cache not written in {cache} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
              f"running without it", file=sys.stderr)


def _load_verified(spec: DatasetSpec, paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Parse (and cache) the four files; a cache hit needs the same files, size and mtime, and content
    whose checksum is the dataset's."""
    cache = cache_dir() / spec.key
    tensors_file, stamp_file = cache / "tensors.pt", cache / "source.json"
    stamp = _stamp(paths)
    cached = _cached(spec, tensors_file, stamp_file, stamp)
    if cached is not None:
        return cached
    tensors = {role: parse_idx(verify(p, spec.files[role]), spec.files[role].shape) for role, p in paths.items()}
    _write_cache(cache, tensors_file, stamp_file, tensors, stamp)
    return tensors


def _download(spec: DatasetSpec, into: Path) -> None:
    import torchvision.datasets as tvd

    getattr(tvd, spec.torchvision_class)(root=str(into), train=True, download=True)
    getattr(tvd, spec.torchvision_class)(root=str(into), train=False, download=True)


def locate(dataset: str, data_root: str | os.PathLike | None = None, download: bool = True) -> dict[str, Path]:
    """Paths of the four verified files; downloads into the cache when none are local."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    explicit = Path(data_root) if data_root is not None else data_root_from_env()
    # The named root first, then what bnbench downloaded, then distribution packages;
    # every candidate is checked by content, so a wrong file is an error, never skipped.
    roots = ([explicit] if explicit is not None else []) + [cache_dir() / "downloads", *map(Path, spec.system_dirs)]
    dirs = [d for r in roots for d in candidate_dirs(spec, r)]
    found = {role: _find(spec, dirs, role) for role in spec.files}
    if all(found.values()):
        return found  # type: ignore[return-value]
    if explicit is None and download:
        try:
            _download(spec, cache_dir() / "downloads")
        except Exception as e:  # offline, proxy, disk: all end in the same advice
            reason = f"download failed: {type(e).__name__}: {e}"
        else:
            return locate(dataset, None, download=False)
    else:
        # A root the user named should hold the files: no silent download elsewhere.
        reason = "download not attempted: a data root was given" if explicit is not None else "download disabled"
    missing = [spec.files[r].name + "[.gz]" for r, p in found.items() if p is None]
    raise DataError(
        f"{dataset}: missing {', '.join(missing)}\n"
        f"  looked in: {', '.join(str(d) for d in dirs)}\n"
        f"  {reason}\n"
        f"  fix: put the four IDX files (gzipped or not) in a folder, flat or as "
        f"{spec.torchvision_class}/raw/, and pass --data-root DIR or set BNBENCH_DATA_ROOT=DIR"
    )


@dataclass
class Splits:
    """Both splits resident on one device: inputs scaled to [0, 1] like ToTensor, labels int64."""

    train_x: torch.Tensor  # [60000, 784]
    train_y: torch.Tensor  # [60000]
    test_x: torch.Tensor  # [10000, 784]
    test_y: torch.Tensor  # [10000]
    sources: dict[str, str]


def load(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    download: bool = True,
) -> Splits:
    paths = locate(dataset, data_root, download=download)
    t = _load_verified(DATASETS[dataset], paths)

    def x(u8: torch.Tensor) -> torch.Tensor:
        # ToTensor divides uint8 by 255 in float32; do the same, then widen if asked.
        # Moved as uint8 (4x less to copy), converted on the device: one float copy, held there.
        return (u8.reshape(u8.shape[0], -1).to(device).to(torch.float32) / 255).to(dtype)

    return Splits(
        x(t["train_x"]),
        t["train_y"].long().to(device),
        x(t["test_x"]),
        t["test_y"].long().to(device),
        {role: str(p) for role, p in paths.items()},
    )
