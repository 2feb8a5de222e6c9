"""Which rows the report reads: configurations, members, and per (config, variant, seed) the run it uses.

Per configuration, variant and seed the accuracy statistics read one member: the latest complete run
or sweep unit; where none is complete, the one that got furthest (then the latest), its rows marked
complete=False. Repeats (repeat > 0) train the same numbers again and are left out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Config, row_settings


# What makes two rows the same experiment (apart from variant, seed and repeat): every setting
# that is a row column (config.py declares them), and where it ran.
def config_keys(cls=Config) -> list[str]:
    return [k for k in row_settings(cls) if k != "repeat"] + ["world_size", "device"]


CONFIG_KEYS = config_keys()
MEMBER = ["config", "variant", "seed"]  # what one result is of; a run_id says which attempt gave it


def varying_keys(df: pd.DataFrame) -> list[str]:
    """The config columns whose value differs between rows of df."""
    return [k for k in CONFIG_KEYS if k in df and df[k].astype(str).nunique() > 1]


def config_label(df: pd.DataFrame) -> pd.Series:
    """A short label per row built only from the config columns that vary in df."""
    keys = varying_keys(df)
    if not keys:
        # One configuration: name its main settings so a figure stands on its own.
        r = df.iloc[0]
        parts = [str(r.get("dataset", "")), f"hidden {r.get('hidden', '?')} {r.get('activation', '')}",
                 f"{r.get('optimizer', '')} lr {r.get('lr', '?')}", f"batch {r.get('batch_size', '?')}"]
        return pd.Series(", ".join(p for p in parts if p.strip()), index=df.index)
    return df[keys].astype(str).apply(lambda r: ", ".join(f"{k}={v}" for k, v in zip(keys, r)), axis=1)


def _order_value(v):
    """Settings' values in their own order: numbers as numbers (1e-05 before 0.0001), then text."""
    if isinstance(v, (bool, np.bool_)):
        return (1, str(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return (0, float(v)) if np.isfinite(v) else (2, str(v))
    return (1, "" if v is None else str(v))


def config_ids(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of df (its `config` column): id C1, C2, ... in the order of the varying
    settings' values, the label, and each varying setting's value."""
    keys = varying_keys(df)
    firsts = df.drop_duplicates("config")[["config", *keys]]
    order = sorted(firsts.itertuples(index=False), key=lambda r: [_order_value(v) for v in r[1:]] + [r[0]])
    return pd.DataFrame([{"id": f"C{i}", "config": r[0], **dict(zip(keys, r[1:]))} for i, r in enumerate(order, 1)],
                        columns=["id", "config", *keys])


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Rows as the report reads them: `diverged` a bool (absent: False), `config` the configuration's label."""
    df = df.copy()
    df["diverged"] = df["diverged"].fillna(False).astype(bool) if "diverged" in df else False
    df["config"] = config_label(df)
    return df


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each member's last recorded epoch (a member = run_id, variant, seed)."""
    df = df.sort_values("epoch")
    return df.groupby(["run_id", "variant", "seed"], as_index=False).tail(1).reset_index(drop=True)


def member_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every member (run_id, variant, seed) of the rows, repeat 0: its config, the last epoch it recorded,
    the epochs it was to train (planned_epochs), whether it got there (complete), when it last wrote,
    and whether the report uses it (used: see accuracy_rows)."""
    if "repeat" in df:  # a repeat trains the same numbers again: counting it twice would shrink every interval
        df = df[df["repeat"].fillna(0) == 0]
    d = df.assign(_order=np.arange(len(df)), _time=df["time"].fillna("").astype(str) if "time" in df else "",
                  _planned=df["epochs"].astype(float) if "epochs" in df else np.nan)
    m = d.groupby([*MEMBER, "run_id"], sort=False).agg(last_epoch=("epoch", "max"), planned_epochs=("_planned", "max"),
                                                       when=("_time", "max"), order=("_order", "max")).reset_index()
    m["planned_epochs"] = m["planned_epochs"].fillna(m["last_epoch"])  # rows that do not say: taken as whole
    m["complete"] = m["last_epoch"] >= m["planned_epochs"]
    # The latest complete member; where none is complete, the one that got furthest, then the latest.
    progress = m["last_epoch"].where(~m["complete"], np.inf)
    ranked = m.assign(_progress=progress).sort_values(["complete", "_progress", "when", "order"], kind="stable")
    chosen = ranked.groupby(MEMBER, sort=False).tail(1).index
    m["used"] = m.index.isin(chosen)
    return m


def accuracy_rows(df: pd.DataFrame, members: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows every accuracy statistic reads: per (config, variant, seed) one member's rows, those of the
    latest complete run (a rerun after an interrupted run, a unit rerun after a kill), never an incomplete
    one while a complete one exists; where there is none, the incomplete member that got furthest (then the
    latest), its rows marked complete=False. Repeats (repeat > 0) train the same numbers again: left out."""
    members = member_table(df) if members is None else members
    used = members.loc[members["used"], [*MEMBER, "run_id", "complete", "planned_epochs"]]
    return df.merge(used, on=[*MEMBER, "run_id"])


def headline_rows(acc: pd.DataFrame) -> pd.DataFrame:
    """One row per member at one epoch per config, for the figures and the sensitivity section: the
    planned last epoch where any member is complete (members without a complete run are then left
    out: the tables list them), else the last epoch every member reached."""
    out = []
    for _, g in acc.groupby("config", sort=False):
        if g["complete"].any():
            e = g.loc[g["complete"], "planned_epochs"].max()
        else:
            e = g.groupby(["run_id", "variant", "seed"])["epoch"].max().min()
        out.append(g[g["epoch"] == e])
    if not out:
        return acc.iloc[:0]
    return pd.concat(out).drop_duplicates(["run_id", "variant", "seed"], keep="last").reset_index(drop=True)
