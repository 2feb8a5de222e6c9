"""bnbench: what batch normalization buys a network, measured.

From Python (api.py; imported on first use, so that `import bnbench` and `bnbench --help` stay quick):
  bnbench.run(config=None, *, out=None, **settings) -> DataFrame   train as `bnbench run`, the run's rows
  bnbench.load(path) -> DataFrame                                   the validated rows of a results folder
  bnbench.sweep(grid_or_path, *, out, executor="local") -> DataFrame   a sweep, from a dict or a file
  bnbench.figures(rows_or_path) -> dict[str, Figure]                 the report's figures, inline in Jupyter
  bnbench.verdict(rows_or_path) -> list[str], bnbench.tables(rows_or_path) -> dict[str, DataFrame]
  bnbench.report(path) -> Path                                       `bnbench report`: the HTML page

Subpackages, by concern (data flows down this list; tests/test_structure.py enforces it):
  train/      data, models, the engine, optimizers, the hand-written step, instruments, memory
  dist/       the process mesh: layout, launching, process groups, cross-process BN
  store/      the results folder: rows, meta, provenance, trackers
  sweeps/     sweep files, the local and SLURM executors
  reporting/  statistics, figures, the HTML report
Top level: config (one declaration per setting), cli, training (training_function), main_job, api.
"""
__version__ = "0.1.0"

API = ("run", "load", "sweep", "figures", "verdict", "tables", "report")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
