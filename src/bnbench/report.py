"""Report: results.jsonl -> DIR/report/{report.html, report.md, *.png}.

Reads top-down: the verdict (paired BN - no-BN difference), the final-accuracy
table, the learning curves, then what is missing or diverged.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError
from .results import META_FILE, ResultsProblem, read_results

# What makes two rows the same experiment (apart from variant and seed).
CONFIG_KEYS = ["preset", "dataset", "hidden", "activation", "optimizer", "lr", "batch_size", "engine", "dtype", "world_size", "sync_bn", "device"]
PALETTE = {"bn": "#1f77b4", "nobn": "#d62728"}  # one colour per variant, everywhere
LABELS = {"bn": "with BN", "nobn": "without BN"}


def mean_ci95(values) -> tuple[float, float]:
    """Student-t 95% interval of the mean (n >= 2), the usual one across a few seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(lo), float(hi)


def config_label(df: pd.DataFrame) -> pd.Series:
    """A short label per row built only from the config columns that vary in df."""
    keys = [k for k in CONFIG_KEYS if k in df and df[k].astype(str).nunique() > 1]
    if not keys:
        # One configuration: name its main settings so a figure stands on its own.
        r = df.iloc[0]
        parts = [str(r.get("dataset", "")), f"hidden {r.get('hidden', '?')} {r.get('activation', '')}",
                 f"{r.get('optimizer', '')} lr {r.get('lr', '?')}", f"batch {r.get('batch_size', '?')}"]
        return pd.Series(", ".join(p for p in parts if p.strip()), index=df.index)
    return df[keys].astype(str).apply(lambda r: ", ".join(f"{k}={v}" for k, v in zip(keys, r)), axis=1)


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each member's last recorded epoch (a member = run_id, variant, seed)."""
    df = df.sort_values("epoch")
    return df.groupby(["run_id", "variant", "seed"], as_index=False).tail(1).reset_index(drop=True)


def final_table(final: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy per config and variant: mean, std, min, max, n (diverged counted apart)."""
    out = []
    for (cfg, variant), g in final.groupby(["config", "variant"], sort=True):
        acc = g.loc[~g["diverged"].astype(bool), "test_acc"].astype(float)
        lo, hi = mean_ci95(acc)
        out.append(
            {
                "config": cfg,
                "variant": variant,
                "mean": acc.mean(),
                "std": acc.std(ddof=1) if len(acc) > 1 else float("nan"),
                "ci95_low": lo,
                "ci95_high": hi,
                "min": acc.min(),
                "max": acc.max(),
                "n": int(len(acc)),
                "diverged": int(g["diverged"].astype(bool).sum()),
                "epoch": int(g["epoch"].max()),
            }
        )
    return pd.DataFrame(out)


def paired_differences(final: pd.DataFrame) -> pd.DataFrame:
    """BN - no-BN final test accuracy per (config, run, seed): a paired comparison (same init, same batches)."""
    piv = final.pivot_table(index=["config", "run_id", "seed"], columns="variant", values="test_acc", aggfunc="first")
    if not {"bn", "nobn"} <= set(piv.columns):
        return pd.DataFrame(columns=["config", "run_id", "seed", "bn", "nobn", "difference"])
    piv = piv.dropna(subset=["bn", "nobn"]).reset_index()
    piv["difference"] = piv["bn"] - piv["nobn"]
    return piv[["config", "run_id", "seed", "bn", "nobn", "difference"]]


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "-" if not np.isfinite(v) else floatfmt.format(v)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _html_table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-", border=0, classes="t")


def _figures(df: pd.DataFrame, out: Path) -> list[tuple[str, str]]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    figs = []
    configs = sorted(df["config"].unique())
    live = df[~df["diverged"].astype(bool)].copy()
    live["variant"] = live["variant"].map(lambda v: LABELS.get(v, v))
    palette = {LABELS[k]: c for k, c in PALETTE.items()}
    curves = [] if live.empty else [  # every member diverged: nothing to draw, the notes say why
        ("test_acc", "test accuracy (fraction correct)", "test_accuracy.png"),
        ("test_loss", "test loss (mean cross-entropy, nats)", "test_loss.png"),
    ]
    for metric, ylabel, fname in curves:
        g = sns.relplot(
            data=live, x="epoch", y=metric, hue="variant", col="config", col_wrap=min(len(configs), 3),
            kind="line", errorbar=mean_ci95, marker="o", palette=palette, height=4, aspect=1.3,
            facet_kws={"sharey": False},
        )
        g.set_axis_labels("epoch", ylabel)
        for ax in g.axes.flat:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        g.set_titles("{col_name}")
        g.figure.suptitle(f"{ylabel.split(' (')[0]} per epoch: mean and 95% CI across seeds", y=1.03)
        g.figure.savefig(out / fname, dpi=110, bbox_inches="tight")
        plt.close(g.figure)
        figs.append((fname, f"{ylabel.split(' (')[0]} per epoch, mean with 95% CI across seeds"))

    pairs = paired_differences(final_rows(df))
    if len(pairs):
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * max(2, pairs["config"].nunique() * 2)))
        pairs = pairs.assign(pp=pairs["difference"] * 100)
        sns.stripplot(data=pairs, x="pp", y="config", ax=ax, color=PALETTE["bn"], size=7, jitter=0.15)
        ax.axvline(0, color="black", lw=1)
        ax.set_xlabel("final test accuracy, BN - no-BN (percentage points), one dot per seed")
        ax.set_ylabel("")
        ax.set_title("Paired difference per seed (same init, same batches)")
        fig.savefig(out / "paired_difference.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        figs.append(("paired_difference.png", "BN - no-BN final test accuracy, one point per seed"))
    return figs


def verdict(pairs: pd.DataFrame) -> list[str]:
    lines = []
    for cfg, g in pairs.groupby("config"):
        d = g["difference"].to_numpy() * 100
        n = len(d)
        ahead = int((d > 0).sum())
        if n >= 2:
            lo, hi = mean_ci95(d)
            lines.append(
                f"{cfg}: BN changes final test accuracy by {d.mean():+.2f} pp "
                f"[95% CI {lo:+.2f}, {hi:+.2f}] over {n} paired seeds; BN ahead on {ahead} of {n}."
            )
        else:
            lines.append(f"{cfg}: BN - no-BN = {d.mean():+.2f} pp on a single seed; too few seeds for an interval.")
    return lines


def build_report(out_dir) -> Path:
    out_dir = Path(out_dir)
    try:
        df, problems = read_results(out_dir)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    if df.empty:
        raise ConfigError(f"{out_dir}/results.jsonl holds no rows" + (f"; problems: {problems}" if problems else ""))
    df["diverged"] = df.get("diverged", False)
    df["diverged"] = df["diverged"].fillna(False).astype(bool)
    df["config"] = config_label(df)
    rep = out_dir / "report"
    rep.mkdir(parents=True, exist_ok=True)

    final = final_rows(df)
    table = final_table(final)
    pairs = paired_differences(final)
    verdict_lines = verdict(pairs) if len(pairs) else ["No seed has both a BN and a no-BN member: no paired comparison."]
    figs = _figures(df, rep)

    notes = list(problems)
    epochs_cfg = df.groupby("run_id")["epochs"].max()
    for run_id, g in final.groupby("run_id"):
        done = int(g["epoch"].min())
        if done < int(epochs_cfg[run_id]):
            notes.append(f"run {run_id}: {done} of {int(epochs_cfg[run_id])} epochs recorded (incomplete or still running)")
    for r in final[final["diverged"]].itertuples():
        first = df[(df.run_id == r.run_id) & (df.variant == r.variant) & (df.seed == r.seed) & df.diverged]["epoch"].min()
        notes.append(f"run {r.run_id}: {r.variant}/seed {r.seed} diverged (loss NaN/inf) at epoch {first}")
    meta = {}
    if (out_dir / META_FILE).exists():
        try:
            meta = json.loads((out_dir / META_FILE).read_text()).get("runs", {})
        except ValueError as e:
            notes.append(f"{out_dir / META_FILE} unreadable: {e}")
    run_ids = set(df["run_id"])
    for rid, m in meta.items():
        if rid in run_ids and m.get("status") not in ("complete", None):
            notes.append(f"run {rid}: status {m['status']}" + (f" ({m['error']})" if m.get("error") else ""))
    env_rows = pd.DataFrame(
        [
            {
                "run_id": rid,
                "status": m.get("status", "?"),
                "device": f"{m.get('device', '?')} ({m.get('device_name', '')})",
                "torch": m.get("versions", {}).get("torch", "?"),
                "git": str(m.get("git_commit", "?"))[:12],
                "host": m.get("hostname", "?"),
            }
            for rid, m in meta.items()
            if rid in run_ids
        ]
    )

    pairs_show = pairs.assign(difference_pp=pairs["difference"] * 100).drop(columns=["difference"])
    table_show = table
    if len(table):
        table_show = table.assign(**{"mean ± std": [f"{m:.4f} ± {sd:.4f}" for m, sd in zip(table["mean"], table["std"])]})
        table_show = table_show[["config", "variant", "mean ± std", "min", "max", "n", "diverged", "epoch"]]

    md = ["# bnbench report", "", f"Results: `{out_dir / 'results.jsonl'}` ({len(df)} rows, {df['run_id'].nunique()} run(s)).", ""]
    md += ["## Verdict", "", *[f"- {v}" for v in verdict_lines], ""]
    md += ["## Final test accuracy per variant", "", _md_table(table_show), ""]
    md += ["## Paired difference per seed (BN - no-BN)", "", _md_table(pairs_show), ""]
    md += ["## Figures", ""] + [f"![{cap}]({name})" for name, cap in figs] + [""]
    md += ["## Missing, diverged, problems", ""] + ([f"- {n}" for n in notes] or ["- none"]) + [""]
    if len(env_rows):
        md += ["## Environment", "", _md_table(env_rows), ""]
    (rep / "report.md").write_text("\n".join(md))

    def img(name: str, cap: str) -> str:
        b64 = base64.b64encode((rep / name).read_bytes()).decode()
        return f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(cap)}</figcaption></figure>'

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnbench report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table.t{{border-collapse:collapse;margin:.5em 0}} table.t td,table.t th{{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}}
figure{{margin:1em 0}} img{{max-width:100%}} figcaption{{color:#555;font-size:.9em}}
.verdict li{{font-size:1.1em;margin:.3em 0}}
</style></head><body>
<h1>bnbench report</h1>
<p>Results: <code>{html.escape(str(out_dir / 'results.jsonl'))}</code> ({len(df)} rows, {df['run_id'].nunique()} run(s)).</p>
<h2>Verdict</h2><ul class="verdict">{''.join(f'<li>{html.escape(v)}</li>' for v in verdict_lines)}</ul>
<h2>Final test accuracy per variant</h2>{_html_table(table_show)}
<h2>Paired difference per seed (BN - no-BN)</h2>{_html_table(pairs_show)}
<h2>Figures</h2>{''.join(img(n, c) for n, c in figs)}
<h2>Missing, diverged, problems</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes) or '<li>none</li>'}</ul>
{('<h2>Environment</h2>' + _html_table(env_rows)) if len(env_rows) else ''}
</body></html>
"""
    (rep / "report.html").write_text(page)
    table.to_csv(rep / "final_accuracy.csv", index=False)
    pairs.to_csv(rep / "paired_difference.csv", index=False)
    return rep / "report.html"
