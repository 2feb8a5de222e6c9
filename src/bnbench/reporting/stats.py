"""Statistics of the report: intervals across seeds, the paired BN - no-BN test, time to target.

Seeds are the unit of replication: a BN and a no-BN member of one seed share their
initial weights and batches, so their difference is one paired observation.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MIN_PAIRS = 3  # below this, no interval or p-value: a statement about 1-2 seeds is anecdote
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the report is reproducible: the same rows give the same interval


def mean_ci95(values) -> tuple[float, float]:
    """Student-t 95% interval of the mean (n >= 2), the usual band across a few seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(lo), float(hi)


def bootstrap_ci95(values) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (scipy), seeded: the same data give the same interval."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2 or np.all(v == v[0]):
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    res = stats.bootstrap((v,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", random_state=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_test(bn, nobn) -> dict:
    """BN - no-BN over paired seeds: mean difference, bootstrap CI, paired t-test and Wilcoxon p-values.

    With fewer than MIN_PAIRS pairs the interval and p-values are None, and `enough` is False.
    """
    from scipy import stats

    bn, nobn = np.asarray(bn, dtype=float), np.asarray(nobn, dtype=float)
    d = bn - nobn
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else float("nan"), "ahead": int((d > 0).sum()),
           "behind": int((d < 0).sum()), "enough": n >= MIN_PAIRS, "ci_low": None, "ci_high": None,
           "p_t": None, "p_wilcoxon": None}
    if n < MIN_PAIRS:
        return out
    out["ci_low"], out["ci_high"] = bootstrap_ci95(d)
    if np.all(d == d[0]):
        # No spread: a t statistic is undefined. All-equal non-zero differences are as one-sided as data get.
        out["p_t"] = 0.0 if d[0] != 0 else 1.0
    else:
        out["p_t"] = float(stats.ttest_rel(bn, nobn).pvalue)
    nonzero = d[d != 0]
    out["p_wilcoxon"] = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values of the comparisons shown together (None and NaN, a
    comparison with too few pairs for a test, stay as they are and do not count):
    the i-th smallest of m is multiplied by m - i (i from 0), then made non-decreasing and capped at 1.
    It controls the chance of any false "differs" among them, without assuming independence."""
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and p == p)  # None or NaN: no test
    m, out, running = len(known), list(pvalues), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def describe_p(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}" if p < 0.01 else f"p = {p:.3f}"


def time_to_target(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per member: the first epoch whose test accuracy reaches `target`, and the training seconds until then.

    curves: one row per member and epoch with run_id, variant, seed, epoch, test_acc,
    train_seconds. A member that never reaches the target keeps NaN (and reached=False):
    it is counted, never dropped. Seconds are training time only (evaluation excluded),
    summed over the member's run's epochs 1..e.
    """
    rows = []
    for (run_id, variant, seed), g in curves.sort_values("epoch").groupby(["run_id", "variant", "seed"], sort=False):
        hit = g[g["test_acc"].astype(float) >= target]
        seconds = g["train_seconds"].astype(float).cumsum()
        first = hit.index[0] if len(hit) else None
        rows.append({"run_id": run_id, "variant": variant, "seed": seed, "reached": first is not None,
                     "epochs": float(g.loc[first, "epoch"]) if first is not None else float("nan"),
                     "seconds": float(seconds.loc[first]) if first is not None else float("nan"),
                     "epochs_run": int(g["epoch"].max())})
    return pd.DataFrame(rows)
