"""The report's section for runs with --instrument: what BN changes inside the network.

Per configuration: Ioffe & Szegedy (2015) Figure 1 (test accuracy against steps; the 15/50/85th
percentiles of the input to a sigmoid of the last hidden layer, without and with BN), a
layer x step heatmap of gradient norms, Santurkar et al. (2018)'s ICS and gradient-
predictiveness measures, and a paragraph that states what they show, with the numbers
(also in instruments_summary.csv).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .figures import LABELS, PALETTE, curve_bands, keep, new_figure
from ..store.results import read_instruments


def inside_section(out_dir: Path, df: pd.DataFrame, target: float):
    """(figures, paragraphs, problems, the numbers as a table) for every configuration with instrument rows;
    empty without. Figures: figures.Drawn, to be drawn inside figures.style()."""
    inst, problems = read_instruments(out_dir)
    if inst.empty:
        return [], [], problems, pd.DataFrame()
    labels = df[["run_id", "config"]].drop_duplicates()
    orphans = sorted(set(inst["run_id"]) - set(labels["run_id"]))
    if orphans:  # measures of a run with no results rows (killed before its first window was written)
        problems = problems + [f"instruments.jsonl: rows of run(s) {', '.join(orphans)} have no results rows; not shown"]
    inst = inst.merge(labels, on="run_id")
    inst = inst[inst["value"].notna()]
    figs, text, summary = [], [], []
    configs = by_config(inst, df)
    for i, (cfg, g, runs, acc) in enumerate(configs, start=1):
        stem = f"inside{i}" if len(configs) > 1 else "inside"
        _figure1(g, acc, cfg, stem, figs)
        _heatmap(g, cfg, stem, figs)
        _ics(g, cfg, stem, figs)
        n = numbers(g, runs, acc, target)
        summary += [{"config": cfg, "variant": v, **vals} for v, vals in n.items()]
        text.append(paragraph(cfg, n, target))
    return figs, text, problems, pd.DataFrame(summary)


def by_config(inst: pd.DataFrame, df: pd.DataFrame) -> list[tuple]:
    """(config, its instrument rows, its live result rows, test accuracy against steps as mean and
    t-interval over seeds) per configuration; `inst` already carries each row's config."""
    out = []
    for cfg, g in sorted(inst.groupby("config"), key=lambda kv: kv[0]):
        runs = df[(df["config"] == cfg) & ~df["diverged"]]
        acc = (curve_bands(runs, ["test_acc"], x="step") if len(runs)
               else pd.DataFrame(columns=["variant", "step", "mean", "half"]))
        out.append((cfg, g, runs, acc))
    return out


# -- numbers -------------------------------------------------------------------------------------
def numbers(g: pd.DataFrame, runs: pd.DataFrame, acc: pd.DataFrame, target: float) -> dict[str, dict]:
    """Per variant, the figures the paragraph quotes; each name says what it summarises over."""
    out = {}
    for v in [v for v in ("nobn", "bn") if v in set(g["variant"])]:
        mine, a = g[g["variant"] == v], acc[acc["variant"] == v].sort_values("step")
        n = {"seeds": int(mine["seed"].nunique()), "last_step": int(a["step"].max()) if len(a) else None,
             "final_test_acc": float(a["mean"].iloc[-1]) if len(a) else float("nan")}
        hit = a[a["mean"] >= target]
        n["step_to_target"] = int(hit["step"].iloc[0]) if len(hit) else None  # of the mean curve
        # The same, member by member: a mean curve can stay below a target that most seeds pass.
        own = runs[runs["variant"] == v]
        first = own[own["test_acc"].astype(float) >= target].groupby("seed")["step"].min()
        n["members"], n["members_reaching"] = int(own["seed"].nunique()), int(len(first))
        n["member_step_min"] = int(first.min()) if len(first) else None
        n["member_step_max"] = int(first.max()) if len(first) else None
        pre = mine[mine["measure"] == "preact"].pivot_table(index=["seed", "neuron", "step"], columns="q", values="value")
        if len(pre):
            med = pre[0.5].groupby(level=["seed", "neuron"])
            n["median_range"] = float((med.max() - med.min()).mean())  # how far the median wanders
            last = pre.groupby(level=["seed", "neuron"]).tail(1)
            n["final_spread_15_85"] = float((last[0.85] - last[0.15]).mean())
        gn = mine[mine["measure"] == "grad_norm"].pivot_table(index=["seed", "step"], columns="layer", values="value")
        if len(gn):
            ratio = gn[gn.columns.min()] / gn[gn.columns.max()]  # first layer over output layer
            n["grad_ratio_first_to_last"] = float(ratio.median())
            n["grad_first_layer"] = float(gn[gn.columns.min()].median())
        for measure in ("ics_distance", "ics_cosine"):
            vals = mine.loc[mine["measure"] == measure, "value"]
            if len(vals):
                n[f"{measure}_median"] = float(vals.median())
        change = mine[mine["measure"] == "grad_change"]
        if len(change):
            eta = float(change["eta"].max())
            n["grad_change_eta"] = eta
            n["grad_change_median"] = float(change.loc[change["eta"] == eta, "value"].median())
            scale = mine[mine["measure"] == "grad_norm_all"][["seed", "step", "value"]].rename(columns={"value": "g"})
            beta = change.merge(scale, on=["seed", "step"])
            # Santurkar et al.'s effective beta-smoothness: max over eta of ||change|| / ||eta g||.
            beta = (beta["value"] / (beta["eta"] * beta["g"])).groupby([beta["seed"], beta["step"]]).max()
            if len(beta):
                n["beta_smoothness_median"] = float(beta.median())
        out[v] = n
    return out


def paragraph(cfg: str, n: dict[str, dict], target: float) -> str:
    """What the figures show, sentence by sentence, each with its numbers (both variants needed)."""
    if not {"bn", "nobn"} <= set(n):
        have = ", ".join(LABELS[v] for v in n)
        return f"{cfg}: instruments recorded only {have}: no comparison."
    b, o = n["bn"], n["nobn"]

    def cmp(x, y, lower, higher):
        return lower if x < y else higher if x > y else "the same as"

    def at(step):
        return f"first at step {step:,}" if step is not None else "at no evaluation"

    def members(m):
        if not m["members_reaching"]:
            return f"0 of {m['members']}"
        lo, hi = m["member_step_min"], m["member_step_max"]
        steps = f"step {lo:,}" if lo == hi else f"steps {lo:,}-{hi:,}"
        return f"{m['members_reaching']} of {m['members']} ({steps})"

    parts = [f"{cfg} ({b['seeds']} seeds)."]
    if b.get("last_step"):
        parts.append(
            f"After {b['last_step']:,} steps, mean test accuracy is {b['final_test_acc']:.2%} with BN and "
            f"{o['final_test_acc']:.2%} without. The mean curve over seeds reaches {target:.0%} "
            f"{at(b['step_to_target'])} with BN and {at(o['step_to_target'])} without (Figure 1a); members that reach it "
            f"at some evaluation: {members(b)} with BN, {members(o)} without.")
    if "median_range" in b and "median_range" in o:
        parts.append(
            f"The median input to the traced sigmoids of the last hidden layer moves over a range of "
            f"{o['median_range']:.2f} during training without BN and {b['median_range']:.2f} with BN "
            f"({cmp(b['median_range'], o['median_range'], 'less', 'more')} drift with BN); at the end its 15-85th "
            f"percentile spread is {o['final_spread_15_85']:.2f} without and {b['final_spread_15_85']:.2f} with BN "
            f"(both: mean over seeds and traced units; Figure 1b, c).")
    if "grad_ratio_first_to_last" in b and "grad_ratio_first_to_last" in o:
        parts.append(
            f"The first layer's gradient norm is {o['grad_ratio_first_to_last']:.3g} times the output layer's without "
            f"BN and {b['grad_ratio_first_to_last']:.3g} times with BN (median over seeds and recorded steps; heatmap).")
    if "ics_cosine_median" in b and "ics_cosine_median" in o:
        parts.append(
            f"Internal covariate shift as Santurkar et al. define it: updating the layers below changes a layer's "
            f"gradient by a median {o['ics_distance_median']:.3g} (l2) without BN and {b['ics_distance_median']:.3g} "
            f"with BN, a median cosine of {o['ics_cosine_median']:.4f} without and {b['ics_cosine_median']:.4f} "
            f"with BN ({cmp(b['ics_cosine_median'], o['ics_cosine_median'], 'less', 'more')} aligned with BN; medians "
            f"over seeds, recorded steps and layers 2 to L).")
    if "grad_change_median" in b and "grad_change_median" in o:
        parts.append(
            f"A step of eta={b['grad_change_eta']:g} along the gradient changes the gradient by a median "
            f"{o['grad_change_median']:.3g} without BN and {b['grad_change_median']:.3g} with BN: the gradient is "
            f"{cmp(b['grad_change_median'], o['grad_change_median'], 'more', 'less')} predictive with BN in absolute terms "
            f"(medians over seeds and recorded steps, as below).")
    if "beta_smoothness_median" in b and "beta_smoothness_median" in o:
        parts.append(
            f"Relative to the step it takes, ||change|| / ||eta g|| (their effective beta-smoothness, max over eta), "
            f"the median is {o['beta_smoothness_median']:.3g} without BN and {b['beta_smoothness_median']:.3g} with BN "
            f"({cmp(b['beta_smoothness_median'], o['beta_smoothness_median'], 'smoother', 'less smooth')} with BN).")
    return " ".join(parts)


# -- figures -------------------------------------------------------------------------------------
def _figure1(g, bands, cfg, stem, figs):
    fig, axes = new_figure(1, 3, figsize=(14, 3.8))
    if len(bands):
        for v in ("nobn", "bn"):
            b = bands[bands["variant"] == v]
            axes[0].plot(b["step"], b["mean"], color=PALETTE[v], label=LABELS[v])
            axes[0].fill_between(b["step"], b["mean"] - b["half"], b["mean"] + b["half"], color=PALETTE[v], alpha=0.2, lw=0)
        axes[0].legend(frameon=False)
        # Zoom on where the curves separate, as the paper's Figure 1(a) does: the first tenth of
        # training (both nets climbing from chance) runs in from below.
        later = bands[bands["step"] >= 0.1 * bands["step"].max()]
        if len(later):
            axes[0].set_ylim(max(0.0, float((later["mean"] - later["half"]).min()) - 0.01), 1.0)
    axes[0].set(xlabel="training steps", ylabel="test accuracy", title="(a) test accuracy, mean and 95% CI over seeds")
    pre = g[g["measure"] == "preact"]
    if len(pre):
        seed, neuron = pre["seed"].min(), pre["neuron"].min()
        for ax, v, letter in ((axes[1], "nobn", "b"), (axes[2], "bn", "c")):
            p = pre[(pre["variant"] == v) & (pre["seed"] == seed) & (pre["neuron"] == neuron)].pivot_table(
                index="step", columns="q", values="value")
            if len(p):
                ax.fill_between(p.index, p[0.15], p[0.85], color=PALETTE[v], alpha=0.2, lw=0)
                for q, style in ((0.15, "--"), (0.5, "-"), (0.85, "--")):
                    ax.plot(p.index, p[q], style, color=PALETTE[v], lw=1.2, label=f"{q:.0%}")
                ax.legend(frameon=False, title="percentile", fontsize=8)
            ax.set(xlabel="training steps", ylabel="input to the sigmoid",
                   title=f"({letter}) {LABELS[v]}: unit {int(neuron)}, last hidden layer, seed {int(seed)}")
        lo, hi = min(a.get_ylim()[0] for a in axes[1:]), max(a.get_ylim()[1] for a in axes[1:])
        for a in axes[1:]:
            a.set_ylim(lo, hi)  # one scale: the drift is compared by eye
    fig.suptitle(f"Ioffe & Szegedy (2015), Figure 1, reproduced: {cfg}", x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    keep(fig, f"{stem}_figure1", "Figure 1 reproduced: (a) test accuracy against steps; (b, c) 15/50/85th "
          "percentiles of the input to a sigmoid of the last hidden layer on a fixed probe batch", figs)


def _heatmap(g, cfg, stem, figs):
    gn = g[(g["measure"] == "grad_norm") & (g["value"] > 0)]
    if gn.empty:
        return
    # Geometric mean over seeds: norms span orders of magnitude.
    logs = gn.assign(log=np.log10(gn["value"])).pivot_table(index=["variant", "layer"], columns="step", values="log")
    lo, hi = np.nanmin(logs.to_numpy()), np.nanmax(logs.to_numpy())
    variants = [v for v in ("nobn", "bn") if v in logs.index.get_level_values(0)]
    fig, axes = new_figure(1, len(variants), figsize=(6.2 * len(variants), 3.6), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], variants):
        m = logs.loc[v]
        steps = m.columns.to_numpy()
        x0, x1 = (steps.min(), steps.max()) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
        im = ax.imshow(m.to_numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi,
                       extent=(x0, x1, m.index.min() - 0.5, m.index.max() + 0.5), interpolation="nearest")
        ax.set(xlabel="training steps", ylabel=f"layer (1 = input, {int(m.index.max())} = output)", title=LABELS[v])
        ax.set_yticks(m.index.to_numpy())
        ax.grid(False)
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 ||dL/dW|| (geometric mean over seeds)")
    fig.suptitle(f"Gradient norm per layer over training: {cfg}", x=0.01, ha="left", fontsize=10)
    keep(fig, f"{stem}_grad_heatmap", "gradient norm of each Linear layer's weight over training, "
          "layer x step, without and with BN (one colour scale)", figs)


def _ics(g, cfg, stem, figs):
    ics = g[g["measure"].isin(["ics_distance", "ics_cosine", "grad_change"])]
    if ics.empty:
        return
    fig, axes = new_figure(1, 3, figsize=(14, 3.6))
    for v in ("nobn", "bn"):
        mine = ics[ics["variant"] == v]
        for ax, measure in ((axes[0], "ics_distance"), (axes[1], "ics_cosine")):
            m = mine[mine["measure"] == measure].groupby("step")["value"].agg(["median", "min", "max"])
            ax.plot(m.index, m["median"], marker="o", ms=3, color=PALETTE[v], label=LABELS[v])
            ax.fill_between(m.index, m["min"], m["max"], color=PALETTE[v], alpha=0.15, lw=0)
        c = mine[mine["measure"] == "grad_change"].groupby("eta")["value"].median()
        axes[2].plot(c.index, c.to_numpy(), marker="o", color=PALETTE[v], label=LABELS[v])
    axes[0].set(yscale="log", xlabel="training steps", ylabel="||G - G'||",
                title="(a) ICS: gradient change after the layers below update")
    axes[1].set(xlabel="training steps", ylabel="cos(G, G')", title="(b) ICS: cosine of G and G'")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[2].set(xscale="log", yscale="log", xlabel="eta (step along -gradient)",
                ylabel="||grad L(w) - grad L(w - eta g)||", title="(c) gradient predictiveness (median)")
    for axis in (axes[2].xaxis, axes[2].yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    axes[2].set_xticks(sorted(ics.loc[ics["measure"] == "grad_change", "eta"].unique()))
    for ax in axes:
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"Santurkar et al. (2018) measures, median and range over layers and seeds: {cfg}", x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    keep(fig, f"{stem}_ics", "internal covariate shift (Santurkar et al.'s definition) and gradient "
          "predictiveness, without and with BN", figs)
