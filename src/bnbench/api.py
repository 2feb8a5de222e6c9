"""bnbench from Python: what the command line does, as functions that return data.

    import bnbench
    rows = bnbench.run(seeds="0-4", epochs=15)          # bnbench run: rows as a DataFrame, written to runs/<time>
    rows = bnbench.load("runs/lab")                     # validated rows of a results folder
    rows = bnbench.sweep({"fixed": {...}, "grid": {...}}, out="runs/grid")  # bnbench sweep
    figs = bnbench.figures("runs/lab")                  # {"final_accuracy": Figure, "learning_curves": ...}
    bnbench.verdict(rows), bnbench.tables(rows)         # the report's verdict and tables, from rows or a folder
    page = bnbench.report("runs/lab")                   # bnbench report: the HTML page's path

Settings go by the command line's names (batch_size for --batch-size) and are read as the command line
reads them: bnbench.run(lr="fast") raises ConfigError("argument --lr: expected a positive number, got
'fast'"), the line `bnbench run --lr fast` prints. Every error of bad input is one such exception, raised
from here (no traceback through bnbench's machinery). Figures are made without pyplot, in a style context:
the caller's backend, rcParams and seaborn theme stay as they were; in Jupyter each shows itself inline.
Progress is tqdm.auto's: a widget in a notebook (with ipywidgets), a bar on a terminal.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from .config import Config, ConfigError, run_argv

__all__ = ["run", "load", "sweep", "figures", "verdict", "tables", "report", "RowsWarning"]


class RowsWarning(UserWarning):
    """Rows left out of a folder (bad lines, by number), or a sweep with failed units: said, not raised."""


def _one_line(fn):
    """Bad input and faults of the world as the command line says them: one line, in an exception raised here."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        from .dist.launch import LaunchError
        from .files import disk_fault
        from .store.folder import FolderBusy

        try:
            return fn(*args, **kwargs)
        except (ConfigError, LaunchError, FolderBusy) as e:
            raise type(e)(str(e)) from None
        except OSError as e:
            fault = disk_fault(e)
            if fault is None:
                raise
            error = OSError(fault)
            error.errno = e.errno
            raise error from None

    return call


# -- run ---------------------------------------------------------------------------------------------
def _run_parser() -> argparse.ArgumentParser:
    """`bnbench run`'s parser, with its errors raised as ConfigError instead of printed with an exit."""
    from . import cli

    parser = cli.build_parser()._subparsers._group_actions[0].choices["run"]

    def error(message):
        raise ConfigError(message)

    parser.error = error
    parser.allow_abbrev = False
    return parser


def _text(value) -> str:
    """A Python value as the command line spells it: 0.001, 0,3,7, 32,32."""
    if isinstance(value, (list, tuple, range)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _argv(parser: argparse.ArgumentParser, settings: dict) -> list[str]:
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "out")}
    argv = []
    for name, value in settings.items():
        key = name.replace("-", "_")
        flag = "--" + key.replace("_", "-")
        if key not in options:
            raise ConfigError(f"unrecognized arguments: {flag} {_text(value)}")
        if value is None:
            continue
        action = options[key]
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"argument {flag}: expected True or False, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        else:
            argv.append(f"{flag}={_text(value)}")
    return argv


_SETUPS: dict = {}  # accelerator and loaded data, reused by the runs of one Python process


def _setup(cfg: Config, a):
    from .store.tracking import check_trackers
    from .training import Setup

    trackers = check_trackers(a.log_with.split(",")) if a.log_with else None
    if trackers:
        return Setup(data_root=a.data_root, dist_timeout=a.dist_timeout, log_with=trackers,
                     logging_dir=a.logging_dir or str(a.out))
    key = (cfg.cpu, a.data_root, a.dist_timeout)
    if key not in _SETUPS:
        _SETUPS[key] = Setup(data_root=a.data_root, dist_timeout=a.dist_timeout)
    return _SETUPS[key]


@_one_line
def run(config: Config | str | None = None, *, out=None, **settings):
    """Train as `bnbench run` does; return the run's rows (a pandas DataFrame), written to `out`/results.jsonl.

    config: a Config (bnbench.config.make_config), a preset's name, or None (the lab: preset "seed").
    settings: the command line's options by name, with _ for - (seeds="0-4" or [0, 1], batch_size=6000,
    hidden=(64, 64), sync_bn=True, data_root=..., quiet=True, report=True); they override config's.
    out: the results folder (default runs/<UTC time>), written exactly as the command line writes it.
    The rows carry attrs["out"] and attrs["run_id"].

    >>> import tempfile, bnbench
    >>> folder = tempfile.mkdtemp()
    >>> rows = bnbench.run(seeds=[0, 1], epochs=1, batch_size=6000, out=folder, quiet=True)
    >>> rows.groupby("variant")["seed"].count().to_dict()
    {'bn': 2, 'nobn': 2}
    >>> rows[["epoch", "test_total"]].max().tolist(), rows.attrs["out"] == folder
    ([1, 10000], True)
    >>> bnbench.run(lr="fast")
    Traceback (most recent call last):
    bnbench.config.ConfigError: argument --lr: expected a positive number, got 'fast'
    >>> bnbench.run(speed=3)
    Traceback (most recent call last):
    bnbench.config.ConfigError: unrecognized arguments: --speed 3
    """
    from . import cli, versions
    from .dist.launch import launched_rank, launched_world
    from .store.results import read_results
    from .training import training_function

    parser = _run_parser()
    head = run_argv(config) if isinstance(config, Config) else ["--preset", config] if isinstance(config, str) else []
    if config is not None and not isinstance(config, (Config, str)):
        raise ConfigError(f"config: a Config (bnbench.config.make_config), a preset's name or None, got {config!r}")
    a = parser.parse_args(head + _argv(parser, settings))
    versions.check()
    cfg = cli.config_from_args(a)
    a.out = Path(out if out is not None else f"runs/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    world = launched_world()
    device = None
    if world == 1:  # alone: this process trains, on the device Accelerate will choose (as cli.cmd_run)
        import torch

        device = "cpu" if cfg.cpu or not torch.cuda.is_available() else torch.device("cuda")
    cli.preflight(a, cfg, a.out, world, 1, device)  # the command line's checks, before any folder or process
    setup = _setup(cfg, a)
    run_id = training_function(cfg, a.out, setup, quiet=a.quiet)
    if launched_world() > 1:
        setup.accelerator.end_training()
    if launched_rank() != 0:
        import pandas as pd

        return pd.DataFrame()  # rank 0 wrote the rows and returns them
    if a.report:
        report(a.out)
    rows, _ = read_results(a.out)
    rows = rows[rows["run_id"] == run_id].reset_index(drop=True)
    rows.attrs.update(out=str(out) if out is not None else str(a.out), run_id=run_id)
    return rows


# -- load ----------------------------------------------------------------------------------------------
@_one_line
def load(path):
    """The validated rows of a results folder (or of its results.jsonl) as a pandas DataFrame.

    Lines that are not valid rows are left out and said, as `bnbench export` says them: one RowsWarning
    each ("bnbench: warning: results.jsonl:13: ... (left out)"), and listed in attrs["problems"]. A path
    that is not a results folder: ConfigError, the line `bnbench report` prints.

    >>> import bnbench
    >>> bnbench.load("/nonexistent")
    Traceback (most recent call last):
    bnbench.config.ConfigError: no results.jsonl in /nonexistent
    """
    from .store.folder import RESULTS_FILE
    from .store.results import ResultsProblem, read_results

    folder = Path(path)
    if folder.name == RESULTS_FILE and folder.is_file():
        folder = folder.parent
    try:
        rows, problems = read_results(folder)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    for p in problems:
        warnings.warn(f"bnbench: warning: {p} (left out)", RowsWarning, stacklevel=3)
    rows.attrs["problems"] = problems
    return rows


# -- sweep ---------------------------------------------------------------------------------------------
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(k) -> str:
    k = str(k)
    return k if _BARE.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def _toml(value, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, (list, tuple, range)):
        return "[" + ", ".join(_toml(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v, f'{where}.{k}')}" for k, v in value.items()) + "}"
    raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) has no place in a sweep file: give strings, "
                      f"numbers, true/false, lists or tables")


def sweep_file(grid: Mapping) -> str:
    """A dict shaped like a sweep file ({"sweep": {...}, "fixed": {...}, "grid": {...}}) as its TOML text.

    >>> print(sweep_file({"fixed": {"epochs": 1, "seeds": "0-1"}, "grid": {"lr": [1e-3, 1e-2]}}), end="")
    [fixed]
    epochs = 1
    seeds = "0-1"
    <BLANKLINE>
    [grid]
    lr = [0.001, 0.01]
    """
    if not isinstance(grid, Mapping):
        raise ConfigError(f"a sweep is a dict shaped like a sweep file ({{'fixed': {{...}}, 'grid': {{...}}}}) or a "
                          f"sweep file's path, got {type(grid).__name__}")
    loose = [f"{_key(k)} = {_toml(v, str(k))}" for k, v in grid.items() if not isinstance(v, Mapping)]
    tables = [f"[{_key(k)}]\n" + "".join(f"{_key(n)} = {_toml(v, f'{k}.{n}')}\n" for n, v in t.items())
              for k, t in grid.items() if isinstance(t, Mapping)]
    return "".join(line + "\n" for line in loose) + "\n".join(tables)


@_one_line
def sweep(grid_or_path, *, out, executor: str = "local", quiet: bool = False, data_root=None, max_units=None):
    """Run a sweep as `bnbench sweep` does, into `out`; return every row of the folder (load(out)).

    grid_or_path: a sweep file's path, or a dict shaped like one ({"fixed": {...}, "grid": {...}}, the keys
    of `bnbench sweep --example`); a dict is written to out/sweep.toml, so that `bnbench sweep
    out/sweep.toml --out out` resumes it. Done units are skipped, as on the command line. A failed unit
    (or one whose every member diverged) is said in a RowsWarning, with `bnbench status` to list it.

    >>> import tempfile, bnbench
    >>> folder = tempfile.mkdtemp()
    >>> grid = {"fixed": {"epochs": 1, "seeds": "0", "batch_size": 6000}, "grid": {"lr": [1e-3, 1e-2]}}
    >>> rows = bnbench.sweep(grid, out=folder, quiet=True)  # doctest: +ELLIPSIS
    sweep ...: 2 of 2 units done (2 now), 0 failed, 0 with every member diverged
    results: ...
    >>> sorted(rows["lr"].unique().tolist())
    [0.001, 0.01]
    """
    from .files import write_atomic
    from .store.results import refuse_own_file
    from .sweeps.runner import run_sweep, sweep_folder

    out = Path(out)
    if executor not in ("local", "slurm"):
        raise ConfigError(f"executor: unknown executor {executor!r}; valid: local, slurm")
    if isinstance(grid_or_path, (str, os.PathLike)):
        path = Path(grid_or_path)
    else:
        text = sweep_file(grid_or_path)
        refuse_own_file(out, "out")
        with sweep_folder(out):  # a sweep that holds the folder keeps its own copy of its file
            path = out / "sweep.toml"
            write_atomic(path, text.encode())
    rc = run_sweep(path, out=out, quiet=quiet, data_root=data_root, max_units=max_units, executor=executor)
    if rc:
        warnings.warn(f"sweep {out}: a unit failed, or every member of one diverged (bnbench status {out} lists "
                      f"them; rerun the sweep to retry failed units)", RowsWarning, stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RowsWarning)  # the sweep said its problem lines already
        return load(out)


# -- figures and the report ------------------------------------------------------------------------------
@_one_line
def figures(rows_or_path, *, target: float | None = None) -> dict:
    """The report's figures, by name, as matplotlib Figures: from a results folder, or from rows (a
    DataFrame as run, load or sweep return; then without the inside-the-network figures, which read the
    folder's instruments.jsonl). In Jupyter each shows itself inline (a cell that ends with it, or
    display()); fig.savefig(...) writes it. Each figure is drawn only where its axis has two points or
    more (one epoch: no learning curves). Made without pyplot, inside a style context: the caller's
    backend, rcParams and seaborn theme stay as they were.

    >>> import tempfile, bnbench, matplotlib
    >>> folder = tempfile.mkdtemp()
    >>> rows = bnbench.run(seeds=[0], epochs=2, batch_size=6000, out=folder, quiet=True)
    >>> before = dict(matplotlib.rcParams)
    >>> figs = bnbench.figures(rows)
    >>> sorted(figs)
    ['final_accuracy', 'learning_curves']
    >>> dict(matplotlib.rcParams) == before
    True
    >>> figs["learning_curves"]._repr_png_()[:4]
    b'\\x89PNG'
    """
    from .reporting.report import figures as draw

    return draw(_source(rows_or_path, "figures"), _target(target))


def _source(rows_or_path, what: str):
    if not isinstance(rows_or_path, (str, os.PathLike)) and not hasattr(rows_or_path, "columns"):
        raise ConfigError(f"{what}: a results folder or rows (a DataFrame), got {type(rows_or_path).__name__}")
    return rows_or_path


def _target(target: float | None) -> float:
    from .reporting.report import DEFAULT_TARGET

    target = DEFAULT_TARGET if target is None else target
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be a test accuracy in (0, 1], got {target}")
    return target


@_one_line
def verdict(rows_or_path, *, target: float | None = None) -> list[str]:
    """The report's verdict, a sentence per configuration: BN - no-BN in final test accuracy over paired
    seeds, with its interval and p-values from 3 seeds up, from a results folder or from rows.

    >>> import pandas as pd, bnbench
    >>> rows = pd.DataFrame([dict(run_id="r", variant=v, seed=s, epoch=1, test_acc=a + s / 1000, diverged=False)
    ...                      for v, a in (("bn", 0.97), ("nobn", 0.96)) for s in range(2)])
    >>> bnbench.verdict(rows)  # doctest: +ELLIPSIS
    ['...: BN - no-BN = +1.00 pp over 2 paired seeds: too few for an interval or a p-value (at least 3 needed; run more seeds).']
    """
    from .reporting.report import verdict as said

    return said(_source(rows_or_path, "verdict"), _target(target))


@_one_line
def tables(rows_or_path, *, target: float | None = None) -> dict:
    """The report's tables as it shows them (pandas DataFrames; in Jupyter, HTML tables), by name:
    configurations (several only), final_accuracy, paired_difference, time_to_target, throughput (several
    layouts only); from a results folder or from rows.

    >>> import pandas as pd, bnbench
    >>> rows = pd.DataFrame([dict(run_id="r", variant=v, seed=s, epoch=1, test_acc=a + s / 1000, diverged=False)
    ...                      for v, a in (("bn", 0.97), ("nobn", 0.96)) for s in range(2)])
    >>> t = bnbench.tables(rows)
    >>> sorted(t)
    ['final_accuracy', 'paired_difference']
    >>> print(t["paired_difference"].to_string(index=False))
     seed epoch  with BN  without BN BN - no-BN (pp)
        0     1    0.970       0.960           +1.00
        1     1    0.971       0.961           +1.00
    """
    from .reporting.report import tables as shown

    return shown(_source(rows_or_path, "tables"), _target(target))


@_one_line
def report(path, *, target: float | None = None, baseline: str | None = None) -> Path:
    """Build the report of a results folder as `bnbench report` does; return the path of report.html.
    baseline: the variant every other is compared with (default nobn where present, else the first).

    >>> import bnbench
    >>> bnbench.report("/nonexistent")
    Traceback (most recent call last):
    bnbench.config.ConfigError: no results.jsonl in /nonexistent
    """
    from .reporting.report import build_report

    return build_report(path, target=_target(target), baseline=baseline)
