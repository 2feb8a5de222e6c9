"""The report's tables: final accuracy, paired differences and verdicts, time to target, throughput and what
each variant costs; and how each is shown (a key table names every configuration once, the others say C1,
C2, ...; plain column names; throughput of a single layout as a sentence).

The computed tables (final_table, paired_differences, verdicts, target_table, throughput_table, cost_table)
keep their column names and full configuration labels: they are the CSV files beside the report.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..store.record import live_status
from ..config import ConfigError
from .figures import LABELS, PALETTE, SHORT
from .stats import MIN_PAIRS, describe_p, holm, mean_ci95, paired_test


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


def pair_columns(a: str = "bn", b: str = "nobn") -> list[str]:
    return ["config", "seed", "epoch", "complete", a, b, "difference"]


PAIR_COLUMNS = pair_columns()


def baseline_of(variants, chosen: str | None = None) -> str:
    """The variant the others are compared with: the one chosen, else nobn where present, else the first."""
    variants = [v for v in PALETTE if v in set(variants)] + sorted(set(variants) - set(PALETTE))
    if chosen is not None:
        if chosen not in variants:
            raise ConfigError(f"--baseline {chosen}: no such variant in these rows; they hold {', '.join(variants)}")
        return chosen
    return "nobn" if "nobn" in variants else variants[0]


def paired_differences(final: pd.DataFrame, acc: pd.DataFrame | None = None, a: str = "bn", b: str = "nobn") -> pd.DataFrame:
    """a - b test accuracy per (config, seed): a paired comparison (same init, same batches), at one
    epoch for both: the last epoch where both are complete, else the last epoch both reached (from acc,
    every epoch of each member; complete=False). Diverged members there are left out."""
    acc = final if acc is None else acc
    columns = pair_columns(a, b)
    if "complete" not in final:
        final = final.assign(complete=True)
    ends = final.pivot_table(index=["config", "seed"], columns="variant", values="epoch", aggfunc="max")
    if not {a, b} <= set(ends.columns):
        return pd.DataFrame(columns=columns)
    ends = ends.dropna(subset=[a, b])
    at = ends[[a, b]].min(axis=1).rename("_at").reset_index()
    pair = final[final["variant"].isin([a, b])]
    whole = pair.groupby(["config", "seed"])["complete"].all().rename("complete").reset_index()
    rows = acc[acc["variant"].isin([a, b])].drop(columns=["complete"], errors="ignore").merge(at, on=["config", "seed"])
    rows = rows[(rows["epoch"] == rows["_at"]) & ~rows["diverged"]]
    piv = rows.pivot_table(index=["config", "seed", "epoch"], columns="variant", values="test_acc", aggfunc="first")
    if not {a, b} <= set(piv.columns):
        return pd.DataFrame(columns=columns)
    piv = piv.dropna(subset=[a, b]).reset_index().merge(whole, on=["config", "seed"])
    piv["difference"] = piv[a] - piv[b]
    return piv[columns]


def comparisons(final: pd.DataFrame, acc: pd.DataFrame, baseline: str) -> list[tuple[str, pd.DataFrame]]:
    """(variant, its paired differences to the baseline) for every other variant, in palette order."""
    others = [v for v in PALETTE if v in set(final["variant"]) and v != baseline]
    others += sorted(set(final["variant"]) - set(PALETTE) - {baseline})
    return [(v, paired_differences(final, acc, v, baseline)) for v in others]


def long_pairs(compared: list[tuple[str, pd.DataFrame]], baseline: str) -> pd.DataFrame:
    """Every comparison's pairs in one table: variant, baseline, their accuracies and the difference."""
    parts = [p.rename(columns={v: "variant_acc", baseline: "baseline_acc"}).assign(variant=v, baseline=baseline)
             for v, p in compared if len(p)]
    cols = ["config", "variant", "baseline", "seed", "epoch", "complete", "variant_acc", "baseline_acc", "difference"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def verdicts(pairs: pd.DataFrame, names: dict | None = None, a: str = "bn", b: str = "nobn",
             lab: bool | None = None) -> pd.DataFrame:
    """Per config (and, for pairs without a complete run, per epoch they are at): the paired test of
    a - b test accuracy, and a sentence that says it, naming the config as names has it (default: its label)."""
    out = []
    if "complete" not in pairs:
        pairs = pairs.assign(complete=True, epoch=np.nan)
    lab = (a, b) == ("bn", "nobn") if lab is None else lab  # the lab's sentence, as it always read
    A, B = SHORT.get(a, a), SHORT.get(b, b)
    for (cfg, complete, epoch), g in pairs.groupby(["config", "complete", "epoch"], sort=False, dropna=False):
        t = paired_test(g[a], g[b])
        d = t["mean_diff"] * 100
        what = "final test accuracy" if complete else f"test accuracy at epoch {epoch:g}"
        name = (names or {}).get(cfg, cfg)
        label = name if complete else f"{name}, incomplete runs (seeds without a complete run of both variants; epoch {epoch:g})"
        if t["enough"] and (g[a] == g[b]).all():
            text = (f"{label}: {A} and {B} reach the same {what} on each of the {t['n']} paired seeds "
                    f"(every difference is 0): no effect to estimate.")
        elif t["enough"]:
            verb = "raises" if d > 0 else "lowers" if d < 0 else "does not change"
            than = "" if lab else f" against {B}"
            text = (f"{label}: {A} {verb} {what}{than} by {abs(d):.2f} pp "
                    f"[95% CI {t['ci_low'] * 100:+.2f}, {t['ci_high'] * 100:+.2f}], {describe_p(t['p_t'])} "
                    f"(paired t-test; Wilcoxon {describe_p(t['p_wilcoxon'])}), {t['n']} paired seeds; "
                    f"{A} ahead on {t['ahead']} of {t['n']}.")
        else:
            text = (f"{label}: {A} - {B} = {d:+.2f} pp over {t['n']} paired seed{'s' if t['n'] != 1 else ''}: too few "
                    f"for an interval or a p-value (at least {MIN_PAIRS} needed; run more seeds).")
        out.append({"config": cfg, "epoch": epoch, "complete": bool(complete),
                    **{k: t[k] for k in ("n", "mean_diff", "ci_low", "ci_high", "p_t", "p_wilcoxon", "ahead")},
                    "verdict": text})
    table = pd.DataFrame(out)
    if len(table):  # per config: the complete runs' verdict first
        table = table.sort_values(["config", "complete", "epoch"], ascending=[True, False, False], kind="stable")
    return table.reset_index(drop=True)


def all_verdicts(compared: list[tuple[str, pd.DataFrame]], baseline: str, names: dict | None = None) -> pd.DataFrame:
    """Every variant's verdict against the baseline, with Holm's adjustment of the t-test p-values over
    the comparisons shown together (one per variant, configuration and epoch); the sentence gives the
    adjusted p where there is more than one comparison."""
    parts = [verdicts(p, names, v, baseline, lab=False).assign(variant=v, baseline=baseline) for v, p in compared if len(p)]
    if not parts:
        return pd.DataFrame(columns=["config", "epoch", "complete", "variant", "baseline", "verdict", "p_holm"])
    table = pd.concat(parts, ignore_index=True)
    table["p_holm"] = holm([None if pd.isna(p) else float(p) for p in table["p_t"]])  # too few pairs: no p
    m = int(table["p_t"].notna().sum())
    if m > 1:
        table["verdict"] = [text if p is None or pd.isna(p) else f"{text[:-1]}; Holm-adjusted over {m} comparisons: {describe_p(p)}."
                            for text, p in zip(table["verdict"], table["p_holm"])]
    return table


def no_pairs(final: pd.DataFrame) -> str:
    """Why there is no verdict: one variant only, or divergence, said as it is."""
    have = sorted(set(final["variant"]))
    if len(have) < 2:
        if have in (["bn"], ["nobn"]):
            return f"Only {'BN' if have == ['bn'] else 'no-BN'} members here: no paired comparison (run both variants)."
        return f"Only {SHORT.get(have[0], have[0])} members here: no paired comparison (run two or more variants)."
    if set(have) == {"bn", "nobn"}:
        return "No seed has both a BN and a no-BN member that trained without diverging: no paired comparison."
    return "No seed has two variants that trained without diverging: no paired comparison."


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


def _warm(df: pd.DataFrame) -> pd.DataFrame:
    """The epochs after the first (warm-up), where there are any."""
    return df[df["epoch"] > 1] if (df["epoch"] > 1).any() else df


def throughput_table(df: pd.DataFrame) -> pd.DataFrame:
    """Member-samples/s per run (median over its epochs after the first: warm-up), then per setting
    and layout (world size, dp): median and range across runs (repeats), and scaling efficiency
    of each layout against one process of the same setting."""
    keys = [k for k in THROUGHPUT_KEYS if k in df]
    runs = _warm(df).groupby(["run_id", *keys], dropna=False)["samples_per_s"].median().reset_index()
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


COST = "variant_samples_per_s"  # the cost probe's rate (train/cost.py): each variant trained alone


def cost_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """What each variant costs: per configuration, setting and layout (the throughput table's keys) and variant, the cost
    probe's member-samples/s (each run's median over its rows, then the median and count over runs) and
    its ratio to the baseline variant's in the same setting. Empty unless rows carry it for two variants
    (rows written before the probe do not)."""
    cols = ["variant", COST, "runs", "ratio"]
    if COST not in df:
        return pd.DataFrame(columns=cols)
    rows = df[df[COST].notna()]
    if rows["variant"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    # The configuration too: a probe's rate depends on the net (width, dtype, ...), which the throughput keys omit.
    keys = [k for k in ("config", *THROUGHPUT_KEYS) if k in rows]
    runs = rows.groupby(["run_id", *keys, "variant"], dropna=False)[COST].median().reset_index()
    table = runs.groupby([*keys, "variant"], dropna=False)[COST].agg(["median", "count"]).reset_index()
    table = table.rename(columns={"median": COST, "count": "runs"})
    base = table.loc[table["variant"] == baseline, [*keys, COST]].rename(columns={COST: "_base"})
    if keys:  # merge matches missing keys (NaN) with each other, as groupby(dropna=False) kept them
        table = table.merge(base, on=keys, how="left")
    else:
        table["_base"] = base["_base"].iloc[0] if len(base) else np.nan
    table["ratio"] = table[COST] / table["_base"]
    # The baseline first, then the palette's order, as the figures have it.
    ranked = dict.fromkeys([baseline, *PALETTE, *sorted(set(table["variant"]) - set(PALETTE))])
    order = {v: i for i, v in enumerate(ranked)}
    table = table.assign(_order=table["variant"].map(order)).sort_values([*keys, "_order"], kind="stable")
    return table[[*keys, *cols]].reset_index(drop=True)


# -- shown: plain names, each configuration named once -------------------------------------------
NAMES = {"device_name": "device", "world_size": "processes", "dp": "dp", "engine": "engine", "sync_bn": "sync BN",
         "members": "members", "batch_size": "batch", "samples_per_s": "member-samples/s", "runs": "runs",
         "scaling_efficiency": "scaling efficiency", "per_device_batch": "batch per process"}


def _value(v) -> str:
    """A setting's value in a table: 1e-05, 0.001, 10 (not 0.0000, 10.0000), on / off."""
    if isinstance(v, (bool, np.bool_)):
        return "on" if v else "off"
    if isinstance(v, (float, np.floating)):
        return f"{v:g}" if np.isfinite(v) else "-"
    return str(v)


def _variant(v) -> str:
    return LABELS.get(v, v)


def _setting(k: str, v) -> str:
    """One setting as a sentence says it: "batch 100", "1 process", "sync BN off"."""
    name = NAMES.get(k, k.replace("_", " "))
    if isinstance(v, (bool, np.bool_)):
        return f"{name} {'on' if v else 'off'}"
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer() and k != "lr":
        v = int(v)
    if k in ("world_size", "members"):
        return f"{v} {'process' if k == 'world_size' else 'member'}{'' if v == 1 else 'es' if k == 'world_size' else 's'}"
    return f"{name} {v:g}" if isinstance(v, (float, np.floating)) else f"{name} {v}"


KEY_COLUMNS = ["dataset", "hidden", "activation", "optimizer", "lr", "momentum", "batch_size", "epochs", "engine", "dtype",
               "device"]


def key_table(df: pd.DataFrame, ids: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(the key table, a sentence of what every configuration shares). Several configurations: one row per
    id with the settings that vary; one: no table, the sentence names its settings."""
    shared = [k for k in KEY_COLUMNS if k in df and k not in ids.columns and df[k].notna().any()]
    first = df.iloc[0]
    said = ", ".join(_setting(k, first[k]) for k in shared if not (k == "momentum" and not first[k]))
    if len(ids) == 1:
        return pd.DataFrame(), f"One configuration: {said}." if said else ""
    table = ids.drop(columns=["config"]).rename(columns={"id": "config", **{k: NAMES.get(k, k.replace("_", " "))
                                                                              for k in ids.columns[2:]}})
    table = table.astype(object).map(_value)
    return table, (f"{len(ids)} configurations, named C1 to C{len(ids)} in the tables below; all share: {said}."
                   if said else f"{len(ids)} configurations, named C1 to C{len(ids)} in the tables below.")


def _with_ids(t: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    """config -> its id (rows in the ids' order); no config column where there is one configuration."""
    if not len(t):
        return t
    order = {c: i for i, c in enumerate(ids["config"])}
    t = t.assign(_order=t["config"].map(order)).sort_values("_order", kind="stable").drop(columns="_order")
    if len(ids) == 1:
        return t.drop(columns=["config"])
    return t.assign(config=t["config"].map(dict(zip(ids["config"], ids["id"]))))


def epoch_text(t: pd.DataFrame) -> list[str]:
    """The epoch a table row is at: "4" where its runs are complete, "1 of 4 (incomplete)" where not."""
    return [f"{e:g}" if c else f"{e:g} of {p:g} (incomplete)"
            for e, c, p in zip(t["epoch"], t["complete"], t["planned_epochs"])]


def shown_final(table: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    if not len(table):
        return table
    t = pd.DataFrame({
        "config": table["config"], "variant": table["variant"].map(_variant),
        "mean ± std": [f"{m:.4f} ± {sd:.4f}" if np.isfinite(sd) else f"{m:.4f}" for m, sd in zip(table["mean"], table["std"])],
        "95% CI": [f"{lo:.4f} to {hi:.4f}" if np.isfinite(lo) and n >= 2 else "-"
                   for lo, hi, n in zip(table["ci95_low"], table["ci95_high"], table["n"])],
        "min": table["min"], "max": table["max"], "seeds": table["n"], "diverged": table["diverged"],
        "epoch": epoch_text(table)})
    return _with_ids(t, ids)


def shown_pairs(pairs: pd.DataFrame, table: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    if not len(pairs):
        return pairs
    planned = pairs.merge(table[["config", "planned_epochs"]].drop_duplicates("config"), on="config", how="left")
    if "variant" in pairs:  # several variants against one baseline (long_pairs)
        t = pd.DataFrame({"config": pairs["config"], "seed": pairs["seed"], "epoch": epoch_text(planned),
                          "variant": pairs["variant"].map(_variant), "against": pairs["baseline"].map(_variant),
                          "variant acc": pairs["variant_acc"], "baseline acc": pairs["baseline_acc"],
                          "difference (pp)": [f"{d * 100:+.2f}" for d in pairs["difference"]]})
        return _with_ids(t, ids)
    t = pd.DataFrame({"config": pairs["config"], "seed": pairs["seed"], "epoch": epoch_text(planned),
                      "with BN": pairs["bn"], "without BN": pairs["nobn"],
                      "BN - no-BN (pp)": [f"{d * 100:+.2f}" for d in pairs["difference"]]})
    return _with_ids(t, ids)


def shown_targets(targets: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    if not len(targets):
        return targets
    t = pd.DataFrame({
        "config": targets["config"], "variant": targets["variant"].map(_variant), "reached": targets["reached"],
        "median epochs": targets["median_epochs"].map(lambda v: f"{v:g}" if np.isfinite(v) else "-"),
        "median seconds": targets["median_seconds"].map(lambda v: f"{v:.1f}" if np.isfinite(v) else "-"),
        "epochs run": targets["max_epochs_run"]})
    return _with_ids(t, ids)


def _rate(v: float) -> str:
    return f"{v:,.0f}"


def shown_throughput(df: pd.DataFrame, throughput: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(table, sentence). One setting and layout: no table, a sentence with the rate and its range. More:
    the columns that differ between rows, and a sentence with those every row shares."""
    if not len(throughput):
        return throughput, ""
    keys = [k for k in THROUGHPUT_KEYS if k in throughput]
    same = [k for k in keys if throughput[k].astype(str).nunique() == 1]
    shared = ", ".join(_setting(k, throughput[k].iloc[0]) for k in same)
    if len(throughput) == 1:
        r = throughput.iloc[0]
        warm = _warm(df.dropna(subset=["samples_per_s"]))
        if r["runs"] == 1:
            epochs = sorted(warm["epoch"].unique())
            over = f"epochs {epochs[0]:g} to {epochs[-1]:g}" if len(epochs) > 1 else f"epoch {epochs[0]:g}"
            rate = warm["samples_per_s"].astype(float)
            spread = f"median over {over}; range {_rate(rate.min())} to {_rate(rate.max())}"
        else:
            spread = f"median over {int(r['runs'])} runs, each the median of its epochs after the first; range {_rate(r['min'])} to {_rate(r['max'])}"
        return pd.DataFrame(), (f"One layout: {_rate(r['samples_per_s'])} member-samples/s ({spread}) with {shared}. "
                                f"Evaluation is not counted; a sweep over processes (nproc) draws throughput against them.")
    differ = [k for k in keys if k not in same]
    t = throughput[differ].rename(columns=NAMES).assign(**{
        "member-samples/s": throughput["samples_per_s"].map(_rate), "min": throughput["min"].map(_rate),
        "max": throughput["max"].map(_rate), "runs": throughput["runs"]})
    t[[NAMES[k] for k in differ]] = t[[NAMES[k] for k in differ]].astype(object).map(_value)
    eff = throughput["scaling_efficiency"]
    if eff.notna().any():
        t["scaling efficiency"] = eff.map(lambda v: f"{v:.2f}" if np.isfinite(v) else "-")
    how = "Median and range across runs (each run: the median of its epochs after the first, or of its only epoch)"
    return t, f"{how}; every row: {shared}." if shared else f"{how}."


def shown_costs(cost: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, str]:
    """(table, sentence) of what each variant costs (cost_table): the settings that differ between rows, the
    variant, its member-samples/s alone, the ratio to the baseline's, the runs; the sentence says how it is
    measured and names the settings every row shares."""
    if not len(cost):
        return cost, ""
    keys = [k for k in THROUGHPUT_KEYS if k in cost]
    same = [k for k in keys if cost[k].nunique(dropna=False) == 1]  # a missing value differs from a present one
    differ = [k for k in keys if k not in same]
    t = cost[differ].rename(columns=NAMES).astype(object).map(_value) if differ else pd.DataFrame(index=cost.index)
    base = SHORT.get(baseline, baseline)
    t = t.assign(**{"variant": cost["variant"].map(_variant), "member-samples/s": cost[COST].map(_rate),
                    f"ratio to {base}": cost["ratio"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else "-"),
                    "runs": cost["runs"]})
    shared = ", ".join(_setting(k, cost[k].iloc[0]) for k in same)
    text = ("What each variant costs to train: member-samples/s of that variant alone, as one stack of its run's shape "
            "(all its seeds, the batch per process), timed for a few steps before training (the cost probe; "
            f"computation only, no collectives); the median over runs, and its ratio to {base}'s in the same setting "
            "(below 1: slower).")
    return t, f"{text} The runs' settings: {shared}." if shared else text


def environment(meta: dict, run_ids: set) -> pd.DataFrame:
    return pd.DataFrame([{
        "run": rid, "status": live_status(m), "device": f"{m.get('device', '?')} ({m.get('device_name', '')})",
        # The layout where the run recorded one: processes = seed groups x dp.
        "processes": (f"{m['world_size']} = {m['seed_groups']} x dp {m['dp']}" if "dp" in m else m.get("world_size", "?")),
        "torch": m.get("versions", {}).get("torch", "?"),
        "git": str(m.get("git_commit", "?"))[:12], "host": m.get("hostname", "?"),
    } for rid, m in meta.items() if rid in run_ids])
