"""Report: any results folder -> DIR/report/{report.html, report.md, *.png, *.svg, summary.csv}.

Reads top-down, from the verdict to the detail: each variant's paired difference to the baseline (the lab's:
BN - no-BN) per configuration, with Holm's adjustment where several comparisons are shown together,
the configurations (named once, C1, C2, ... in the tables after), final accuracy, learning curves, time
to a target accuracy, throughput and scaling, synchronised BN, then what is missing, failed or diverged,
and the environment. Works on partial data (a sweep still running, one seed, a diverged member) and says
what is missing. Which rows it reads: select.py; its tables: tables.py; its figures: plots.py,
sensitivity.py, instruments.py; its pages: html.py. `figures()` gives the figures alone, as objects.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import ConfigError
from ..store.folder import META_FILE
from ..store.record import live_status
from ..store.results import ResultsProblem, read_events, read_results, refuse_own_file
from .figures import SHORT, save_figures, style
from .html import write_html, write_md
from .instruments import inside_section
from .plots import CURVES, curve_drawing, main_figures
from .select import (CONFIG_KEYS, MEMBER, accuracy_rows, config_ids, config_keys, config_label, final_rows,
                     headline_rows, member_table, prepare)
from .sensitivity import sensitivity_section
from .stats import mean_ci95, time_to_target
from .tables import (all_verdicts, baseline_of, comparisons, cost_table, environment, final_table, key_table,  # noqa: F401
                     long_pairs, no_pairs, paired_differences, shown_costs, shown_final, shown_pairs, shown_targets,
                     shown_throughput, target_table, throughput_table, verdicts)

CHANCE = 2 / 10  # "no better than chance": at most twice the 10% of guessing one of MNIST's 10 classes
DEFAULT_TARGET = 0.97  # test accuracy for time-to-target (MLPerf / DAWNBench style)
KEPT = "screenshot-*.png"  # in the report folder, kept when it is rebuilt: a browser's picture of the page

__all__ = ["build_report", "paired_differences", "figures", "tables", "verdict", "read_folder", "analyse", "mean_ci95", "final_rows", "accuracy_rows",
           "member_table", "config_label", "config_keys", "CONFIG_KEYS", "CURVES", "curve_drawing", "DEFAULT_TARGET"]


def read_folder(out_dir) -> tuple[pd.DataFrame, list[str], dict]:
    """(rows as the report reads them, problems, meta.json's runs) of a results folder; a folder without rows:
    ConfigError with the line `bnbench report` prints."""
    out_dir = Path(out_dir)
    try:
        df, problems = read_results(out_dir)
    except ResultsProblem as e:
        raise ConfigError(str(e)) from None
    if df.empty:
        raise ConfigError(f"{out_dir}/results.jsonl holds no rows" + (f"; problems: {problems}" if problems else ""))
    meta = {}
    if (out_dir / META_FILE).exists():
        try:
            meta = json.loads((out_dir / META_FILE).read_text()).get("runs", {})
        except ValueError as e:
            problems = problems + [f"{out_dir / META_FILE} unreadable: {e}"]
    return prepare(df), problems, meta


@dataclass
class Analysis:
    """Everything the report states, computed from rows: which rows it reads, its tables, its verdicts."""

    df: pd.DataFrame
    target: float
    problems: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    baseline: str | None = None  # the variant the others are compared with (default nobn, else the first)

    def __post_init__(self):
        self.members = member_table(self.df)
        self.acc = accuracy_rows(self.df, self.members)
        self.final = final_rows(self.acc)
        self.headline = headline_rows(self.acc)
        self.table = final_table(self.final)
        self.baseline = baseline_of(set(self.final["variant"]), self.baseline)
        self.compared = comparisons(self.final, self.acc, self.baseline)
        # Only the lab's variants, compared as the lab compares them: the report reads as it always did.
        variants = set(self.final["variant"])
        self.lab = variants <= {"bn", "nobn"} and (self.baseline == "nobn" or "nobn" not in variants)
        self.pairs = paired_differences(self.final, self.acc) if self.lab else long_pairs(self.compared, self.baseline)
        self.ids = config_ids(self.df)
        several = len(self.ids) > 1
        self.names = {c: f"{i}: {c}" if several else c for i, c in zip(self.ids["id"], self.ids["config"])}
        order = {c: k for k, c in enumerate(self.ids["config"])}
        said = {c: f"{i} ({c})" if several else c for i, c in zip(self.ids["id"], self.ids["config"])}
        if self.lab:
            self.verdict = (verdicts(self.pairs, said) if len(self.pairs)
                            else pd.DataFrame(columns=["config", "epoch", "complete", "verdict"]))
        else:
            self.verdict = all_verdicts(self.compared, self.baseline, said)
        by_id = self.verdict.assign(_o=self.verdict["config"].map(order)).sort_values("_o", kind="stable")
        self.verdict_lines = list(by_id["verdict"]) or [no_pairs(self.final)]
        if len(self.verdict) and not self.lab:  # a configuration with nothing to compare is said, not dropped
            for cfg, g in self.final.groupby("config", sort=False):
                if cfg not in set(self.verdict["config"]):
                    held = ", ".join(SHORT.get(v, v) for v in sorted(set(g["variant"])))
                    self.verdict_lines.append(f"{said.get(cfg, cfg)}: only {held} here: no paired comparison against "
                                              f"{SHORT.get(self.baseline, self.baseline)}.")
        ttt = time_to_target(self.acc, self.target) if "train_seconds" in self.acc else pd.DataFrame()
        self.ttt = ttt.merge(self.acc[["run_id", "config"]].drop_duplicates(), on="run_id") if len(ttt) else ttt
        self.targets = target_table(self.ttt, self.target) if len(self.ttt) else pd.DataFrame()
        self.throughput = throughput_table(self.df) if "samples_per_s" in self.df else pd.DataFrame()
        self.costs = cost_table(self.df, self.baseline)  # empty for rows without the cost probe's rates


def analyse(df: pd.DataFrame, problems=(), meta=None, target: float = DEFAULT_TARGET,
            baseline: str | None = None) -> Analysis:
    return Analysis(df, target, list(problems), meta or {}, baseline)


@dataclass
class Drawing:
    """The figures of each section (figures.Drawn) and what the sensitivity and inside sections say."""

    main: list
    sensitivity: list
    sensitivity_text: list
    sensitivity_table: pd.DataFrame
    inside: list
    inside_text: list
    inside_problems: list
    inside_table: pd.DataFrame


def draw(a: Analysis, out_dir: Path | None) -> Drawing:
    """Every figure of the report, inside figures.style(); the inside-the-network section needs the folder."""
    with style():
        main = main_figures(a.acc, a.headline, a.ttt, a.throughput, a.target, a.names)
        sens = sensitivity_section(a.headline, CONFIG_KEYS, a.baseline)
        inside = inside_section(out_dir, a.df, a.target) if out_dir is not None else ([], [], [], pd.DataFrame())
    return Drawing(main, *sens, *inside)


def _analysis(source, target: float) -> tuple[Analysis, Path | None]:
    """The analysis of a results folder, or of rows (a DataFrame as read_results gives; then no folder)."""
    if isinstance(source, pd.DataFrame):
        if source.empty:
            raise ConfigError("no rows: nothing to report")
        return analyse(prepare(source), target=target), None
    df, problems, meta = read_folder(source)
    return analyse(df, problems, meta, target), Path(source)


def figures(source, target: float = DEFAULT_TARGET) -> dict:
    """The report's figures as matplotlib Figures, by file stem: from a results folder, or from rows (then
    no inside-the-network figures, which need the folder's instruments.jsonl)."""
    a, folder = _analysis(source, target)
    d = draw(a, folder)
    return {x.stem: x.figure for x in d.main + d.sensitivity + d.inside}


def shown_tables(a: Analysis) -> dict:
    """The report's tables as it shows them, by name; those with no rows left out."""
    tables = {"configurations": key_table(a.df, a.ids)[0], "final_accuracy": shown_final(a.table, a.ids),
              "paired_difference": shown_pairs(a.pairs, a.table, a.ids),
              "time_to_target": shown_targets(a.targets, a.ids), "throughput": shown_throughput(a.df, a.throughput)[0],
              "variant_cost": shown_costs(a.costs, a.baseline)[0]}
    return {name: t.reset_index(drop=True) for name, t in tables.items() if len(t)}


def tables(source, target: float = DEFAULT_TARGET) -> dict:
    return shown_tables(_analysis(source, target)[0])


def verdict(source, target: float = DEFAULT_TARGET) -> list[str]:
    """The report's verdict: a sentence per configuration (and per epoch for seeds without a complete run)."""
    return _analysis(source, target)[0].verdict_lines


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


def _notes(a: Analysis, out_dir: Path, problems: list[str]) -> list[str]:
    df, acc, final, meta = a.df, a.acc, a.final, a.meta
    notes = list(problems) + _incomplete_notes(a.members, meta)
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


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def build_report(out_dir, target: float = DEFAULT_TARGET, baseline: str | None = None) -> Path:
    out_dir = Path(out_dir)
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be a test accuracy in (0, 1], got {target}")
    df, problems, meta = read_folder(out_dir)
    rep = out_dir / "report"
    refuse_own_file(rep, "the report folder")  # a link to one of the folder's own files: never written through
    rep.mkdir(parents=True, exist_ok=True)
    kept = set(rep.glob(KEPT))
    for old in [*rep.glob("*.png"), *rep.glob("*.svg"), *rep.glob("*.csv"), *rep.glob("report.*")]:
        if old not in kept:
            old.unlink()  # the folder is the report's: nothing of an older one lingers

    a = analyse(df, problems, meta, target, baseline)
    d = draw(a, out_dir)
    with style():
        main = dict(zip([x.stem for x in d.main], save_figures(d.main, rep)))
        sens_figs, inside_figs = save_figures(d.sensitivity, rep), save_figures(d.inside, rep)
    if len(d.sensitivity_table):
        d.sensitivity_table.to_csv(rep / "sensitivity.csv", index=False)
    if len(d.inside_table):
        d.inside_table.to_csv(rep / "instruments_summary.csv", index=False)
    notes = _notes(a, out_dir, problems + d.inside_problems)

    table, targets, verdict = a.table, a.targets, a.verdict
    summary = table.merge(targets.drop(columns=["max_epochs_run"]), on=["config", "variant"], how="left") if len(targets) else table
    by = ["config", "epoch", "variant"] if "variant" in verdict else ["config", "epoch"]
    summary = summary.merge(verdict.drop(columns=["verdict", "complete", "baseline"], errors="ignore")
                            .rename(columns={"n": "pairs"}), on=by, how="left") if len(verdict) else summary
    summary.to_csv(rep / "summary.csv", index=False)
    table.to_csv(rep / "final_accuracy.csv", index=False)
    a.pairs.to_csv(rep / "paired_difference.csv", index=False)
    if len(a.costs):
        a.costs.to_csv(rep / "variant_cost.csv", index=False)

    shown = shown_tables(a)
    key_text, throughput_text = key_table(df, a.ids)[1], shown_throughput(df, a.throughput)[1]
    cost_text = shown_costs(a.costs, a.baseline)[1]
    table_of = lambda name: shown.get(name, pd.DataFrame())  # noqa: E731
    sync_note = ("" if "sync_bn" in df and df["sync_bn"].nunique() > 1
                 else "No runs both with and without --sync-bn here (a sweep with sync_bn = [false, true] and nproc > 1 gives them).")
    live = a.acc[~a.acc["diverged"]]
    curves_note = ("One evaluation per member: no curve to draw (the tables give its numbers)."
                   if len(live) and live["epoch"].nunique() < 2 else "")
    title = (f"Results: {out_dir / 'results.jsonl'} ({_count(len(df), 'row')}, {_count(df['run_id'].nunique(), 'run')}, "
             f"{_count(len(a.ids), 'configuration')}).")
    pick = lambda *stems: [main[s] for s in stems if s in main]  # noqa: E731
    sections = [
        ("Verdict", [("list", a.verdict_lines)]),
        ("Configurations" if len(a.ids) > 1 else "Configuration", [("text", key_text), ("table", table_of("configurations"))]),
        ("Final test accuracy per variant", [("table", table_of("final_accuracy")), ("figures", pick("final_accuracy"))]),
        (("Paired difference per seed (BN - no-BN)" if a.lab else
          f"Paired difference per seed (each variant minus {SHORT.get(a.baseline, a.baseline)})"),
         [("table", table_of("paired_difference"))]),
        ("Learning curves", [("text", curves_note), ("figures", pick("learning_curves"))]),
        (f"Time to {target:.2%} test accuracy", [("table", table_of("time_to_target")), ("figures", pick("time_to_target"))]),
        ("Throughput and scaling", [("text", throughput_text), ("table", table_of("throughput")), ("figures", pick("throughput")),
                                    ("text", cost_text), ("table", table_of("variant_cost"))]),
        ("Synchronised BN", [("text", sync_note), ("figures", pick("sync_bn"))]),
        ("Sensitivity: BN and no-BN across each setting that varies" if a.lab else "Sensitivity: each variant across each setting that varies", [("list", d.sensitivity_text), ("figures", sens_figs)]),
        ("Inside the network: Ioffe & Szegedy's Figure 1, gradients, internal covariate shift",
         [("list", d.inside_text), ("figures", inside_figs)]),
        ("Missing, failed, diverged, problems", [("list", notes or ["none"])]),
        ("Environment", [("table", environment(meta, set(df["run_id"])))]),
    ]
    write_md(rep, title, sections)
    write_html(rep, title, sections)
    return rep / "report.html"
