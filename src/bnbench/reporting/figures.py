"""What the report's figures share: one colour and label per variant, seed bands, the style, keeping and saving.

Figures are `matplotlib.figure.Figure`s made without pyplot, inside `style()`: no backend is chosen or
switched, and seaborn's look is applied through `matplotlib.rc_context`, which restores every rcParam
after. A caller's backend, rcParams and seaborn theme stay as they were (tests/test_api.py checks it).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# One colour, label and short name per variant, in every figure and table (the lab's two as always).
PALETTE = {"bn": "#1f77b4", "nobn": "#d62728", "ln": "#2ca02c", "gn": "#9467bd", "rms": "#ff7f0e", "brn": "#8c564b"}
LABELS = {"bn": "with BN", "nobn": "without BN", "ln": "LayerNorm", "gn": "GroupNorm", "rms": "RMSNorm",
          "brn": "Batch Renorm"}
SHORT = {"bn": "BN", "nobn": "no-BN", "ln": "LN", "gn": "GN", "rms": "RMS", "brn": "BRN"}
DPI = 110


class ReportFigure(Figure):
    """A Figure that shows itself as a PNG in IPython and Jupyter (`display(fig)`, or a cell's last
    value), whether or not pyplot and its inline backend were ever imported."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize, **subplots):
    """(figure, axes) as plt.subplots gives them, without pyplot: the figure belongs to no backend."""
    fig = ReportFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


@contextlib.contextmanager
def style():
    """seaborn's whitegrid / notebook look for the figures drawn inside; every rcParam restored after."""
    import matplotlib
    import seaborn as sns
    from cycler import cycler

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"), "font.family": ["sans-serif"],
          "axes.prop_cycle": cycler(color=list(sns.color_palette("deep")))}
    with matplotlib.rc_context(rc):
        yield


class Drawn(NamedTuple):
    """A figure of the report: its file stem, the figure, its caption; tight: saved with bbox "tight"."""

    stem: str
    figure: Figure
    caption: str
    tight: bool = True


def keep(fig: Figure, stem: str, caption: str, figs: list, tight: bool = True) -> None:
    figs.append(Drawn(stem, fig, caption, tight))


def save_figures(drawn: list[Drawn], rep: Path) -> list[tuple[str, str]]:
    """Each figure as rep/STEM.png and .svg; [(png name, caption)] in order."""
    import matplotlib

    out = []
    for d in drawn:
        for ext in ("png", "svg"):
            # bbox "tight" keeps legends placed outside the axes; it costs a second draw, so a figure
            # laid out by tight_layout (the large learning-curve grid) goes without it.
            # No date and fixed SVG ids: the same results rebuild the same files, byte for byte.
            with matplotlib.rc_context({"svg.hashsalt": "bnbench"}):
                d.figure.savefig(rep / f"{d.stem}.{ext}", dpi=DPI, bbox_inches="tight" if d.tight else None,
                                 metadata={"Date": None} if ext == "svg" else None)
        out.append((f"{d.stem}.png", d.caption))
    return out


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
