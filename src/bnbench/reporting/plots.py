"""The report's own figures: final accuracy, learning curves, time to target, throughput, synchronised BN.

Each is drawn only where its axis has at least two points (a figure of one dot says nothing a sentence
does not); configurations are named "C1: lr=0.001, ..." as in the key table. Figures come back as
figures.Drawn, made inside figures.style().
"""
from __future__ import annotations

import textwrap

import pandas as pd

from .figures import LABELS, PALETTE, curve_bands, fixed_jitter, keep, new_figure
from .stats import MIN_PAIRS, mean_ci95

CURVES = [("test_acc", "test accuracy"), ("test_loss", "test loss (nats)"),
          ("train_acc", "train accuracy"), ("train_loss", "train loss (nats)")]


def _named(names: dict, cfg: str) -> str:
    return names.get(cfg, cfg)


def main_figures(acc, headline, ttt, throughput, target: float, names: dict) -> list:
    """The figures of the report's main section (figures.Drawn), each where it has something to show.
    names: config label -> how a figure names it ("C1: ..." where there are several)."""
    import matplotlib.ticker
    import seaborn as sns

    present = set(acc["variant"])  # the variants these rows hold, in the palette's order
    palette = {LABELS[k]: c for k, c in PALETTE.items() if k in present}
    order = [LABELS[k] for k in PALETTE if k in present]
    figs: list = []
    configs = sorted(acc["config"].unique(), key=lambda c: list(names).index(c) if c in names else len(names))
    live = acc[~acc["diverged"]].assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)))

    final = headline[~headline["diverged"]].assign(
        variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)),
        config=lambda d: [_named(names, c) if whole else f"{_named(names, c)} (epoch {e:g}, incomplete runs)"
                          for c, whole, e in zip(d["config"], d["complete"], d["epoch"])])
    if len(final) >= 2:
        fig, ax = new_figure(figsize=(9, 1.2 + 0.9 * len(configs)))
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
        keep(fig, "final_accuracy", "final test accuracy per configuration: every seed as a point over a box", figs)

    if len(live) and live["epoch"].nunique() >= 2:  # one epoch: the tables say it all
        learning_curves(live, configs, palette, names, figs)

    hit = ttt[ttt["reached"]] if len(ttt) else ttt
    if len(hit) and hit["epochs"].nunique() >= 2:
        hit = hit.assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)),
                         config=lambda d: d["config"].map(lambda c: _named(names, c)))
        fig, ax = new_figure(figsize=(9, 1.2 + 0.9 * hit["config"].nunique()))
        with fixed_jitter():
            sns.stripplot(data=hit, x="epochs", y="config", hue="variant", hue_order=order, palette=palette, ax=ax,
                          dodge=True, size=7, jitter=0.15)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(f"epochs until test accuracy first reaches {target:.2%} (members that never do: in the table)")
        ax.set_ylabel("")
        ax.set_yticks(ax.get_yticks(), [textwrap.shorten(t.get_text(), 60) for t in ax.get_yticklabels()])
        ax.set_title(f"Time to {target:.2%} test accuracy")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="")
        keep(fig, "time_to_target", f"epochs to {target:.2%} test accuracy, one point per member", figs)

    if len(throughput) and "world_size" in throughput and throughput["world_size"].nunique() >= 2:
        fig, ax = new_figure(figsize=(8, 4))
        setting = [k for k in ("device_name", "engine", "sync_bn", "dp") if k in throughput]
        shown = throughput.assign(setting=throughput[setting].astype(str).agg(" / ".join, axis=1))
        sns.pointplot(data=shown, x="world_size", y="samples_per_s", hue="setting", ax=ax, markers="o", linestyles="-")
        for r in shown.itertuples():
            ax.plot([list(sorted(shown["world_size"].unique())).index(r.world_size)] * 2, [r.min, r.max], color="grey", lw=1)
        ax.set_xlabel("processes (world size)")
        ax.set_ylabel("member-samples / s (median over runs; bar: range)")
        ax.set_title("Training throughput (evaluation excluded)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title=" / ".join(setting))
        keep(fig, "throughput", "member-samples per second by world size, device, engine, sync BN "
             "and data-parallel size (dp; world size / dp seed groups)", figs)

    syncable = headline[~headline["diverged"] & headline["variant"].isin(["bn", "brn"])]  # what --sync-bn changes
    if ("sync_bn" in syncable and syncable["sync_bn"].nunique() > 1 and "per_device_batch" in syncable
            and syncable["per_device_batch"].nunique() >= 2):
        shown = syncable.assign(variant=lambda d: d["variant"].map(lambda v: LABELS.get(v, v)),
                                sync=lambda d: d["sync_bn"].map({True: "sync BN", False: "per-process BN"}))
        fig, ax = new_figure(figsize=(8, 4))
        sns.pointplot(data=shown, x="per_device_batch", y="test_acc", hue="sync", ax=ax, errorbar=mean_ci95,
                      dodge=0.2, markers=["o", "s"], linestyles=["-", "--"])
        ax.set_xlabel("per-process batch (samples)")
        ax.set_ylabel("final test accuracy, mean and 95% CI")
        ax.set_title("Synchronised vs per-process BN statistics")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="")
        keep(fig, "sync_bn", "final test accuracy with and without --sync-bn against per-process batch", figs)
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


def learning_curves(live: pd.DataFrame, configs: list[str], palette: dict, names: dict, figs: list) -> None:
    """Train and test loss and accuracy per epoch: the metrics side by side, one row per configuration, one
    legend. With 3 or more seeds a variant is its mean and Student-t 95% band (accuracy bands clipped to
    [0, 1], where a fraction lives); with fewer, a t-interval says nothing (from 2 points it spanned -0.5
    to 1.05), so each seed is drawn."""
    from matplotlib.ticker import MaxNLocator

    metrics = [(m, label) for m, label in CURVES if m in live and live[m].notna().any()]
    bands = curve_bands(live, [m for m, _ in metrics])
    seeds = live.groupby(["config", "variant"])["seed"].nunique()
    several = len(configs) > 1
    fig, axes = new_figure(len(configs), len(metrics), figsize=(3.2 * len(metrics) + (0.9 if several else 0.4),
                                                                0.9 + 2.7 * len(configs)),
                           squeeze=False, sharex=True)
    fig.set_layout_engine("constrained")
    for i, cfg in enumerate(configs):
        if several:
            axes[i, 0].set_ylabel("\n".join(textwrap.wrap(_named(names, cfg), 28)), fontsize=10)
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i, j]
            if i == 0:
                ax.set_title(label, fontsize=12)
            if i == len(configs) - 1:
                ax.set_xlabel("epoch")
            for variant, colour in palette.items():
                drawn = curve_drawing(live, bands, seeds, cfg, variant, metric)
                if drawn["kind"] == "band":
                    ax.plot(drawn["x"], drawn["mean"], marker="o", ms=3, color=colour, label=variant)
                    ax.fill_between(drawn["x"], drawn["lo"], drawn["hi"], color=colour, alpha=0.2, lw=0)
                for k, (x, y) in enumerate(drawn.get("seeds", [])):
                    ax.plot(x, y, marker="o", ms=2, lw=0.9, color=colour, alpha=0.8,
                            label=f"{variant} (each seed)" if k == 0 else None)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = [], []
    for ax in axes.flat:  # every kind of line once, whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside upper right", ncol=len(labels), frameon=False)
    fig.suptitle("Learning curves: mean and 95% CI across seeds (fewer than 3 seeds: each seed); train metrics in "
                 "eval mode, all samples", x=0.01, ha="left", fontsize=12)
    fig.draw_without_rendering()  # the layout, once: then fixed, so that each save or display does not redo it
    fig.set_layout_engine("none")
    keep(fig, "learning_curves", "train and test loss and accuracy per epoch, mean with 95% CI across seeds (each "
         "seed where fewer than 3)", figs, tight=False)
