"""The report's section across configurations: what BN buys as a setting varies.

For every setting that varies in a folder (lr, batch size, width, optimizer, world size, sync BN, ...):
a figure with that setting on the x axis (log scale for rates and batch sizes), final test accuracy
per seed with the mean and its 95% interval for BN and no-BN, the paired difference BN - no-BN below
it, the other varying settings as columns; and per variant the range of the setting over which it
stays within 1 pp of its own best mean (Ioffe & Szegedy 2015 3.3; Bjorck et al. 2018).
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from .figures import LABELS, PALETTE, SHORT, keep, new_figure
from .stats import MIN_PAIRS, mean_ci95

WITHIN = 0.01  # "trains well": within 1 pp of the variant's own best mean
LOG_AXIS = {"lr", "batch_size", "per_device_batch", "world_size", "dp", "eval_batch"}


def varying(final: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if k in final and final[k].astype(str).nunique() > 1]


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _facets(final: pd.DataFrame, others: list[str]) -> pd.Series:
    if not others:
        return pd.Series("", index=final.index)
    return final[others].astype(str).apply(lambda r: ", ".join(f"{k}={v}" for k, v in zip(others, r)), axis=1)


def _lockstep(final: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two settings vary together, each value of one with one value of the other."""
    x, y = final[a].astype(str), final[b].astype(str)
    return bool(y.groupby(x).nunique().max() == 1 and x.groupby(y).nunique().max() == 1)


def facet_order(final: pd.DataFrame, others: list[str]) -> list[str]:
    """Facets in the order of their settings' values (1e-05 before 0.0001, not after 10.0)."""
    firsts = final.drop_duplicates("facet")
    return list(firsts.sort_values(others)["facet"]) if others else list(firsts["facet"])


def summarise(final: pd.DataFrame, key: str, facet: str) -> tuple[list[dict], str]:
    """Per variant: best value and mean, the range within 1 pp of the best, divergences per value;
    and the sentence that says it."""
    rows, parts = [], []
    g = final[final["facet"] == facet]
    values = sorted(g[key].unique(), key=lambda v: (isinstance(v, str), v))
    for variant in [v for v in PALETTE if (g["variant"] == v).any()]:
        mine = g[g["variant"] == variant]
        if mine.empty:
            continue
        by = {v: mine[mine[key] == v] for v in values}
        means = {v: float(d.loc[~d["diverged"], "test_acc"].mean()) for v, d in by.items() if (~d["diverged"]).any()}
        diverged = {v: int(d["diverged"].sum()) for v, d in by.items() if d["diverged"].any()}
        if not means:
            rows.append({"setting": key, "facet": facet, "variant": variant, "best": None, "best_mean": None,
                         "within_1pp_from": None, "within_1pp_to": None, "span": None,
                         "diverged": "; ".join(f"{_show(v)}: {n}" for v, n in diverged.items())})
            parts.append(f"{LABELS[variant]}: every member diverged")
            continue
        best = max(means, key=lambda v: means[v])
        ok = [v in means and v not in diverged and means[v] >= means[best] - WITHIN for v in values]
        i = j = values.index(best)
        while i > 0 and ok[i - 1]:
            i -= 1
        while j < len(values) - 1 and ok[j + 1]:
            j += 1
        lo, hi = values[i], values[j]
        span = (hi / lo) if _numeric(g[key]) and lo and lo > 0 else None
        rows.append({"setting": key, "facet": facet, "variant": variant, "best": best, "best_mean": means[best],
                     "within_1pp_from": lo, "within_1pp_to": hi, "span": span,
                     "diverged": "; ".join(f"{_show(v)}: {n}/{len(by[v])}" for v, n in diverged.items())})
        if not _numeric(g[key]):  # no order between the values: say which are within 1 pp
            within = [_show(v) for v, good in zip(values, ok) if good]
            where = f"{', '.join(within)}" + (" only" if len(within) == 1 else "")
        elif lo != hi:
            where = f"{_show(lo)} to {_show(hi)}" + (f" ({span:.3g}x)" if span else "")
        else:
            where = f"{_show(lo)} only"
        text = (f"{LABELS[variant]} within 1 pp of its best ({means[best]:.4f} at {key} {_show(best)}) "
                f"{'from' if _numeric(g[key]) else 'at'} {where}")
        if diverged:
            text += "; diverged members: " + ", ".join(f"{n}/{len(by[v])} at {_show(v)}" for v, n in diverged.items())
        parts.append(text)
    head = f"{key}{f' ({facet})' if facet else ''}: "
    return rows, head + "; ".join(parts) + "."


def axes(final: pd.DataFrame, keys: list[str]) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(setting, rows with their facet, facets in order) for every setting worth an x axis: it varies
    within some facet of the others, and no setting shown before varies in lockstep with it."""
    swept = varying(final, keys)
    out = []
    for i, key in enumerate(swept):
        if any(_lockstep(final, key, k) for k in swept[:i]):
            continue  # the same partition as a setting already shown (batch_size and per_device_batch at dp 1)
        others = [k for k in swept if k != key and not _lockstep(final, key, k)]
        shown = final.assign(facet=_facets(final, others))
        if not (shown.groupby("facet")[key].nunique() > 1).any():
            continue  # it only ever varies together with another setting: that setting's figure shows it
        out.append((key, shown, facet_order(shown, others)))
    return out


def sensitivity_section(final: pd.DataFrame, keys: list[str], baseline: str = "nobn"):
    """(figures, sentences, table) for every varying setting of the folder's final rows (figures: figures.Drawn,
    to be drawn inside figures.style()); each variant's paired difference to `baseline` below."""
    if not varying(final, keys):
        return [], ["Nothing varies between the runs of this folder (one configuration): no setting to plot "
                    "against. A sweep over lr, batch_size, hidden, ... gives one figure per setting here."], pd.DataFrame()
    figs, text, table = [], [], []
    for key, shown, facets in axes(final, keys):
        for facet in facets:
            rows, sentence = summarise(shown, key, facet)
            table += rows
            text.append(sentence)
        _figure(shown, key, facets, figs, baseline)
    return figs, text, pd.DataFrame(table)


def _figure(final: pd.DataFrame, key: str, facets: list[str], figs: list, baseline: str = "nobn") -> None:
    numeric = _numeric(final[key])
    values = sorted(final[key].unique(), key=lambda v: (isinstance(v, str), v))
    xpos = (lambda v: v) if numeric else (lambda v: values.index(v))
    fig, axes = new_figure(2, len(facets), figsize=(1.0 + 4.2 * len(facets), 6.4), squeeze=False, sharex="col")
    for j, facet in enumerate(facets):
        g = final[(final["facet"] == facet) & ~final["diverged"]]
        top, bottom = axes[0, j], axes[1, j]
        present = [v for v in PALETTE if (g["variant"] == v).any()]
        for k, variant in enumerate(present):
            colour = PALETTE[variant]
            mine = g[g["variant"] == variant]
            shift = (k - (len(present) - 1) / 2) * (0.06 if numeric else 0.12) / max(1, len(present) - 1)
            xs = [xpos(v) * (1 + shift) if numeric and key in LOG_AXIS else xpos(v) + shift for v in mine[key]]
            top.scatter(xs, mine["test_acc"], s=12, color=colour, alpha=0.45, lw=0)
            stats = [(v, *_mean_ci(mine.loc[mine[key] == v, "test_acc"])) for v in values if (mine[key] == v).any()]
            x = [xpos(v) for v, *_ in stats]
            m = np.array([s[1] for s in stats])
            lo, hi = np.clip([s[2] for s in stats], 0, 1), np.clip([s[3] for s in stats], 0, 1)
            top.errorbar(x, m, yerr=_err(m, lo, hi), color=colour, marker="o", ms=5, capsize=3, label=LABELS[variant])
        pairs = g.pivot_table(index=[key, "seed"], columns="variant", values="test_acc", aggfunc="first")
        lab = set(present) == {"bn", "nobn"} and baseline == "nobn"  # the lab's panel, as it always was
        for variant in [v for v in present if v != baseline and baseline in pairs.columns]:
            d = (pairs[variant] - pairs[baseline]).dropna().mul(100).reset_index(name="d")
            colour = "black" if lab else PALETTE[variant]
            bottom.scatter([xpos(v) for v in d[key]], d["d"], s=12, color="#555555" if lab else colour, alpha=0.45, lw=0)
            stats = [(v, *_mean_ci(d.loc[d[key] == v, "d"])) for v in values if (d[key] == v).any()]
            x, m = [xpos(v) for v, *_ in stats], np.array([s[1] for s in stats])
            label = ("BN - no-BN, mean and 95% CI" if lab
                     else f"{SHORT[variant]} - {SHORT[baseline]}, mean and 95% CI")
            bottom.errorbar(x, m, yerr=_err(m, [s[2] for s in stats], [s[3] for s in stats]),
                            color=colour, marker="o", ms=5, capsize=3, label=label)
        bottom.axhline(0, color="grey", lw=0.8)
        top.set_title(facet or f"final test accuracy against {key}", fontsize=12)
        top.set_ylabel("final test accuracy" if j == 0 else "")
        bottom.set_ylabel(("BN - no-BN (pp)" if lab else f"minus {SHORT[baseline]} (pp)") if j == 0 else "")
        bottom.set_xlabel(key)
        if numeric and key in LOG_AXIS:
            bottom.set_xscale("log")
        if not numeric:
            bottom.set_xticks(range(len(values)), [_show(v) for v in values])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += axes[1, 0].get_legend_handles_labels()[0]
    labels += axes[1, 0].get_legend_handles_labels()[1]
    fig.legend(handles, labels, loc="lower center", ncol=3 if len(facets) > 1 else 2, frameon=False)
    title = (f"Final test accuracy against {key}: every seed a point, mean and 95% CI (fewer than {MIN_PAIRS} "
             f"seeds: no interval)")
    fig.suptitle(textwrap.fill(title, int(11 * (1.0 + 4.2 * len(facets)))), x=0.02, ha="left", fontsize=12)
    fig.tight_layout(rect=(0, 0.08 if len(facets) > 1 else 0.11, 1, 0.92))
    keep(fig, f"sensitivity_{key}", f"final test accuracy and the paired BN - no-BN difference against {key}", figs)


def _mean_ci(values: pd.Series) -> tuple[float, float, float]:
    v = values.astype(float).dropna()
    m = float(v.mean())
    if len(v) < MIN_PAIRS:
        return m, m, m  # a t-interval from 1-2 points says nothing: the points are drawn instead
    lo, hi = mean_ci95(v)
    return m, lo, hi


def _err(m, lo, hi):
    """Error bar lengths; never negative (a mean and its interval's end can differ by a rounding)."""
    return [np.maximum(m - np.asarray(lo), 0), np.maximum(np.asarray(hi) - m, 0)]
