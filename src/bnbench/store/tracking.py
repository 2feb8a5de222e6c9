"""Live curves through Accelerate's trackers: `--log-with tensorboard` (wandb, mlflow, trackio, aim, ...).

The run's Accelerator is made with `log_with` and `project_dir` (the results folder by default);
the main process opens one tracker run per bnbench run (named by its run id, the config as
hyperparameters) and logs every evaluation window: each member's metrics (`bn/seed3/test_acc`), the
mean per variant (`bn/mean/test_acc`) and the throughput, at the window's step. results.jsonl stays
the record; the trackers are for watching.
"""
from __future__ import annotations

from ..config import ConfigError

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def tracker_names() -> list[str]:
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType]


def check_trackers(names: list[str]) -> list[str]:
    """The trackers to use, or a ConfigError before anything runs: unknown, or not installed."""
    from accelerate.tracking import get_available_trackers

    known = tracker_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--log-with: unknown tracker {', '.join(unknown)}; Accelerate's are: {', '.join(known)}")
    have = [str(t.value if hasattr(t, "value") else t) for t in get_available_trackers()]
    if "all" in names:
        if not have:
            raise ConfigError("--log-with all: no tracker is installed here (pip install -e '.[tensorboard]' gives one)")
        return have
    missing = [n for n in names if n not in have]
    if missing:
        raise ConfigError(f"--log-with {', '.join(missing)}: not installed in this environment "
                          f"(pip install {' '.join(missing)}; TensorBoard: pip install -e '.[tensorboard]')")
    return list(dict.fromkeys(names))


def hyperparameters(config: dict) -> dict:
    """The run's config as trackers accept it: numbers, strings and bools (tuples and None as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def scalars(rows: list[dict]) -> dict[str, float]:
    """One window's rows as tracker scalars: every member, each variant's mean over its live members, throughput."""
    out: dict[str, float] = {}
    for r in rows:
        for m in METRICS:
            if r.get(m) is not None:
                out[f"{r['variant']}/seed{r['seed']}/{m}"] = float(r[m])
    for variant in dict.fromkeys(r["variant"] for r in rows):
        live = [r for r in rows if r["variant"] == variant and not r["diverged"]]
        for m in METRICS:
            if live:
                out[f"{variant}/mean/{m}"] = sum(float(r[m]) for r in live) / len(live)
    if rows:
        out["throughput/member_samples_per_s"] = float(rows[0]["samples_per_s"])
    return out


class Live:
    """The trackers of one run on the main process; a no-op without --log-with or on other ranks."""

    def __init__(self, accelerator, run_id: str, config: dict, main: bool):
        self.accelerator = accelerator if main and getattr(accelerator, "log_with", None) else None
        if self.accelerator is not None:
            self.accelerator.trackers = []  # a sweep's in-process units share the accelerator: one run each
            self.accelerator.init_trackers(run_id, config=hyperparameters(config))

    def window(self, rows: list[dict]) -> None:
        if self.accelerator is not None and rows:
            self.accelerator.log(scalars(rows), step=int(rows[0]["step"]))

    def close(self) -> None:
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.accelerator = None
