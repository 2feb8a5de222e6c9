"""The peers race (bench/test_peers.py, issue 32) drawn from a saved pytest-benchmark JSON.

    .venv/bin/python reports/peers.py                 # every JSON under reports/bench/<machine>/ with peer cases
    .venv/bin/python reports/peers.py JSON [JSON ...] [--out PNG]

Draws member-samples/s against K for each peer (log-log), with the arithmetic limit at the
session's matmul rate as a line, and peak memory per member against K, into reports/bench/peers.png;
prints the markdown table of the same (`markdown_table`, for a generated block in the docs).
A case's figure in one run is its median step time (pytest-benchmark's rounds); over several runs
(`combine`) the figure is the median of the runs' figures, and the figure's band their min-max: on
this shared VM one run's figures move by 20-40% (four runs of 2026-12-07 at K = 128: bnbench fused
504k-583k, autograd 440k-591k), so a single run cannot order two peers that close.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench" / "Linux-CPython-3.11-64bit"
OUT = HERE / "bench" / "peers.png"
CASE = "test_peer_step["
# FLOP per member-sample of one step (bench/conftest.py FLOP_PER_MEMBER_SAMPLE): forward, weight gradients, the
# input gradients of layers 2 and 3.
STEP_FLOP = 2 * (2 * (784 * 32 + 32 * 32 + 32 * 10) + 32 * 32 + 32 * 10)
# Drawing order and labels (bench/peers.py PEERS).
LABELS = {
    "loop": "loop of nn models (K Adams)",
    "func": "torch.func vmap, BN batch stats only",
    "func-stats": "torch.func vmap, stacked BN buffers",
    "stacked-autograd": "bnbench stacked, --step-impl autograd",
    "stacked-fused": "bnbench stacked, --step-impl fused",
}
SHORT = {"loop": "loop", "func": "torch.func", "func-stats": "torch.func + stats",
         "stacked-autograd": "bnbench autograd", "stacked-fused": "bnbench fused"}
STYLE = {"loop": ("#7f7f7f", "o"), "func": ("#ff7f0e", "s"), "func-stats": ("#bcbd22", "D"),
         "stacked-autograd": ("#9467bd", "v"), "stacked-fused": ("#1f77b4", "^")}


def rows(path: Path) -> list[dict]:
    """One dict per peer case: peer, k, member_samples_per_s, median_s, peak_bytes_per_member, and
    the session's gflop_per_s / arithmetic_limit where the case recorded them."""
    data = json.loads(Path(path).read_text())
    out = []
    for b in data.get("benchmarks", []):
        if not b["name"].startswith(CASE):
            continue
        info, median = b.get("extra_info", {}), b["stats"]["median"]
        k = int(info.get("k", b.get("params", {}).get("k")))
        rate = info.get("member_samples_per_s") or k * info.get("batch", 100) / median
        out.append(dict(peer=info.get("peer", b.get("params", {}).get("peer")), k=k, member_samples_per_s=rate,
                        median_s=median, peak_bytes_per_member=info.get("peak_bytes_per_member"),
                        gflop_per_s=info.get("gflop_per_s"),
                        # from the session's matmul rate and the FLOP a step does (runs before 2026-12-07 stored a
                        # limit over 159 kFLOP, which counted a first-layer input gradient no step computes)
                        arithmetic_limit=info["gflop_per_s"] * 1e9 / STEP_FLOP if info.get("gflop_per_s") else None))
    return sorted(out, key=lambda r: (list(LABELS).index(r["peer"]) if r["peer"] in LABELS else 99, r["k"]))


def newest(folder: Path = BENCH) -> Path | None:
    """The newest saved JSON (pytest-benchmark numbers them) that holds peer cases."""
    found = saved(folder)
    return found[-1] if found else None


def saved(folder: Path = BENCH) -> list[Path]:
    """Every saved JSON with peer cases, oldest first."""
    return [path for path in sorted(folder.glob("*.json")) if CASE in path.read_text()]


def combine(runs: list[list[dict]]) -> list[dict]:
    """One row per (peer, K) over several runs' rows: the median of their member-samples/s (`runs`,
    `low`, `high`: how many and their range), the median of the memory and of the arithmetic limit."""
    import statistics

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    by: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run:
            by.setdefault((r["peer"], r["k"]), []).append(r)
    out = []
    for (peer, k), rs in by.items():
        rates = [r["member_samples_per_s"] for r in rs]
        out.append(dict(peer=peer, k=k, member_samples_per_s=median(rates), low=min(rates), high=max(rates), runs=len(rs),
                        median_s=median([r["median_s"] for r in rs]),
                        peak_bytes_per_member=median([r["peak_bytes_per_member"] for r in rs]),
                        gflop_per_s=median([r["gflop_per_s"] for r in rs]),
                        arithmetic_limit=median([r["arithmetic_limit"] for r in rs])))
    return sorted(out, key=lambda r: (list(LABELS).index(r["peer"]) if r["peer"] in LABELS else 99, r["k"]))


def _limit(data: list[dict]) -> tuple[float, float] | None:
    limits = [(r["arithmetic_limit"], r["gflop_per_s"]) for r in data if r["arithmetic_limit"]]
    return limits[0] if limits else None  # one session: one matmul rate for every case


def draw(data: list[dict], out: Path = OUT) -> Path:
    """Member-samples/s and peak memory per member against K, log-log, one line per peer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    speed, memory = fig.subplots(1, 2)
    peers = [p for p in dict.fromkeys(r["peer"] for r in data)]
    for p in peers:
        mine = [r for r in data if r["peer"] == p]
        colour, marker = STYLE.get(p, ("black", "x"))
        ks = [r["k"] for r in mine]
        speed.plot(ks, [r["member_samples_per_s"] for r in mine], marker=marker, color=colour, label=LABELS.get(p, p))
        if any(r.get("runs", 1) > 1 for r in mine):  # the runs' range
            speed.fill_between(ks, [r["low"] for r in mine], [r["high"] for r in mine], color=colour, alpha=0.15, linewidth=0)
        have = [r for r in mine if r["peak_bytes_per_member"] is not None]
        memory.plot([r["k"] for r in have], [max(r["peak_bytes_per_member"], 1) / 2**20 for r in have], marker=marker,
                    color=colour, label=LABELS.get(p, p))
    limit = _limit(data)
    if limit:
        speed.axhline(limit[0], color="black", linestyle="--", linewidth=1,
                      label=f"arithmetic limit ({limit[1]:.0f} GFLOP/s matmul)")
    ks = sorted({r["k"] for r in data})
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("members K (K/2 seeds x bn, nobn; K = 1: one BN member)")
        ax.grid(True, which="both", alpha=0.3)
    runs = max((r.get("runs", 1) for r in data), default=1)
    speed.set_ylabel("member-samples/s (median step)" + (f", median of {runs} runs, band: range" if runs > 1 else ""))
    speed.set_title("training throughput, one step on a resident batch")
    memory.set_ylabel("peak memory per member (MiB)")
    memory.set_title("peak resident memory per member")
    speed.legend(fontsize=7, loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown_table(data: list[dict], source: str | None = None) -> str:
    """Member-samples/s per K and peer (medians), bnbench fused over each peer, its share of the
    arithmetic limit; then peak memory per member. Absent cases are '—'."""
    peers = [p for p in LABELS if any(r["peer"] == p for r in data)] + \
        [p for p in dict.fromkeys(r["peer"] for r in data) if p not in LABELS]
    by = {(r["peer"], r["k"]): r for r in data}
    ks = sorted({r["k"] for r in data})
    limit = _limit(data)
    lines = []
    runs = max((r.get("runs", 1) for r in data), default=1)
    if source:
        lines.append(f"From {source}: member-samples/s, from each case's median step time"
                     + (f", the median of {runs} runs" if runs > 1 else "") + "; "
                     + (f"arithmetic limit {limit[0]:,.0f} member-samples/s at {limit[1]:.0f} GFLOP/s."
                        if limit else "no matmul rate recorded."))
        lines.append("")
    ratio_to = [p for p in ("func", "func-stats", "loop") if p in peers]
    head = ["K"] + [SHORT.get(p, p) for p in peers] + [f"fused ÷ {SHORT[p]}" for p in ratio_to] + (["fused, % of limit"] if limit else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rate(p, k):
        r = by.get((p, k))
        return r["member_samples_per_s"] if r else None

    for k in ks:
        cells = [str(k)] + [_num(rate(p, k)) for p in peers]
        fused = rate("stacked-fused", k)
        cells += [_num(fused / rate(p, k), "{:.1f}×") if fused and rate(p, k) else "—" for p in ratio_to]
        if limit:
            cells.append(_num(100 * fused / limit[0], "{:.0f}%") if fused else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| K | " + " | ".join(f"{SHORT.get(p, p)} (KiB/member)" for p in peers) + " |",
              "|" + "---|" * (len(peers) + 1)]
    for k in ks:
        cells = [str(k)]
        for p in peers:
            r = by.get((p, k))
            cells.append(_num(r["peak_bytes_per_member"] / 1024) if r and r["peak_bytes_per_member"] is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe(paths: list[Path]) -> str:
    """`reports/bench/…/0009…json` or `0009, 0010, … (4 runs) in reports/bench/…/`."""
    def shown(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(HERE.parent))
        except ValueError:
            return str(path)
    if len(paths) == 1:
        return f"`{shown(paths[0])}`"
    return (f"{len(paths)} runs, `{', '.join(Path(p).name[:4] for p in paths)}` in `{Path(shown(paths[0])).parent}/`")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", type=Path, help="saved pytest-benchmark JSONs (default: every one with peer cases)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the figure (default {OUT.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    paths = args.json or saved()
    if not paths:
        print(f"reports/peers.py: no {CASE}...] cases under {BENCH}: run ./launch.sh bench -k test_peer_step", file=sys.stderr)
        return 2
    runs = [rows(path) for path in paths]
    for path, run in zip(paths, runs):
        if not run:
            print(f"reports/peers.py: {path} holds no {CASE}...] cases", file=sys.stderr)
            return 2
    data = combine(runs)
    out = draw(data, args.out)
    print(markdown_table(data, source=describe(paths)), end="")
    print(f"figure: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
