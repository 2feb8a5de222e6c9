"""Report: any results folder -> DIR/report/{report.html, report.md, *.png, *.svg, summary.csv}.

Reads top-down, from the verdict to the detail: the paired BN - no-BN difference per
configuration, final accuracy, learning curves, time to a target accuracy,
throughput and scaling, synchronised BN, then what is missing, failed or diverged,
and the environment. Works on partial data (a sweep still running, one seed, a
diverged member) and says what is missing.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config, ConfigError, row_settings
from .figures import LABELS, PALETTE, curve_bands, fixed_jitter, save_figure
from ..store.folder import META_FILE
from ..store.record import live_status
from .instruments import inside_section
from .sensitivity import sensitivity_section
from ..store.results import ResultsProblem, read_events, read_results, refuse_own_file
from .stats import MIN_PAIRS, describe_p, mean_ci95, paired_test, time_to_target

CHANCE = 2 / 10  # "no better than chance": at most twice the 10% of guessing one of MNIST's 10 classes
DEFAULT_TARGET = 0.97  # test accuracy for time-to-target (MLPerf / DAWNBench style)
# What makes two rows the same experiment (apart from variant, seed and repeat): every setting
# that is a row column (config.py declares them), and where it ran.
def config_keys(cls=Config) -> list[str]:
    return [k for k in row_settings(cls) if k != "repeat"] + ["world_size", "device"]


CONFIG_KEYS = config_keys()
CURVES = [("test_acc", "test accuracy"), ("test_loss", "test loss (nats)"),
          ("train_acc", "train accuracy"), ("train_loss", "train loss (nats)")]

__all__ = ["build_report", "mean_ci95", "final_rows", "DEFAULT_TARGET"]


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


MEMBER = ["config", "variant", "seed"]  # what one result is of; a run_id says which attempt gave it


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


def final_table(final: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per config, variant and the epoch it is at: mean, std, t-interval, min, max, n (diverged
    counted apart). Complete members are at their last epoch; members with no complete run form rows of
    their own, one per epoch they reached: no row mixes epochs."""
    out = []
    if "complete" not in final:
        final = final.assign(complete=True, planned_epochs=final["epoch"])
    for (cfg, variant, epoch), g in final.groupby(["config", "variant", "epoch"], sort=True):
        acc = g.loc[~g["diverged"], "test_acc"].astype(float)
        lo, hi = mean_ci95(acc)
        out.append({"config": cfg, "variant": variant, "mean": acc.mean(), "std": acc.std(ddof=1) if len(acc) > 1 else float("nan"),
                    "ci95_low": lo, "ci95_high": hi, "min": acc.min(), "max": acc.max(), "n": int(len(acc)),
                    "diverged": int(g["diverged"].sum()), "epoch": float(epoch), "planned_epochs": float(g["planned_epochs"].max()),
                    "complete": bool(g["complete"].all())})
    table = pd.DataFrame(out)
    if len(table):  # per config and variant: the complete row first, then the incomplete ones, furthest first
        table = table.sort_values(["config", "variant", "complete", "epoch"], ascending=[True, True, False, False])
    return table.reset_index(drop=True)


PAIR_COLUMNS = ["config", "seed", "epoch", "complete", "bn", "nobn", "difference"]


def paired_differences(final: pd.DataFrame, acc: pd.DataFrame | None = None) -> pd.DataFrame:
    """BN - no-BN test accuracy per (config, seed): a paired comparison (same init, same batches), at one
    epoch for both: the last epoch where both are complete, else the last epoch both reached (from acc,
    every epoch of each member; complete=False). Diverged members there are left out."""
    acc = final if acc is None else acc
    if "complete" not in final:
        final = final.assign(complete=True)
    ends = final.pivot_table(index=["config", "seed"], columns="variant", values="epoch", aggfunc="max")
    if not {"bn", "nobn"} <= set(ends.columns):
        return pd.DataFrame(columns=PAIR_COLUMNS)
    ends = ends.dropna(subset=["bn", "nobn"])
    at = ends[["bn", "nobn"]].min(axis=1).rename("_at").reset_index()
    whole = final.groupby(["config", "seed"])["complete"].all().rename("complete").reset_index()
    rows = acc.drop(columns=["complete"], errors="ignore").merge(at, on=["config", "seed"])
    rows = rows[(rows["epoch"] == rows["_at"]) & ~rows["diverged"]]
    piv = rows.pivot_table(index=["config", "seed", "epoch"], columns="variant", values="test_acc", aggfunc="first")
    if not {"bn", "nobn"} <= set(piv.columns):
        return pd.DataFrame(columns=PAIR_COLUMNS)
    piv = piv.dropna(subset=["bn", "nobn"]).reset_index().merge(whole, on=["config", "seed"])
    piv["difference"] = piv["bn"] - piv["nobn"]
    return piv[PAIR_COLUMNS]


def verdicts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per config (and, for pairs without a complete run, per epoch they are at): the paired test of
    BN - no-BN test accuracy, and a sentence that says it."""
    out = []
    if "complete" not in pairs:
        pairs = pairs.assign(complete=True, epoch=np.nan)
    for (cfg, complete, epoch), g in pairs.groupby(["config", "complete", "epoch"], sort=False, dropna=False):
        t = paired_test(g["bn"], g["nobn"])
        d = t["mean_diff"] * 100
        what = "final test accuracy" if complete else f"test accuracy at epoch {epoch:g}"
        label = cfg if complete else f"{cfg}, incomplete runs (seeds without a complete run of both variants; epoch {epoch:g})"
        if t["enough"] and (g["bn"] == g["nobn"]).all():
            text = (f"{label}: BN and no-BN reach the same {what} on each of the {t['n']} paired seeds "
                    f"(every difference is 0): no effect to estimate.")
        elif t["enough"]:
            verb = "raises" if d > 0 else "lowers" if d < 0 else "does not change"
            text = (f"{label}: BN {verb} {what} by {abs(d):.2f} pp "
                    f"[95% CI {t['ci_low'] * 100:+.2f}, {t['ci_high'] * 100:+.2f}], {describe_p(t['p_t'])} "
                    f"(paired t-test; Wilcoxon {describe_p(t['p_wilcoxon'])}), {t['n']} paired seeds; "
                    f"BN ahead on {t['ahead']} of {t['n']}.")
        else:
            text = (f"{label}: BN - no-BN = {d:+.2f} pp over {t['n']} paired seed{'s' if t['n'] != 1 else ''}: too few "
                    f"for an interval or a p-value (at least {MIN_PAIRS} needed; run more seeds).")
        out.append({"config": cfg, "epoch": epoch, "complete": bool(complete),
                    **{k: t[k] for k in ("n", "mean_diff", "ci_low", "ci_high", "p_t", "p_wilcoxon", "ahead")},
                    "verdict": text})
    table = pd.DataFrame(out)
    if len(table):  # per config: the complete runs' verdict first
        table = table.sort_values(["config", "complete", "epoch"], ascending=[True, False, False], kind="stable")
    return table.reset_index(drop=True)


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


def _no_pairs(final: pd.DataFrame) -> str:
    """Why there is no verdict: one variant only, or divergence, said as it is."""
    have = sorted(set(final["variant"]))
    if len(have) < 2:
        return f"Only {'BN' if have == ['bn'] else 'no-BN'} members here: no paired comparison (run both variants)."
    return "No seed has both a BN and a no-BN member that trained without diverging: no paired comparison."


def target_table(ttt: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per config and variant: how many members reached the target, median epochs and seconds of those that did."""
    out = []
    for (cfg, variant), g in ttt.groupby(["config", "variant"], sort=True):
        hit = g[g["reached"]]
        out.append({"config": cfg, "variant": variant, "target": target, "reached": f"{len(hit)}/{len(g)}",
                    "median_epochs": hit["epochs"].median() if len(hit) else float("nan"),
                    "median_seconds": hit["seconds"].median() if len(hit) else float("nan"),
                    "max_epochs_run": int(g["epochs_run"].max())})
    return pd.DataFrame(out)


THROUGHPUT_KEYS = ["device_name", "world_size", "dp", "engine", "sync_bn", "members", "batch_size"]
LAYOUT_KEYS = ("world_size", "dp")  # where the processes go; the rest is the setting


def throughput_table(df: pd.DataFrame) -> pd.DataFrame:
    """Member-samples/s per run (median over its epochs after the first: warm-up), then per setting
    and layout (world size, dp): median and range across runs (repeats), and scaling efficiency
    of each layout against one process of the same setting."""
    keys = [k for k in THROUGHPUT_KEYS if k in df]
    later = df[df["epoch"] > 1] if (df["epoch"] > 1).any() else df
    runs = later.groupby(["run_id", *keys], dropna=False)["samples_per_s"].median().reset_index()
    table = runs.groupby(keys, dropna=False)["samples_per_s"].agg(["median", "min", "max", "count"]).reset_index()
    table = table.rename(columns={"median": "samples_per_s", "min": "min", "max": "max", "count": "runs"})
    base_keys = [k for k in keys if k not in LAYOUT_KEYS]
    if "world_size" not in table or not base_keys:
        return table.assign(scaling_efficiency=float("nan"))
    # Throughput at W / (W x throughput at 1 of the same setting).
    one = table[table["world_size"] == 1].set_index(base_keys)["samples_per_s"]
    eff = []
    for r in table.to_dict("records"):
        key = tuple(r[k] for k in base_keys) if len(base_keys) > 1 else r[base_keys[0]]
        ref = one.get(key) if key in one.index else None
        eff.append(r["samples_per_s"] / (r["world_size"] * ref) if ref else float("nan"))
    table["scaling_efficiency"] = eff
    return table


# -- figures -------------------------------------------------------------------------------
def _figures(df, acc_final, ttt, throughput, rep: Path, target: float) -> list[tuple[str, str]]:
    import textwrap

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = {LABELS[k]: c for k, c in PALETTE.items()}
    order = [LABELS[k] for k in PALETTE]
    figs: list[tuple[str, str]] = []
    configs = sorted(df["config"].unique())
    live = df[~df["diverged"]].assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)))

    final = acc_final[~acc_final["diverged"]].assign(
        variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)),
        config=lambda d: [c if whole else f"{c} (epoch {e:g}, incomplete runs)"
                          for c, whole, e in zip(d["config"], d["complete"], d["epoch"])])
    if len(final):
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(configs)))
        sns.boxplot(data=final, x="test_acc", y="config", hue="variant", hue_order=order, palette=palette, ax=ax,
                    fliersize=0, boxprops={"alpha": 0.35})
        with fixed_jitter():
            sns.stripplot(data=final, x="test_acc", y="config", hue="variant", hue_order=order, palette=palette, ax=ax,
                          dodge=True, size=6, jitter=0.12, legend=False)
        ax.set_xlabel("final test accuracy (fraction correct), one point per seed")
        ax.set_ylabel("")
        ax.set_title("Final test accuracy: every seed over its box")
        # Each configuration's label carries its numbers: mean ± std and n per variant.
        stats_of = final.groupby(["config", "variant"])["test_acc"].agg(["mean", "std", "count"])
        ax.set_yticks(ax.get_yticks(), [
            "\n".join([textwrap.shorten(t.get_text(), 60)] + [
                f"{v}: {stats_of.loc[(t.get_text(), v), 'mean']:.4f} ± {stats_of.loc[(t.get_text(), v), 'std']:.4f}, "
                f"n={stats_of.loc[(t.get_text(), v), 'count']}" for v in order if (t.get_text(), v) in stats_of.index])
            for t in ax.get_yticklabels()], fontsize=9)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="")
        save_figure(fig, rep, "final_accuracy", "final test accuracy per configuration: every seed as a point over a box", figs)

    if len(live):  # every member diverged: nothing to draw, the notes say why
        _learning_curves(live, configs, palette, rep, figs)

    if len(ttt) and ttt["reached"].any():
        hit = ttt[ttt["reached"]].assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)))
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(configs)))
        with fixed_jitter():
            sns.stripplot(data=hit, x="epochs", y="config", hue="variant", hue_order=order, palette=palette, ax=ax,
                          dodge=True, size=7, jitter=0.15)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(f"epochs until test accuracy first reaches {target:.2%} (members that never do: in the table)")
        ax.set_ylabel("")
        ax.set_title(f"Time to {target:.2%} test accuracy")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="")
        save_figure(fig, rep, "time_to_target", f"epochs to {target:.2%} test accuracy, one point per member", figs)

    if len(throughput) and "world_size" in throughput:
        fig, ax = plt.subplots(figsize=(7, 4))
        setting = [k for k in ("device_name", "engine", "sync_bn", "dp") if k in throughput]
        shown = throughput.assign(setting=throughput[setting].astype(str).agg(" / ".join, axis=1))
        sns.pointplot(data=shown, x="world_size", y="samples_per_s", hue="setting", ax=ax, markers="o", linestyles="-")
        for r in shown.itertuples():
            ax.plot([list(sorted(shown["world_size"].unique())).index(r.world_size)] * 2, [r.min, r.max], color="grey", lw=1)
        ax.set_xlabel("processes (world size)")
        ax.set_ylabel("member-samples / s (median over runs; bar: range)")
        ax.set_title("Training throughput (evaluation excluded)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title=" / ".join(setting))
        save_figure(fig, rep, "throughput", "member-samples per second by world size, device, engine, sync BN "
                    "and data-parallel size (dp; world size / dp seed groups)", figs)

    syncable = acc_final[~acc_final["diverged"]]
    if "sync_bn" in syncable and syncable["sync_bn"].nunique() > 1:
        shown = syncable.assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)),
                                sync=lambda d: d["sync_bn"].map({True: "sync BN", False: "per-process BN"}))
        fig, ax = plt.subplots(figsize=(7, 4))
        sns.pointplot(data=shown, x="per_device_batch", y="test_acc", hue="sync", ax=ax, errorbar=mean_ci95,
                      dodge=0.2, markers=["o", "s"], linestyles=["-", "--"])
        ax.set_xlabel("per-process batch (samples)")
        ax.set_ylabel("final test accuracy, mean and 95% CI")
        ax.set_title("Synchronised vs per-process BN statistics")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="")
        save_figure(fig, rep, "sync_bn", "final test accuracy with and without --sync-bn against per-process batch", figs)
    return figs


def curve_drawing(live, bands, seeds, cfg: str, variant: str, metric: str) -> dict:
    """What a learning-curve panel draws for one variant: {"kind": "band", x, mean, lo, hi} from 3 seeds
    up (accuracy bands clipped to [0, 1]), else {"kind": "seeds", "seeds": [(x, y) per seed]}."""
    if seeds.get((cfg, variant), 0) >= MIN_PAIRS:
        b = bands[(bands["config"] == cfg) & (bands["metric"] == metric) & (bands["variant"] == variant)]
        lo, hi = b["mean"] - b["half"], b["mean"] + b["half"]
        if metric.endswith("_acc"):
            lo, hi = lo.clip(0, 1), hi.clip(0, 1)
        return {"kind": "band", "x": b["epoch"].to_numpy(), "mean": b["mean"].to_numpy(), "lo": lo.to_numpy(), "hi": hi.to_numpy()}
    mine = live[(live["config"] == cfg) & (live["variant"] == variant)].sort_values("epoch")
    return {"kind": "seeds", "seeds": [(g["epoch"].to_numpy(), g[metric].to_numpy()) for _, g in mine.groupby("seed")]}


def _learning_curves(live: pd.DataFrame, configs: list[str], palette: dict, rep: Path, figs: list) -> None:
    """Train and test loss and accuracy per epoch, one column per configuration. With 3 or more seeds a
    variant is its mean and Student-t 95% band (accuracy bands clipped to [0, 1], where a fraction lives);
    with fewer, a t-interval says nothing (from 2 points it spanned -0.5 to 1.05), so each seed is drawn."""
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = [(m, label) for m, label in CURVES if m in live and live[m].notna().any()]
    bands = curve_bands(live, [m for m, _ in metrics])
    seeds = live.groupby(["config", "variant"])["seed"].nunique()
    width = 0.8 + 3.8 * len(configs)
    fig, axes = plt.subplots(len(metrics), len(configs), figsize=(width, 1.2 + 2.5 * len(metrics)), squeeze=False,
                             sharex="col")
    for j, cfg in enumerate(configs):
        axes[0, j].set_title("\n".join(textwrap.wrap(cfg, 34)), fontsize=12)
        axes[-1, j].set_xlabel("epoch")
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i, j]
            for variant, colour in palette.items():
                drawn = curve_drawing(live, bands, seeds, cfg, variant, metric)
                if drawn["kind"] == "band":
                    ax.plot(drawn["x"], drawn["mean"], marker="o", ms=3, color=colour, label=variant)
                    ax.fill_between(drawn["x"], drawn["lo"], drawn["hi"], color=colour, alpha=0.2, lw=0)
                for k, (x, y) in enumerate(drawn.get("seeds", [])):
                    ax.plot(x, y, marker="o", ms=2, lw=0.9, color=colour, alpha=0.8,
                            label=f"{variant} (each seed)" if k == 0 else None)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if j == 0:
                ax.set_ylabel(label)
    handles, labels = [], []
    for ax in axes.flat:  # every kind of line once, whichever column drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    title = ("Learning curves: mean and 95% CI across seeds (fewer than 3 seeds: each seed); train metrics in eval "
             "mode, all samples")
    fig.suptitle(textwrap.fill(title, int(width * 11)), x=0.02, ha="left", fontsize=12)
    lines = title.count("\n") + len(textwrap.wrap(title, int(width * 11)))
    fig.tight_layout(rect=(0, 0.05, 1, 1 - 0.035 * lines * 4.6 / (1.2 + 2.5 * len(metrics))))
    save_figure(fig, rep, "learning_curves", "train and test loss and accuracy per epoch, mean with 95% CI across "
                "seeds (each seed where fewer than 3)", figs, tight=False)


# -- assembling ------------------------------------------------------------------------------
def _incomplete_notes(members: pd.DataFrame, meta: dict) -> list[str]:
    """Each run with members that did not reach their last epoch: how far it got, and whether the
    report uses it (only where no complete run of the same configuration and seed exists)."""
    notes = []
    for run_id, g in members[~members["complete"]].groupby("run_id", sort=False):
        status = live_status(meta[run_id]) if isinstance(meta.get(run_id), dict) else None
        how = ("incomplete or still running" if status is None else "still running" if status == "running"
               else f"incomplete: {status}" if status != "complete" else "incomplete")
        text = f"run {run_id}: {g['last_epoch'].min():g} of {g['planned_epochs'].max():g} epochs recorded ({how})"
        used = g[g["used"]]
        if len(used) < len(g):
            others = members[members["used"] & members["complete"]].merge(g.loc[~g["used"], MEMBER], on=MEMBER)
            text += (f"; not used for {len(g) - len(used)} of its {len(g)} members: a complete run of the same "
                     f"configuration and seed is (run {', '.join(dict.fromkeys(others['run_id']))})")
        if len(used):
            text += (f"; {len(used)} of its members have no complete run: the tables show them apart, at the epoch "
                     f"each reached, marked incomplete")
        notes.append(text)
    return notes


def _notes(df, acc, final, members, out_dir: Path, problems: list[str], meta: dict) -> list[str]:
    notes = list(problems) + _incomplete_notes(members, meta)
    for (run_id, variant, seed), g in acc.groupby(["run_id", "variant", "seed"]):
        every = g["eval_every"].iloc[0] if "eval_every" in g else None
        if every is not None and pd.notna(every):  # windows: rows every `every` steps
            last = int(g["step"].max())
            missing = sorted(set(range(int(every), last + 1, int(every))) - set(g["step"].astype(int)))
            what = "step"
        else:
            missing = sorted(set(range(1, int(g["epoch"].max()) + 1)) - set(g["epoch"].astype(int)))
            what = "epoch"
        if missing:
            notes.append(f"run {run_id}: {variant}/seed {seed}: {what}{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))} missing (curves skip them)")
    for r in final[final["diverged"]].itertuples():
        first = df[(df.run_id == r.run_id) & (df.variant == r.variant) & (df.seed == r.seed) & df.diverged]["epoch"].min()
        notes.append(f"run {r.run_id}: {r.variant}/seed {r.seed} diverged (loss NaN/inf) at epoch {first}")
    # A loss that explodes but stays finite is not `diverged` (that is NaN/inf); a member that ends no
    # better than chance is still said, so that it cannot pass unnoticed.
    for r in final[~final["diverged"] & (final["test_acc"].astype(float) <= CHANCE)].itertuples():
        notes.append(f"run {r.run_id}: {r.variant}/seed {r.seed} ends at {r.test_acc:.2%} test accuracy, no better "
                     f"than chance (its loss stayed finite: not counted as diverged)")
    run_ids = set(df["run_id"])
    for rid, m in meta.items():
        if rid in run_ids and m.get("status") not in ("complete", None):
            notes.append(f"run {rid}: status {live_status(m)}" + (f" ({m['error']})" if m.get("error") else ""))
    events, event_problems = read_events(out_dir)
    for e in events.values():  # a sweep: the units that failed, with their reasons
        if e.get("event") == "failed":
            notes.append(f"sweep unit {e.get('index')} ({e.get('label')}) failed: {e.get('reason')}")
    return notes + event_problems  # unreadable units.jsonl lines, as `bnbench status` lists them


def _epoch_text(t: pd.DataFrame) -> list[str]:
    """The epoch a table row is at: "4" where its runs are complete, "1 of 4 (incomplete)" where not."""
    return [f"{e:g}" if c else f"{e:g} of {p:g} (incomplete)"
            for e, c, p in zip(t["epoch"], t["complete"], t["planned_epochs"])]


def _environment(meta: dict, run_ids: set) -> pd.DataFrame:
    return pd.DataFrame([{
        "run_id": rid, "status": live_status(m), "device": f"{m.get('device', '?')} ({m.get('device_name', '')})",
        # The layout where the run recorded one: processes = seed groups x dp.
        "world": (f"{m['world_size']} = {m['seed_groups']} x dp {m['dp']}" if "dp" in m else m.get("world_size", "?")),
        "torch": m.get("versions", {}).get("torch", "?"),
        "git": str(m.get("git_commit", "?"))[:12], "host": m.get("hostname", "?"),
    } for rid, m in meta.items() if rid in run_ids])


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


def build_report(out_dir, target: float = DEFAULT_TARGET) -> Path:
    out_dir = Path(out_dir)
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be a test accuracy in (0, 1], got {target}")
    try:
        df, problems = read_results(out_dir)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    if df.empty:
        raise ConfigError(f"{out_dir}/results.jsonl holds no rows" + (f"; problems: {problems}" if problems else ""))
    df["diverged"] = (df["diverged"] if "diverged" in df else False)
    df["diverged"] = df["diverged"].fillna(False).astype(bool)
    df["config"] = config_label(df)
    rep = out_dir / "report"
    refuse_own_file(rep, "the report folder")  # a link to one of the folder's own files: never written through
    rep.mkdir(parents=True, exist_ok=True)
    for old in [*rep.glob("*.png"), *rep.glob("*.svg"), *rep.glob("*.csv"), *rep.glob("report.*")]:
        old.unlink()  # the folder is the report's: nothing of an older one lingers
    meta = {}
    if (out_dir / META_FILE).exists():
        try:
            meta = json.loads((out_dir / META_FILE).read_text()).get("runs", {})
        except ValueError as e:
            problems = problems + [f"{out_dir / META_FILE} unreadable: {e}"]

    members = member_table(df)
    acc = accuracy_rows(df, members)
    final = final_rows(acc)
    headline = headline_rows(acc)
    table = final_table(final)
    pairs = paired_differences(final, acc)
    verdict = verdicts(pairs) if len(pairs) else pd.DataFrame(columns=["config", "epoch", "complete", "verdict"])
    verdict_lines = list(verdict["verdict"]) or [_no_pairs(final)]
    ttt = time_to_target(acc, target) if "train_seconds" in acc else pd.DataFrame()
    if len(ttt):
        ttt = ttt.merge(acc[["run_id", "config"]].drop_duplicates(), on="run_id")
    targets = target_table(ttt, target) if len(ttt) else pd.DataFrame()
    throughput = throughput_table(df) if "samples_per_s" in df else pd.DataFrame()
    figs = _figures(acc, headline, ttt, throughput, rep, target)
    sens_figs, sens_text, sens_table = sensitivity_section(headline, CONFIG_KEYS, rep)
    if len(sens_table):
        sens_table.to_csv(rep / "sensitivity.csv", index=False)
    inside_figs, inside_text, inside_problems = inside_section(out_dir, df, rep, target)
    notes = _notes(df, acc, final, members, out_dir, problems + inside_problems, meta)
    env = _environment(meta, set(df["run_id"]))

    summary = table.merge(targets.drop(columns=["max_epochs_run"]), on=["config", "variant"], how="left") if len(targets) else table
    summary = summary.merge(verdict.drop(columns=["verdict", "complete"]).rename(columns={"n": "pairs"}),
                            on=["config", "epoch"], how="left") if len(verdict) else summary
    summary.to_csv(rep / "summary.csv", index=False)
    table.to_csv(rep / "final_accuracy.csv", index=False)
    pairs.to_csv(rep / "paired_difference.csv", index=False)

    table_show = table
    if len(table):
        table_show = table.assign(**{"mean ± std": [f"{m:.4f} ± {sd:.4f}" if np.isfinite(sd) else f"{m:.4f}"
                                                    for m, sd in zip(table["mean"], table["std"])]})
        table_show["epoch"] = _epoch_text(table)
        table_show = table_show[["config", "variant", "mean ± std", "min", "max", "n", "diverged", "epoch"]]
    pairs_show = pairs.assign(difference_pp=pairs["difference"] * 100).drop(columns=["difference", "complete"])
    if len(pairs_show):
        pairs_show["epoch"] = _epoch_text(pairs.merge(table[["config", "planned_epochs"]].drop_duplicates("config"),
                                                      on="config", how="left"))
    if len(targets):
        targets = targets.assign(target=targets["target"].map("{:.2%}".format),
                                 median_epochs=targets["median_epochs"].map(lambda v: f"{v:g}" if np.isfinite(v) else "-"),
                                 median_seconds=targets["median_seconds"].map(lambda v: f"{v:.1f}" if np.isfinite(v) else "-"))
    if len(throughput):
        throughput = throughput.assign(**{c: throughput[c].map("{:,.0f}".format) for c in ("samples_per_s", "min", "max")},
                                       scaling_efficiency=throughput["scaling_efficiency"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else "-"))
    sync_note = ("" if "sync_bn" in df and df["sync_bn"].nunique() > 1
                 else "No runs both with and without --sync-bn here (a sweep with sync_bn = [false, true] and nproc > 1 gives them).")
    title = f"Results: {out_dir / 'results.jsonl'} ({len(df)} rows, {df['run_id'].nunique()} runs, {df['config'].nunique()} configurations)."
    sections = [
        ("Verdict", "list", verdict_lines),
        ("Final test accuracy per variant", "table", table_show),
        ("Paired difference per seed (BN - no-BN)", "table", pairs_show),
        (f"Time to {target:.2%} test accuracy", "table", targets),
        ("Throughput and scaling", "table", throughput),
        ("Synchronised BN", "list", [sync_note] if sync_note else []),
        ("Figures", "figures", figs),
        ("Sensitivity: BN and no-BN across each setting that varies", "list", sens_text),
        ("Figures: sensitivity", "figures", sens_figs),
        ("Inside the network: Ioffe & Szegedy's Figure 1, gradients, internal covariate shift", "list", inside_text),
        ("Figures: inside the network", "figures", inside_figs),
        ("Missing, failed, diverged, problems", "list", notes or ["none"]),
        ("Environment", "table", env),
    ]
    _write_md(rep, title, sections)
    _write_html(rep, title, sections)
    return rep / "report.html"


def _write_md(rep: Path, title: str, sections) -> None:
    md = ["# bnbench report", "", title, ""]
    for name, kind, body in sections:
        if kind == "table" and len(body):
            md += [f"## {name}", "", _md_table(body), ""]
        elif kind == "list" and body:
            md += [f"## {name}", "", *[f"- {x}" for x in body], ""]
        elif kind == "figures" and body:
            md += [f"## {name}", "", *[f"![{cap}]({n})" for n, cap in body], ""]
    (rep / "report.md").write_text("\n".join(md))


def _write_html(rep: Path, title: str, sections) -> None:
    def img(name: str, cap: str) -> str:
        b64 = base64.b64encode((rep / name).read_bytes()).decode()
        return (f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{html.escape(cap)}</figcaption></figure>")

    parts = []
    for name, kind, body in sections:
        if kind == "table" and len(body):
            parts.append(f"<h2>{html.escape(name)}</h2>{_html_table(body)}")
        elif kind == "list" and body:
            cls = ' class="verdict"' if name == "Verdict" else ""
            parts.append(f"<h2>{html.escape(name)}</h2><ul{cls}>{''.join(f'<li>{html.escape(x)}</li>' for x in body)}</ul>")
        elif kind == "figures" and body:
            parts.append(f"<h2>{html.escape(name)}</h2>{''.join(img(n, c) for n, c in body)}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnbench report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table.t{{border-collapse:collapse;margin:.5em 0}} table.t td,table.t th{{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}}
figure{{margin:1em 0}} img{{max-width:100%}} figcaption{{color:#555;font-size:.9em}}
.verdict li{{font-size:1.1em;margin:.3em 0}}
</style></head><body>
<h1>bnbench report</h1>
<p>{html.escape(title)}</p>
{''.join(parts)}
</body></html>
"""
    (rep / "report.html").write_text(page)
