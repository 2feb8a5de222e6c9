"""Figure helpers shared by the report's sections: one colour and label per variant, seed bands, saving."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

PALETTE = {"bn": "#1f77b4", "nobn": "#d62728"}  # one colour per variant, in every figure
LABELS = {"bn": "with BN", "nobn": "without BN"}


def save_figure(fig, rep: Path, stem: str, caption: str, figs: list, tight: bool = True) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    for ext in ("png", "svg"):
        # bbox "tight" keeps legends placed outside the axes; it costs a second draw, so a figure
        # laid out by tight_layout (the large learning-curve grid) goes without it.
        # No date and fixed SVG ids: the same results rebuild the same files, byte for byte.
        with matplotlib.rc_context({"svg.hashsalt": "bnbench"}):
            fig.savefig(rep / f"{stem}.{ext}", dpi=110, bbox_inches="tight" if tight else None,
                        metadata={"Date": None} if ext == "svg" else None)
    plt.close(fig)
    figs.append((f"{stem}.png", caption))


def curve_bands(live: pd.DataFrame, metrics: list[str], x: str = "epoch") -> pd.DataFrame:
    """Per config, variant, metric and x (epoch or step): mean over seeds and the Student-t 95%
    half-width (mean_ci95, vectorised: one groupby instead of one call per point)."""
    from scipy import stats

    long = live.melt(id_vars=["config", "variant", x], value_vars=metrics, var_name="metric", value_name="value")
    agg = long.dropna(subset=["value"]).groupby(["config", "variant", "metric", x])["value"].agg(["mean", "std", "count"]).reset_index()
    n = agg["count"].to_numpy()
    t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
    agg["half"] = np.where(n > 1, t * agg["std"].fillna(0).to_numpy() / np.sqrt(n), 0.0)
    return agg


@contextlib.contextmanager
def fixed_jitter(seed: int = 0):
    """seaborn's stripplot jitters points with numpy's global generator: seeded here (and restored
    after), so that a report's figures depend on the results alone."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
