"""The figures of README.md and docs/*.md, computed from the committed files under reports/ (and the lab notebook).

Every figure the README or a docs page states about a committed result sits in a block

    <!-- figures: NAME (reports/readme.py) -->
    ...the text BLOCKS[NAME]() renders...
    <!-- /figures -->

Each block appears exactly once across README.md and docs/*.md, in the file whose text it belongs to.
`python reports/readme.py` rewrites the blocks from the files, in whichever file holds each; `--check`
exits 1 naming each block that differs (and its file), and tests/test_readme.py runs the check, so a
figure cannot drift from its data. Links in a block are written from the repository root and made
relative to the file that holds it (`reports/x.png` is `../reports/x.png` in docs/).
Each block states how its summaries are taken (mean or median, over what). Figures outside the
blocks are bounds the tests assert, or one-off measurements that say their date and command.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bnbench.reporting.report import config_label
from bnbench.reporting.instruments import by_config, numbers, paragraph
from bnbench.store.results import read_instruments, read_results
from bnbench.reporting.stats import describe_p, paired_test, time_to_target

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))  # the manual, by topic: the blocks follow their text there
NOTEBOOK = REPO.parent / "shared" / "reference" / "lab-9-4-batchnorm-notebook.txt"
BENCH = HERE / "bench" / "Linux-CPython-3.11-64bit"
STEP_BENCH = BENCH / "0007_97938412ae1eb7bf4a57caf88cdbb769dafd1db5_20261128_174559.json"
REPORT_BENCH = BENCH / "0002_74a23a02daea622544872f755df48729f15b0d9a_20261126_124234_uncommitted-changes.json"
INSTRUMENT_BENCH = BENCH / "0003_instruments.json"
NORM_BENCH = BENCH / "0008_4f54a52661e453829bb626417def225edee3d3f3_20261207_112948.json"
# The peers race (bench/test_peers.py), four runs of one day on this VM: one run's figures move by 20-40%.
PEER_BENCH = [BENCH / n for n in ("0009_0750aaef10de0c6684aa490c5c96473794a84974_20261207_113041.json",
                                  "0010_bcd8fbfaea14aa834894e358fb95e16a138564de_20261207_122023.json",
                                  "0011_bcd8fbfaea14aa834894e358fb95e16a138564de_20261207_122129.json",
                                  "0012_bcd8fbfaea14aa834894e358fb95e16a138564de_20261207_122239.json")]
BREAKDOWN = HERE / "bench" / "step_breakdown.json"
sys.path.insert(0, str(HERE))
import peers  # noqa: E402  (reports/peers.py)

# The FLOP of the eight batched products of one step, per member-sample: forward x@W1, h1@W2, h2@W3; backward
# dW3, dh2, dW2, dh1, dW1 (no gradient for the input), 2 FLOP per multiply-add: what reports/peers.py counts.
BMM_FLOP_PER_MEMBER_SAMPLE = peers.STEP_FLOP
MAIN_JOB_TIME = HERE / "bench" / "main_job_time.json"  # bench/main_job_time.py
COST_GROWTH = HERE / "bench" / "cost_growth.json"  # bench/cost_growth.py
TARGET = 0.97
BLOCK = re.compile(r"<!-- figures: (\S+) \(reports/readme\.py\) -->\n(.*?)<!-- /figures -->", re.S)
LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)\s]+)\)")  # a markdown link or image to a repository path


# -- reading the committed files -----------------------------------------------------------------
@functools.cache  # several blocks read one folder; none changes the frame
def rows(name: str) -> pd.DataFrame:
    df, problems = read_results(HERE / name)
    if problems:
        raise SystemExit(f"reports/{name}: {problems}")
    return df


def final(df: pd.DataFrame) -> pd.DataFrame:
    """Each member's last row: seed x variant -> test accuracy (the folders hold one run per config)."""
    last = df.sort_values("step").groupby(["lr", "variant", "seed"], as_index=False).tail(1)
    return last


@functools.cache
def meta_runs(name: str) -> list[dict]:
    return list(json.loads((HERE / name / "meta.json").read_text())["runs"].values())


def bench(path: Path) -> dict:
    """name -> (median seconds, extra_info) of one committed pytest-benchmark file."""
    data = json.loads(path.read_text())
    return {b["name"]: (b["stats"]["median"], b["extra_info"]) for b in data["benchmarks"]}


def bench_date(path: Path) -> str:
    return json.loads(path.read_text())["datetime"][:10]


def pp(x: float) -> str:
    return f"{x * 100:.2f} pp"


def verdict(df: pd.DataFrame) -> tuple[str, dict]:
    f = final(df).pivot(index="seed", columns="variant", values="test_acc")
    t = paired_test(f["bn"], f["nobn"])
    text = (f"BN raises final test accuracy by {pp(t['mean_diff'])} [95% bootstrap CI {t['ci_low'] * 100:+.2f}, "
            f"{t['ci_high'] * 100:+.2f}], {describe_p(t['p_t'])} (paired t-test")
    return text, t


def train_seconds(df: pd.DataFrame) -> float:
    """A run's training time: its windows' train_seconds (the run's clock), counted once per window."""
    return float(df.drop_duplicates(["run_id", "step"])["train_seconds"].sum())


# -- the blocks ----------------------------------------------------------------------------------
def lab() -> str:
    df = rows("lab")
    f = final(df).pivot(index="seed", columns="variant", values="test_acc")
    lines = ["| variant | final test accuracy, mean ± std over 5 seeds | min | max |", "|---|---|---|---|"]
    for v, label in (("bn", "with BN"), ("nobn", "without BN")):
        a = f[v]
        lines.append(f"| {label} | {a.mean():.4f} ± {a.std(ddof=1):.4f} | {a.min():.4f} | {a.max():.4f} |")
    text, t = verdict(df)
    n = t["n"]
    smallest = 2 / 2 ** n
    wil = ("the smallest a two-sided signed-rank test can give with {} seeds".format(n)
           if np.isclose(t["p_wilcoxon"], smallest) else "")
    note = f"; {wil}" if wil else ""
    nb = notebook_last_epoch()
    lines += ["", f"{text}; Wilcoxon {describe_p(t['p_wilcoxon'])}{note}), and is ahead on {t['ahead']} of {n} "
              f"paired seeds. The notebook's own printout stops at epoch {nb['epoch']} with two digits: validation "
              f"accuracy {nb['bn']} with BN and {nb['nobn']} without (bnbench after epoch {nb['epoch']}, mean over seeds: "
              f"{epoch_mean(df, nb['epoch'], 'bn'):.4f} and {epoch_mean(df, nb['epoch'], 'nobn'):.4f})."]
    return "\n".join(lines)


def epoch_mean(df: pd.DataFrame, epoch: int, variant: str) -> float:
    return float(df[(df["epoch"] == epoch) & (df["variant"] == variant)]["test_acc"].mean())


def notebook_last_epoch() -> dict:
    """The last VALID line the lab notebook printed (its output is cut after that)."""
    found = re.findall(r"\[Epoch (\d+)-VALID\].*?bn_acc:([\d.]+)\).*?nn_acc:([\d.]+)\)", NOTEBOOK.read_text())
    epoch, bn, nobn = found[-1]
    return {"epoch": int(epoch), "bn": bn, "nobn": nobn}


def lab_time() -> str:
    run = meta_runs("lab")[0]
    wall = (pd.Timestamp(run["finished"]) - pd.Timestamp(run["started"])).total_seconds()
    df = rows("lab")
    return (f"The committed run (`reports/lab/meta.json`, {run['started'][:10]}) took {wall:.0f} s from start to "
            f"finish, {train_seconds(df):.0f} s of it training, on this 2-core VM; `./launch.sh` adds Python and torch "
            f"start-up and the report.")


def report_example() -> str:
    text, t = verdict(rows("lab"))
    return (f'Example: "{text}; Wilcoxon {describe_p(t["p_wilcoxon"])}), {t["n"]} paired seeds" '
            f"(`reports/lab`).")


def report_bench() -> str:
    sec, _ = bench(REPORT_BENCH)["test_report_1000_rows"]
    return (f"`bench/test_report.py` times a 1,000-row report (4 configurations × 2 variants × 5 seeds × 25 epochs): "
            f"{sec:.1f} s median on this 2-core VM ({bench_date(REPORT_BENCH)}, `./launch.sh bench -k report`, "
            f"`reports/bench/…0002…json`), most of it drawing and saving the figures as PNG and SVG.")


def lr_scan() -> str:
    df = rows("lr_scan")
    f = final(df)
    steps = int(f["step"].max())
    mean = f.groupby(["variant", "lr"])["test_acc"].mean().unstack("lr")
    correct = f.groupby(["variant", "lr"])["test_correct"].sum().unstack("lr")
    total = int(f.groupby(["variant", "lr"])["test_total"].sum().iloc[0])
    seeds = int(f["seed"].nunique())
    lrs = list(mean.columns)
    nobn = mean.loc["nobn"]
    best = nobn.idxmax()
    second = nobn.drop(best).idxmax()
    gap = int(correct.loc["nobn", best] - correct.loc["nobn", second])
    per_seed = f[(f["variant"] == "nobn") & (f["lr"] == best)]["test_correct"]
    seed_gap = int(per_seed.max() - per_seed.min())
    # Exact means (correct / total over the seeds), every digit shown: 4 digits would round halfway values.
    digits = int(np.ceil(np.log10(total)))
    exact = lambda v, lr: f"{correct.loc[v, lr] / total:.{digits}f}"
    cell = lambda v, lr: f"**{exact(v, lr)}**" if v == "nobn" and lr in (best, second) else exact(v, lr)
    lines = [
        "| lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
        f"| without BN, test accuracy after {steps:,} steps ({seeds} seeds: correct / {total:,}) | "
        + " | ".join(cell("nobn", lr) for lr in lrs) + " |",
        "| with BN | " + " | ".join(cell("bn", lr) for lr in lrs) + " |",
        "",
        f"For the no-BN net, lr {best:g} and {second:g} tie: {gap} test image{'s' if gap != 1 else ''} of "
        f"{total:,} ({seeds} seeds × {total // seeds:,}) apart, while the {seeds} seeds at lr {best:g} alone differ by {seed_gap} images. bnbench takes "
        f"{min(best, second):g}, the lower of the two.",
    ]
    return "\n".join(lines)


def inside(name: str):
    """(rows, instrument rows, the report's numbers) of a one-configuration instrumented folder."""
    df = rows(name)
    df = df.assign(config=config_label(df))
    inst, problems = read_instruments(HERE / name)
    if problems:
        raise SystemExit(f"reports/{name}: {problems}")
    inst = inst[inst["value"].notna()].assign(config=df["config"].iloc[0])
    (cfg, g, runs, acc), = by_config(inst, df)
    return df, g, numbers(g, runs, acc, TARGET)


def quoted_paragraph(name: str) -> str:
    """The report's paragraph, recomputed by the report's own function from the folder's files."""
    df, g, n = inside(name)
    return "> " + paragraph(df["config"].iloc[0], n, TARGET)


def ioffe_paragraph() -> str:
    return quoted_paragraph("ioffe2015")


def deep_paragraph() -> str:
    return quoted_paragraph("deep")


def ioffe_findings() -> str:
    df, g, n = inside("ioffe2015")
    b, o = n["bn"], n["nobn"]
    text, t = verdict(df)
    med = time_to_target(df, TARGET).groupby("variant")["epochs"].median()  # epochs are 1,000 steps
    return "\n".join([
        f"- **Accuracy and speed: the paper's Figure 1(a), reproduced.** {text}), and is ahead on {t['ahead']} of "
        f"{t['n']} seeds ({b['final_test_acc']:.2%} against {o['final_test_acc']:.2%}, means over seeds). The mean "
        f"curve over seeds first reaches {TARGET:.0%} at step {b['step_to_target']:,} with BN and {o['step_to_target']:,} "
        f"without; member by member, after a median of {med['bn']:g} epochs with BN and {med['nobn']:g} without "
        f"(epochs of 1,000 steps, evaluated every {int(df['step'].min()):,}; the report's time-to-target table).",
        f"- **The input distribution: Figure 1(b, c), reproduced.** Without BN, the median input to the traced "
        f"sigmoids moves over a range of {o['median_range']:.2f} during training (mean over seeds and traced units), and "
        f"its 15-85th percentile band widens and shifts. With BN it moves over {b['median_range']:.2f} and stays put "
        f"after the first few thousand steps.",
        f"- **Internal covariate shift as Santurkar et al. measure it is *not* smaller with BN.** The gradient change "
        f"caused by the updates of the layers below has a median of {b['ics_distance_median']:.3g} with BN against "
        f"{o['ics_distance_median']:.2g} without, and a median cosine of {b['ics_cosine_median']:.2f} against "
        f"{o['ics_cosine_median']:.2f} (over seeds, recorded steps and layers). This is their finding too: BN's benefit "
        f"does not come from reducing this kind of shift.",
        f"- **Gradient predictiveness goes the other way from theirs here.** A step along the gradient changes the BN "
        f"net's gradient more, both absolutely and relative to the step: effective β-smoothness "
        f"{b['beta_smoothness_median']:.2f} with BN against {o['beta_smoothness_median']:.2f} without (medians over "
        f"seeds and recorded steps).",
    ])


def deep_findings() -> str:
    df, g, n = inside("deep")
    b, o = n["bn"], n["nobn"]
    f = final(df)
    nob = f[f["variant"] == "nobn"]["test_acc"]
    gn = g[(g["measure"] == "grad_norm") & (g["variant"] == "nobn")].groupby("layer")["value"].median()
    top, first = int(gn.index.max()), int(gn.index.min())
    per_layer = np.log10(gn[top - 1] / gn[first]) / (top - 1 - first)
    return (
        f"Without BN, ten sigmoid layers do not train at all under this SGD: test accuracy stays at chance "
        f"({nob.mean():.2%} after {int(f['step'].max()):,} steps, mean over seeds; {nob.min():.2%} to {nob.max():.2%} "
        f"over the seeds) while the BN net reaches {b['final_test_acc']:.2%}: {b['members_reaching']} of "
        f"{b['members']} BN seeds pass {TARGET:.0%} at some evaluation (steps {b['member_step_min']:,}-"
        f"{b['member_step_max']:,}), though the mean curve over seeds never does. The heatmap shows why. Each "
        f"sigmoid layer passes back at most a quarter of the gradient (σ′ ≤ 1/4), so the no-BN gradient shrinks by "
        f"about 10^{per_layer:.1f} per layer on the way down (median norms over seeds and recorded steps: "
        f"{gn[top]:.1e} at the output layer, {gn[top - 1]:.1e} at layer {top - 1}, {gn[first]:.1e} at layer {first}): "
        f"the first layer's gradient norm is {o['grad_ratio_first_to_last']:.2g} times the output layer's (median over "
        f"seeds and recorded steps). With BN it is {b['grad_ratio_first_to_last']:.2g} times. The last hidden layer of "
        f"the no-BN net ends with a 15-85th percentile spread of {o['final_spread_15_85']:.2f} on the probe batch: "
        f"every image gives it the same input, so nothing reaches the classifier.")


def instrument_cost() -> str:
    b = bench(INSTRUMENT_BENCH)
    off, on, every = (b[f"test_instrument_overhead[{k}]"] for k in ("off", "on", "every-step"))
    steps_off, steps_every = off[1]["steps_per_round"], every[1]["steps_per_round"]
    every_ratio = (every[0] / steps_every) / (off[0] / steps_off)
    parts = []
    for name, cadence in (("ioffe2015", "every 500 and 1,000 steps"), ("deep", "the defaults, 100 and 1,000")):
        inst = meta_runs(name)[0]["instrument_seconds"]
        train = train_seconds(rows(name))
        parts.append(f"{inst:.1f} s against {train:.0f} s of training for `{name}` ({inst / train:.1%}; {cadence})")
    return (
        f"Cost (`./launch.sh bench -k instruments`, the ioffe2015 net, 5 seeds × 2 variants): per {steps_off} steps, "
        f"median of 3 rounds ({bench_date(INSTRUMENT_BENCH)}, `reports/bench/…0003_instruments.json`): {off[0]:.2f} s with "
        f"instruments off, {on[0]:.2f} s ({on[0] / off[0] - 1:+.0%}) with gradient norms and percentiles every 20 steps and "
        f"the Santurkar et al. measures once. That is 5 times the default rate of the latter, so the figure is an upper "
        f"bound. Measuring everything at every step costs {every_ratio:.1f} times a plain step. In the committed runs, "
        f"`instrument_seconds` is {parts[0]} and {parts[1]}.")


COLD_COMPILE_BENCH = BENCH / "0005_d52d22f36e94e6ba9be630c8aadeace1a1076df2_20261128_151011.json"  # a first compile


def _compile_verdict(compiled: float, eager: float, compile_s: float) -> str:
    """Whether --compile pays for its compilation, and from how many steps on."""
    if compiled >= eager:
        return "it does not pay, and stays off by default."
    steps = compile_s / ((eager - compiled) / 1e3)
    cold = bench(COLD_COMPILE_BENCH)["test_step_compile[compile-5]"][1]["compile_s"]
    where = "within" if steps < 9000 else "beyond"
    return (f"it pays from about {steps:,.0f} steps on, {where} a default run's 9,000, at this compile time (torch's "
            f"compile cache may be warm here; a first compile took {cold:.1f} s in `…{COLD_COMPILE_BENCH.name[:4]}…json`). "
            f"It stays off by default: compiled steps round differently from eager ones (`test_compile_changes_nothing_but_"
            f"rounding`), so the lab's rows would no longer reproduce bit for bit, and a fresh machine pays the first compile.")


def perf_table() -> str:
    b = bench(STEP_BENCH)
    rate = lambda k: b[k][1]["member_samples_per_s"]
    lab_r, d, s32 = rate("test_lab_loop_epoch"), rate("test_train_epoch[default]"), rate("test_train_epoch[32seeds]")
    bare, loop = rate("test_bare_step_loop"), rate("test_run_loop")
    wall = b["test_run_loop"][1]["wall_member_samples_per_s"]
    ev, ep = b["test_full_evaluation[default]"][0], b["test_train_epoch[default]"][0]
    gflops = b["test_matmul_rate"][1]["gflop_per_s"]
    flop = BMM_FLOP_PER_MEMBER_SAMPLE
    eval_gemm = 70_000 * 784 * 320 * 2 / (gflops * 1e9)  # the shared first layer of 10 members' evaluation
    bare_epoch = b["test_bare_step_loop"][0]
    limit = gflops * 1e9 / flop
    ms = lambda k: b[k][0] * 1e3
    return "\n".join([
        f"Its closing table, from `reports/bench/…{STEP_BENCH.name[:4]}…json` (this 2-core AMD EPYC VM, torch 2.14.1, "
        f"{bench_date(STEP_BENCH)}; this VM's 2048² matmul ran at {gflops:.0f} GFLOP/s that day, where 100 to ~330 "
        f"GFLOP/s were measured on other days and hosts — compare ratios, not absolute figures, and expect ±15% between "
        f"runs on this VM):",
        "",
        "| measured in one session (`./launch.sh bench`) | result |",
        "|---|---|",
        f"| stacked, default run (5 seeds × bn, nobn) vs the lab loop | {d:,.0f} vs {lab_r:,.0f} member-samples/s: **{d / lab_r:.1f}×** |",
        f"| stacked, 32 seeds × bn, nobn vs the lab loop | {s32:,.0f} member-samples/s: **{s32 / lab_r:.1f}×** |",
        f"| `training_function`'s training throughput vs the bare step loop | {loop:,.0f} vs {bare:,.0f}: {loop / bare:.1%} (overhead {1 - loop / bare:.1%}) |",
        f"| ... counting evaluation and results writing as well | {wall:,.0f}: {wall / bare:.1%} |",
        f"| ... at most, were evaluation nothing but its first-layer GEMMs (70,000 × 784 × 320 × 2 FLOP at "
        f"{gflops:.0f} GFLOP/s: {eval_gemm:.2f} s an epoch) | {bare_epoch / (bare_epoch + eval_gemm):.1%} |",
        f"| full evaluation (60,000 + 10,000 samples) vs one training epoch | {ev:.2f} s vs {ep:.2f} s: {ev / ep:.1%} |",
        f"| arithmetic limit: {gflops:.0f} GFLOP/s ÷ {flop / 1e3:.0f} kFLOP per member-sample (forward + backward) | "
        f"{limit:,.0f} member-samples/s; 32 seeds reach {s32 / limit:.0%} of it |",
        "",
        f"Per-op overhead, not arithmetic, bounds a step at small K: in `test_train_step` a no-BN stacked step "
        f"takes {ms('test_train_step[nobn-stacked-K1]'):.2f} ms for 1 member and {ms('test_train_step[nobn-stacked-K32]'):.1f} ms "
        f"for 32 (32× the work for {ms('test_train_step[nobn-stacked-K32]') / ms('test_train_step[nobn-stacked-K1]'):.0f}× "
        f"the time), so more members per step raise throughput until the matmuls dominate.",
        "On by default because the suite measures them to help (same session, medians):",
        "",
        "| choice | measured by | with | without |",
        "|---|---|---|---|",
        f"| fused Adam (one kernel per parameter) | `test_optimizer_step` | {ms('test_optimizer_step[True]'):.2f} ms | "
        f"{ms('test_optimizer_step[False]'):.2f} ms (for-each) |",
        f"| ... its kernel called directly (`optim.FusedAdamStep`, bitwise Adam.step) | `test_optimizer_step` | "
        f"{ms('test_optimizer_step[direct]'):.2f} ms | {ms('test_optimizer_step[True]'):.2f} ms (Adam.step) |",
        f"| the training losses' backward written by hand (`train/fused.py`, bitwise autograd's) | `test_default_step_backward` | "
        f"{ms('test_default_step_backward[hand-written]'):.2f} ms per default step | "
        f"{ms('test_default_step_backward[autograd]'):.2f} ms (autograd) |",
        f"| one `index_select` for all members' batches | `test_gather` | {ms('test_gather[index_select]'):.3f} ms | "
        f"{ms('test_gather[indexing]'):.3f} ms (`x[idx]`) |",
        f"| both torch threads | `test_default_step_threads` | {ms('test_default_step_threads[2]'):.1f} ms per default "
        f"step (2) | {ms('test_default_step_threads[1]'):.1f} ms (1) |",
        "",
        f"`--compile` (torch.compile) against eager on one repeated batch, a stacked BN step (`test_step_compile`): "
        f"K = 5 {ms('test_step_compile[compile-5]'):.2f} vs {ms('test_step_compile[eager-5]'):.2f} ms, K = 32 "
        f"{ms('test_step_compile[compile-32]'):.1f} vs {ms('test_step_compile[eager-32]'):.1f} ms, after "
        f"{b['test_step_compile[compile-5]'][1]['compile_s']:.1f} and {b['test_step_compile[compile-32]'][1]['compile_s']:.1f} s "
        f"of compilation: {_compile_verdict(ms('test_step_compile[compile-5]'), ms('test_step_compile[eager-5]'), b['test_step_compile[compile-5]'][1]['compile_s'])}",
    ])


def sync_bn_cost() -> str:
    b = bench(STEP_BENCH)
    ms = lambda k: b[k][0] * 1e3
    s32, b32 = ms("test_train_step[sync-bn-stacked-K32]"), ms("test_train_step[bn-stacked-K32]")
    s8, b8 = ms("test_train_step[sync-bn-stacked-K8]"), ms("test_train_step[bn-stacked-K8]")
    return (f"Without communication, sync-BN's own arithmetic costs {s32 / b32 - 1:+.0%} per step at 32 members "
            f"and {s8 / b8 - 1:+.0%} at 8 against BN's `F.batch_norm` ({s32:.2f} against {b32:.2f} ms, {s8:.2f} against "
            f"{b8:.2f} ms; medians of `test_train_step` in `reports/bench/…{STEP_BENCH.name[:4]}…json`, `bench/test_step.py`, "
            f"{bench_date(STEP_BENCH)}).")


def ddp_scaling() -> str:
    s = pd.read_csv(HERE / "ddp" / "scaling.csv")
    names = {"lab, seed groups": "lab (BN + no-BN), 2 seed groups × dp 1", "bn": "BN, 1 seed group × dp 2",
             "nobn": "no-BN, dp 2", "sync-bn": "sync-BN, dp 2"}
    lines = ["| case | 1 process (2 threads) | 2 processes (1 thread each) | 2 ÷ 1 | step at 2 processes |",
             "|---|---|---|---|---|"]
    ratios = {}
    for case, label in names.items():
        one = s[(s["case"] == case) & (s["processes"] == 1)].iloc[0]
        two = s[(s["case"] == case) & (s["processes"] == 2)].iloc[0]
        r = two["member_samples_per_s"] / one["member_samples_per_s"]
        ratios[case] = (r, two["step_ms"])
        fmt = lambda row: (f"{round(row['member_samples_per_s'], -2):,.0f} ({round(row['min'], -2):,.0f}–"
                           f"{round(row['max'], -2):,.0f})")
        bold = f"**{r:.2f}×**" if case == "lab, seed groups" else f"{r:.2f}×"
        lines.append(f"| {label} | {fmt(one)} | {fmt(two)} | {bold} | {two['step_ms']:.1f} ms |")
    r, _ = ratios["lab, seed groups"]
    lines += ["", f"Seed groups are the layout that pays: two processes train the lab {r:.2f}× as fast as one (scaling "
              f"efficiency {r / 2:.2f}; the one process already uses both cores, with 2 threads, at poor efficiency for "
              f"these thin matrices), with no communication until each window's rows meet at rank 0. DDP of these "
              f"small models on gloo is slower than one process ({ratios['bn'][0]:.2f}× for BN, {ratios['nobn'][0]:.2f}× "
              f"for no-BN), and sync-BN's four extra small all-reduces per step (two BN layers, forward and backward) "
              f"take a step to {ratios['sync-bn'][1]:.1f} ms ({ratios['sync-bn'][0]:.2f}×)."]
    return "\n".join(lines)


def memory() -> str:
    df = rows("lab")
    run = meta_runs("lab")[0]
    mb = lambda n: n * 784 * 4 / 1e6
    return (f"Memory: each process holds the dataset once, on its device, as float32 ({mb(run['train_samples']):.0f} + "
            f"{mb(run['test_samples']):.0f} MB for MNIST; the uint8 files are moved and converted there); rows record "
            f"`peak_rss_mb` ({df['peak_rss_mb'].max():.0f} MiB at most for the default run on the CPU, torch included; "
            f"`reports/lab`) and `peak_gpu_mb`.")


def study(name: str, key: str) -> str:
    """A study's finding: per facet, each variant's range within 1 pp of its best (the report's own
    summary, recomputed here from the folder's rows), and its figure."""
    from bnbench.reporting.report import CONFIG_KEYS, accuracy_rows, final_rows
    from bnbench.reporting.sensitivity import axes, summarise

    df = rows(name)
    df = df.assign(diverged=df["diverged"].fillna(False).astype(bool), config=config_label(df))
    last = final_rows(accuracy_rows(df))
    (shown, facets), = [(shown, facets) for k, shown, facets in axes(last, CONFIG_KEYS) if k == key]
    lines = []
    for facet in facets:
        g = shown[(shown["facet"] == facet) & ~shown["diverged"]]
        d = g.pivot_table(index=[key, "seed"], columns="variant", values="test_acc", aggfunc="first")
        diff = (d["bn"] - d["nobn"]).groupby(level=0).mean().mul(100)
        lines += [f"- {summarise(shown, key, facet)[1]} BN − no-BN, mean over paired seeds: "
                  + ", ".join(f"{v:g}: {x:+.1f} pp" for v, x in diff.items()) + "."]
    return "\n".join([f"Final test accuracy after {int(last['epoch'].max())} epoch(s), {int(last['seed'].nunique())} "
                       f"seeds per point (`reports/{name}/`, `reports/{name}.toml`):", "", *lines, "",
                       f"![final test accuracy and BN - no-BN against {key}](reports/{name}/report/sensitivity_{key}.png)"])


def lr_range() -> str:
    return study("lr_range", "lr")


def batch_size() -> str:
    return study("batch_size", "batch_size")


def sync_bn() -> str:
    """What SyncBN restores: BN members at a small per-process batch, statistics per process or over
    the group's global batch, paired by seed (same init and data order)."""
    from bnbench.reporting.stats import mean_ci95

    df = rows("sync_bn")
    last = df.sort_values("step").groupby(["run_id", "seed"], as_index=False).tail(1)
    lines = ["| per-process batch (global) | BN statistics per process | over the global batch (`--sync-bn`) | sync − per-process, paired |",
             "|---|---|---|---|"]
    for b, g in last.groupby("per_device_batch"):
        acc = g.pivot_table(index="seed", columns="sync_bn", values="test_acc", aggfunc="first")
        cell = lambda v: f"{v.mean():.4f} [{mean_ci95(v)[0]:.4f}, {mean_ci95(v)[1]:.4f}]"
        d = (acc[True] - acc[False]) * 100
        lo, hi = mean_ci95(d)
        lines.append(f"| {b} ({int(g['batch_size'].iloc[0])}) | {cell(acc[False])} | {cell(acc[True])} | "
                     f"{d.mean():+.2f} pp [{lo:+.2f}, {hi:+.2f}] |")
    n, epochs = int(last["seed"].nunique()), int(last["epoch"].max())
    return "\n".join([f"Final test accuracy of the BN members after {epochs} epoch, {n} seeds, mean [Student-t 95% CI] "
                       f"(`reports/sync_bn/`, `reports/sync_bn.toml`; 2 gloo processes as one data-parallel group):",
                       "", *lines, "", "![final test accuracy with and without --sync-bn against the per-process batch]"
                       "(reports/sync_bn/report/sync_bn.png)"])


NORM_ORDER = ["nobn", "bn", "brn", "ln", "gn", "rms"]
NORM_NAMES = {"nobn": "no norm", "bn": "BN", "brn": "BRN", "ln": "LN", "gn": "GN", "rms": "RMS"}


def _paired(g: pd.DataFrame, a: str, b: str) -> tuple[float, float, float]:
    """a - b in pp over paired seeds: mean and Student-t 95% interval."""
    from bnbench.reporting.stats import mean_ci95

    d = g.pivot_table(index="seed", columns="variant", values="test_acc", aggfunc="first")
    d = (d[a] - d[b]).dropna() * 100
    return (d.mean(), *mean_ci95(d))


def norms() -> str:
    """Which normalization, at which batch size: every variant's mean final test accuracy per batch size,
    and what the paired differences to no normalization say (reports/norms, one run per batch size)."""
    df = rows("norms")
    last = df.sort_values("step").groupby(["batch_size", "variant", "seed"], as_index=False).tail(1)
    mean = last.pivot_table(index="batch_size", columns="variant", values="test_acc", aggfunc="mean")
    lines = ["| batch | " + " | ".join(NORM_NAMES[v] for v in NORM_ORDER) + " |", "|---" * (len(NORM_ORDER) + 1) + "|"]
    for b, r in mean.iterrows():
        lines.append(f"| {b} | " + " | ".join(f"{r[v]:.4f}" for v in NORM_ORDER) + " |")
    by = dict(tuple(last.groupby("batch_size")))
    sizes = sorted(by)
    behind = [b for b in sizes if _paired(by[b], "bn", "nobn")[2] < 0]  # BN below no-BN, the whole interval
    ahead = [b for b in sizes if _paired(by[b], "bn", "nobn")[1] > 0]
    small = sizes[0]
    holds = [v for v in ("ln", "gn", "rms") if _paired(by[small], v, "nobn")[1] > 0]
    bn2, brn2 = _paired(by[small], "bn", "nobn"), _paired(by[small], "brn", "nobn")
    per_step = {b: by[b]["train_seconds"].max() for b in sizes}
    warmup = int(last["brn_warmup"].dropna().iloc[0]) if "brn_warmup" in last else 5000
    text = [f"Mean final test accuracy over {int(last['seed'].nunique())} seeds after {int(last['epoch'].max())} epoch "
            f"(equal epochs: {60_000 // small:,} steps at batch {small}, {60_000 // sizes[-1]:,} at {sizes[-1]}; "
            f"`reports/norms/`, `reports/norms.toml`):", "", *lines, "",
            f"- BN falls behind no normalization, its whole 95% interval below, at batch "
            f"{', '.join(map(str, behind)) or 'none'}: at {small} by {-bn2[0]:.1f} pp [{bn2[1]:+.1f}, {bn2[2]:+.1f}], "
            f"and it is ahead, its whole interval above, from batch {min(ahead) if ahead else '-'} on "
            f"({', '.join(map(str, ahead))}).",
            f"- Batch Renormalization (the paper's schedule: plain BN for the first {warmup:,} steps) recovers part of "
            f"the loss at batch {small}: {brn2[0]:+.1f} pp [{brn2[1]:+.1f}, {brn2[2]:+.1f}] against no normalization, "
            f"{brn2[0] - bn2[0]:+.1f} pp against BN. Where an epoch is no longer than the warm-up (batch "
            f"{', '.join(str(b) for b in sizes if 60_000 // b <= warmup)}), BRN trains as BN does (r = 1, d = 0): "
            f"their differences there are rounding and BRN's running standard deviation in evaluation.",
            f"- The per-sample normalizations hold at batch {small}: "
            + ", ".join(f"{NORM_NAMES[v]} {_paired(by[small], v, 'nobn')[0]:+.2f} pp" for v in ("ln", "gn", "rms"))
            + f" against no normalization ({', '.join(NORM_NAMES[v] for v in holds) or 'none'} with the whole "
            f"interval above 0).",
            f"- Training time of one epoch of the unit: {per_step[small]:.0f} s at batch {small}, "
            f"{per_step[sizes[-1]]:.0f} s at {sizes[-1]} (all six variants of 5 seeds in one process).",
            "", "![final test accuracy per normalization and each one's difference to no normalization against the "
            "batch size](reports/norms/report/sensitivity_batch_size.png)"]
    return "\n".join(text)


def norms_sync() -> str:
    """The distributed question at a per-process batch of 2: 2 gloo processes, BN per process or synced, GN, LN."""
    from bnbench.reporting.stats import mean_ci95

    df = rows("norms_sync")
    last = df.sort_values("step").groupby(["run_id", "variant", "seed"], as_index=False).tail(1)
    cells = []
    for (sync, variant), g in last.groupby(["sync_bn", "variant"]):
        lo, hi = mean_ci95(g["test_acc"])
        name = {"bn": "BN, statistics " + ("over both processes (`--sync-bn`)" if sync else "per process"),
                "gn": "GroupNorm", "ln": "LayerNorm"}[variant]
        cells.append((g["test_acc"].mean(), f"| {name} | {g['test_acc'].mean():.4f} [{lo:.4f}, {hi:.4f}] |"))
    b = int(last["per_device_batch"].iloc[0])
    return "\n".join([f"Two gloo processes as one data-parallel group, {b} samples per process per step (global batch "
                      f"{2 * b}), 1 epoch, {int(last['seed'].nunique())} seeds, mean final test accuracy [Student-t 95% CI] "
                      f"(`reports/norms_sync/`, `reports/norms_sync.toml`):", "",
                      "| normalization | final test accuracy |", "|---|---|", *[c for _, c in sorted(cells)]])


def norm_cost() -> str:
    """What each normalization costs: a stacked step of 5 seeds of one variant, median of the bench."""
    b = bench(NORM_BENCH)
    lines = ["| normalization | step | member-samples/s, batch 100 | vs no norm | member-samples/s, batch 2 | vs no norm |",
             "|---|---|---|---|---|---|"]
    base = {n: b[f"test_norm_step[nobn-{n}]"][1]["member_samples_per_s"] for n in (100, 2)}
    for v in NORM_ORDER:
        big, small = (b[f"test_norm_step[{v}-{n}]"] for n in (100, 2))
        rate = lambda x: x[1]["member_samples_per_s"]  # noqa: E731
        lines.append(f"| {NORM_NAMES[v]} | {big[1]['step_impl']} | {rate(big):,.0f} | {rate(big) / base[100]:.2f} | "
                     f"{rate(small):,.0f} | {rate(small) / base[2]:.2f} |")
    return "\n".join([f"What each costs: one training step of 5 seeds of one variant, the same stack shapes for all "
                      f"(`bench/test_step.py::test_norm_step`, medians of 30 rounds in `reports/bench/…{NORM_BENCH.name[:4]}…json`, "
                      f"{bench_date(NORM_BENCH)}, this 2-core VM):", "", *lines])


def _peer_rows():
    return peers, peers.combine([peers.rows(p) for p in PEER_BENCH])


def _met(ratio: float, target: float) -> str:
    return f"{ratio:.1f}× ({'met' if ratio >= target else 'missed'}: {target:g}×)"


def peer_table() -> str:
    """bnbench's stacked step against a loop of models and torch.func, K = 1 ... 256, the runs' medians."""
    peers, data = _peer_rows()
    by = {(r["peer"], r["k"]): r["member_samples_per_s"] for r in data}
    ks = sorted({r["k"] for r in data})
    others = ("loop", "func", "func-stats")
    behind = [k for k in ks if max(by[("stacked-fused", k)], by[("stacked-autograd", k)]) <= max(by[(o, k)] for o in others)]
    slower = [k for k in ks if by[("stacked-fused", k)] < by[("stacked-autograd", k)]]
    f32 = by[("stacked-fused", 32)]
    goal = (f"The goal: bnbench ahead of every peer at every K, and at K = 32 at least 2× `torch.func` and 10× the loop. "
            f"Ahead at every K: {'yes' if not behind else 'no, behind at K = ' + ', '.join(map(str, behind))}. At K = 32 "
            f"the fused step is {_met(f32 / by[('func', 32)], 2)} `torch.func` ({f32 / by[('func-stats', 32)]:.1f}× with "
            f"its BN statistics kept) and {_met(f32 / by[('loop', 32)], 10)} the loop.")
    if slower:
        goal += (f" The hand-written step's median is below autograd's at K = {', '.join(map(str, slower))} (by "
                 f"{max(by[('stacked-autograd', k)] / by[('stacked-fused', k)] - 1 for k in slower) * 100:.0f}% at most; "
                 f"runs of one case differ by more than that, see the band in the figure).")
    return peers.markdown_table(data, source=peers.describe(PEER_BENCH)) + "\n" + goal + "\n"


def peer_summary() -> str:
    """The README's short form of peer_table: a few K, the three ways a user would train them."""
    peers, data = _peer_rows()
    by = {(r["peer"], r["k"]): r["member_samples_per_s"] for r in data}
    lines = ["| members K | loop of `nn` models | `torch.func` ensemble | bnbench stacked | ÷ `torch.func` | ÷ loop |",
             "|---|---|---|---|---|---|"]
    have = sorted({r["k"] for r in data})
    for k in [k for k in (1, 8, 32, 256) if k in have] or have:
        f = by[("stacked-fused", k)]
        lines.append(f"| {k} | {by[('loop', k)]:,.0f} | {by[('func', k)]:,.0f} | {f:,.0f} | {f / by[('func', k)]:.1f}× | "
                     f"{f / by[('loop', k)]:.1f}× |")
    return "\n".join([f"Member-samples/s of one training step on this 2-core VM, K of the lab's nets on resident batches, "
                       f"the median of {len(PEER_BENCH)} runs of `./launch.sh bench -k test_peer_step`:", "", *lines])



def peer_breakdown() -> str:
    """Where a K = 32 step's time goes (bench/step_breakdown.py): the products, the profile, what is left."""
    b = json.loads(BREAKDOWN.read_text())
    k, steps, rates = b["k"], b["step_ms"], b["member_samples_per_s"]
    prof = {r["op"]: r for r in b["fused_profile"]}
    products = ("aten::bmm", "aten::baddbmm")
    in_step = sum(prof[o]["self_ms_per_step"] for o in products if o in prof)
    adam = prof.get("aten::_fused_adam_", {}).get("self_ms_per_step", 0.0)
    rest = [r["self_ms_per_step"] for r in b["fused_profile"] if r["op"] not in (*products, "aten::_fused_adam_")]
    first = b["first_layer_ms"]
    gflops = BMM_FLOP_PER_MEMBER_SAMPLE * k * b["batch"] / (b["bmm_ms"] / 1e3) / 1e9
    # The products alone, at the faster of the two rates they were measured at (alone; inside the step).
    cap = k * b["batch"] / (min(b["bmm_ms"], in_step) / 1e3)
    need_loop, need_func = 10 * rates["loop"], 2 * rates["func"]
    step_2x_func = steps["func"] / 2
    return "\n".join([
        f"Why (`bench/step_breakdown.py`, `reports/bench/step_breakdown.json`, {b['date'][:10]}, K = {k}, one process of "
        f"{b['threads']} threads, every figure measured side by side in it):",
        f"- **The products.** The eight batched products of one step ([{k}, 100, 784] × [{k}, 784, 32] and the rest, "
        f"forward and backward, {BMM_FLOP_PER_MEMBER_SAMPLE / 1e3:.1f} kFLOP per member-sample) take {b['bmm_ms']:.2f} ms "
        f"alone ({gflops:.0f} GFLOP/s, {gflops / b['matmul_gflop_per_s']:.0%} of a 2048² matmul's "
        f"{b['matmul_gflop_per_s']:.0f} GFLOP/s: 32- and 10-wide outputs use the CPU's units poorly) and {in_step:.2f} ms "
        f"inside the fused step's profile. At the faster of the two, a step of nothing but these products would give "
        f"{cap:,.0f} member-samples/s; 10× the loop measured beside it ({rates['loop']:,.0f}) needs {need_loop:,.0f}"
        + (": out of reach with torch's `bmm` on this CPU, whatever is done around the products." if cap < need_loop
           else ": within reach of the products.")
        + f" The loop on resident batches is no straw man: {steps['loop'] / k:.2f} ms per member step.",
        f"- **The rest of the fused step.** It took {steps['stacked-fused']:.2f} ms ({rates['stacked-fused']:,.0f} "
        f"member-samples/s), {steps['func'] / steps['stacked-fused']:.2f}× `torch.func`'s {steps['func']:.2f} ms in this "
        f"process; 2× needs {step_2x_func:.2f} ms ({need_func:,.0f} member-samples/s)"
        + (f", {steps['stacked-fused'] - step_2x_func:.2f} ms less. " if steps["stacked-fused"] > step_2x_func else ". ")
        + f"Of the step, the products are {in_step:.2f} ms in the profile, Adam's fused kernel {adam:.2f} ms, and the rest "
        f"is spread over small ops (BN, ReLU masks, the loss, copies; {b['fused_profile_ops_per_step']:.0f} profiled ops "
        f"per step in all), none above {max(rest):.2f} ms"
        + (": what separates it from 2× `torch.func` is many small costs, not one." if steps["stacked-fused"] - step_2x_func > max(rest) else "."),
        f"- **What would gain:** a seed's bn and nobn members read the same batch; a first layer that multiplies it "
        f"once by both members' weights side by side took {first['shared_by_seed']:.2f} ms for its two products instead of "
        f"{first['per_member']:.2f} ({abs(first['per_member'] - first['shared_by_seed']):.2f} ms "
        f"{'less' if first['shared_by_seed'] < first['per_member'] else 'more'} a step). It is not done: it "
        f"changes the summation blocking of the first layer, so the default run's rows would no longer be bitwise those "
        f"of `reports/lab`."])


def main_job_time() -> str:
    """`time ./launch.sh` as one process (the default) and as one seed group per core, side by side."""
    b = json.loads(MAIN_JOB_TIME.read_text())
    one_name, groups_name = list(b["summary"])
    one, groups = b["summary"][one_name], b["summary"][groups_name]
    runs = b["runs"]
    wall = {c: ", ".join(f"{r['wall_s']:.0f}" for r in runs if r["case"] == c) for c in b["summary"]}
    layout = next(r["layout"] for r in runs if r["case"] == groups_name).split(";")[0]
    threads = next(r["torch_threads"] for r in runs if r["case"] == one_name)
    w, t = b["wall_ratio_per_pair"], b["train_ratio_per_pair"]
    return (f"`time ./launch.sh` on this {b['usable_cores']}-core VM ({b['date'][:10]}, `bench/main_job_time.py`, "
            f"{len(w)} alternating pairs, `reports/bench/main_job_time.json`): **{one['wall_s_median']:.0f} s** from start "
            f"to finish (runs: {wall[one_name]} s), {one['train_s_median']:.0f} s of it training, as one process of "
            f"{threads} threads; **{groups['wall_s_median']:.0f} s** ({wall[groups_name]} s), {groups['train_s_median']:.0f} s "
            f"training, as {layout} of one thread each (`./launch.sh --nproc {b['usable_cores']} --cpu`). Per pair, one "
            f"process took {min(t):.2f}-{max(t):.2f}× the seed groups' training time and {min(w):.2f}-{max(w):.2f}× their "
            f"wall time; outside training (start-up, data, evaluation, the report) the seed groups took "
            f"{groups['wall_s_median'] - groups['train_s_median']:.0f} s against "
            f"{one['wall_s_median'] - one['train_s_median']:.0f} s. The rows of every run are "
            f"{'bit for bit the same' if b['all_rows_equal'] else 'NOT all the same'}.")


def cost_growth() -> str:
    """Epoch time and memory against K (bench/cost_growth.py): which term dominates where."""
    b = json.loads(COST_GROWTH.read_text())
    rows = b["rows"]
    lines = ["| K | step | member-samples/s | epoch: 600 steps | + evaluations (70,000 samples) | evaluation share | "
             "peak memory | memory check's estimate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r["eval_train_s"] + r["eval_test_s"]
        lines.append(f"| {r['k']} | {r['step_s'] * 1e3:.1f} ms | {r['member_samples_per_s']:,.0f} | {r['train_s_per_epoch']:.1f} s | "
                     f"{ev:.1f} s | {ev / r['epoch_s']:.0%} | {r['peak_rss_mib']:,.0f} MiB | {r['estimate_mib']:,.0f} MiB |")
    small, big = rows[0], rows[-1]
    slope = (big["peak_rss_mib"] - small["peak_rss_mib"]) / (big["k"] - small["k"])
    est = (big["estimate_mib"] - small["estimate_mib"]) / (big["k"] - small["k"])
    best = max(rows, key=lambda r: r["member_samples_per_s"])
    shares = [(r["eval_train_s"] + r["eval_test_s"]) / r["epoch_s"] for r in rows]
    return "\n".join([
        f"Epoch time and memory against K (`bench/cost_growth.py`, `reports/bench/cost_growth.json`, {b['date'][:10]}, one "
        f"process of {small['threads']} threads, K/2 seeds × bn, nobn, batch 100, an epoch = 600 steps + the two "
        f"evaluations a run makes):", "", *lines, "",
        f"- Member-samples/s grow with K up to K = {best['k']} ({best['member_samples_per_s']:,.0f}): below it a step's "
        f"fixed per-op costs are shared by more members ({small['step_s'] * 1e3:.1f} ms for {small['k']}, "
        f"{best['step_s'] * 1e3:.1f} ms for {best['k']})"
        + (f"; above it they fall ({big['member_samples_per_s']:,.0f} at K = {big['k']}), as the stacked tensors "
           f"outgrow the caches, we think (the first layer's weights alone are {784 * 32 * 4 * big['k'] / 2**20:.0f} MiB "
           f"at K = {big['k']}; not measured apart). " if best is not big else ". ")
        + f"Evaluation, which the training's rate leaves out, is {shares[0]:.0%} of an epoch at K = {small['k']} and "
        f"{max(shares):.0%} at most.",
        f"- Memory grows by {slope:.1f} MiB per member measured (peak resident set) against {est:.1f} MiB per member in the "
        f"memory check's estimate, most of it the evaluation chunk of 10,000 samples; at K = {small['k']} the peak is "
        f"{small['peak_rss_mib']:,.0f} MiB, torch's shared libraries included, which the estimate leaves out. The "
        f"estimate lets this machine ({big['available_gib']:.0f} GiB available) hold about "
        f"{big['estimate_fits_members']:,} members in one process; a smaller `--eval-batch` holds more.",
        f"- Against the training-set size: the data is resident and a step draws its batch with one `index_select` of "
        f"the batch's rows, so its cost does not depend on the set's size by construction"
        + (f" (measured: {small['draw_from_60000_us']:.0f} µs from 60,000 rows, {small['draw_from_6000_us']:.0f} µs from "
           f"6,000)" if "draw_from_60000_us" in small else "")
        + ". An epoch's steps and its training-set evaluation grow with the set in proportion; the test-set evaluation "
        f"does not.",
        f"- Measured up to K = {big['k']}; the estimate's {big['estimate_fits_members']:,} members were not run (an epoch "
        f"there would take about {big['epoch_s'] * big['estimate_fits_members'] / big['k'] / 60:.0f} min at K = "
        f"{big['k']}'s rate)."])


BLOCKS = {f.__name__: f for f in (lab, lab_time, report_example, report_bench, ddp_scaling, sync_bn_cost, lr_scan,
                                  ioffe_paragraph, ioffe_findings, deep_findings, deep_paragraph, instrument_cost,
                                  perf_table, memory, lr_range, batch_size, sync_bn, norms, norms_sync, norm_cost,
                                  peer_table, peer_summary, peer_breakdown, main_job_time, cost_growth)}


# -- README.md and docs/*.md ------------------------------------------------------------------------
@functools.cache
def _rendered(name: str) -> str:
    return BLOCKS[name]().rstrip("\n") + "\n"


def files() -> list[Path]:
    """The files that may hold blocks: README.md and every docs/*.md."""
    return [README, *DOCS]


def read_texts() -> dict[Path, str]:
    return {path: path.read_text() for path in files()}


def _name(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(path)


def relative_links(text: str, path: Path) -> str:
    """A block's links, written from the repository root, made relative to the file that holds it."""
    up = Path(os.path.relpath(REPO, (REPO / path).parent)).as_posix()
    return text if up == "." else LINK.sub(lambda m: f"]({up}/{m.group(1)})", text)


def render(texts: dict[Path, str]) -> tuple[dict[Path, str], list[str]]:
    """Every file's text with its blocks re-rendered, and the problems, each naming its file: blocks
    that differ, are unknown, missing from every file, or appear more than once across the files."""
    problems, seen = [], {}  # seen: block name -> the files holding it, once per occurrence
    out = {}
    for path, text in texts.items():
        where = _name(path)

        def sub(m):
            name, old = m.group(1), m.group(2)
            seen.setdefault(name, []).append(where)
            if name not in BLOCKS:
                problems.append(f"{where}: unknown figures block {name!r} (reports/readme.py has {', '.join(BLOCKS)})")
                return m.group(0)
            new = relative_links(_rendered(name), path)
            if new != old:
                problems.append(f"{where}: block {name!r} differs from what reports/ gives:\n--- {where}\n{old}--- reports\n{new}")
            return f"<!-- figures: {name} (reports/readme.py) -->\n{new}<!-- /figures -->"

        out[path] = BLOCK.sub(sub, text)
    everywhere = ", ".join(_name(p) for p in texts)
    problems += [f"no figures block {n!r} in {everywhere}" for n in BLOCKS if n not in seen]
    problems += [f"{', '.join(w)}: figures block {n!r} appears {len(w)} times" for n, w in seen.items() if len(w) > 1]
    return out, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 naming each block that differs; write nothing")
    args = ap.parse_args(argv)
    texts = read_texts()
    new, problems = render(texts)
    if args.check:
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for path, text in new.items():
        if text != texts[path]:
            path.write_text(text)
    for p in problems:
        if "differs" not in p:
            print(p, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
