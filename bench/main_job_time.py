"""`time ./launch.sh` on this CPU machine: one process of all the cores' threads (the default) against one seed
group per core (`--nproc N --cpu`, N the usable cores) (issue 32, "the main job on every core").

    .venv/bin/python bench/main_job_time.py [--pairs 3] [--out reports/bench/main_job_time.json]

Runs the main job as a user runs it, alternating the two, `--pairs` times each, every run into a
temporary folder, and records per run: the wall time from the command's start to its exit (start-up,
data, 15 epochs, evaluation and the report included), the training seconds its rows record (the
slowest seed group's, summed over the epochs), the layout it printed, and whether its rows equal the
first run's bit for bit (what seed groups promise). Alternating pairs, because this shared VM's speed
drifts by 15-50% over an hour: a ratio is read within a pair.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))
CASES = {"one process (the default)": [], f"one seed group per core (--nproc {CORES} --cpu)": ["--nproc", str(CORES), "--cpu"]}
SAME = ["variant", "seed", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"]


def _threads(out: Path):
    """torch's threads per process, as the run's provenance in meta.json records them."""
    text = (out / "meta.json").read_text()
    key = '"torch_threads": '
    return int(text.split(key, 1)[1].split(",", 1)[0].split("}", 1)[0]) if key in text else None


def run(args: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / "launch.sh"), *args, "--quiet", "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench/main_job_time.py: ./launch.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = pd.read_json(out / "results.jsonl", lines=True, precise_float=True)
    layout = next((line.removeprefix("launch.sh: ") for line in proc.stderr.splitlines() if line.startswith("launch.sh: ")
                   and "process" in line), "1 process")
    return {"wall_s": wall, "train_s": float(rows.groupby("epoch")["train_seconds"].first().sum()),
            "world_size": int(rows["world_size"].iloc[0]), "torch_threads": _threads(out),
            "layout": layout, "rows": rows.sort_values(["variant", "seed", "epoch"])[SAME].reset_index(drop=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "reports" / "bench" / "main_job_time.json"))
    a = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    runs, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            for name, args in CASES.items():
                r = run(args, Path(tmp) / f"{i}-{len(runs)}")
                first = r["rows"] if first is None else first
                r["rows_equal_first"] = bool(r.pop("rows").equals(first))
                runs.append({"case": name, "pair": i, "command": " ".join(["./launch.sh", *args]), **r})
                print(f"pair {i}: {name}: {r['wall_s']:.1f} s wall, {r['train_s']:.1f} s training ({r['layout']})", flush=True)
    summary = {}
    for name in CASES:
        mine = [r for r in runs if r["case"] == name]
        summary[name] = {"wall_s_median": statistics.median(r["wall_s"] for r in mine),
                         "train_s_median": statistics.median(r["train_s"] for r in mine)}
    one, default = (summary[n] for n in CASES)
    pairs = [(runs[2 * i], runs[2 * i + 1]) for i in range(a.pairs)]
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "cpu_count": os.cpu_count(),
              "usable_cores": len(os.sched_getaffinity(0)), "runs": runs, "summary": summary,
              "wall_ratio_per_pair": [x["wall_s"] / y["wall_s"] for x, y in pairs],
              "train_ratio_per_pair": [x["train_s"] / y["train_s"] for x, y in pairs],
              "all_rows_equal": all(r["rows_equal_first"] for r in runs)}
    Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"median wall {one['wall_s_median']:.1f} s -> {default['wall_s_median']:.1f} s; training "
          f"{one['train_s_median']:.1f} s -> {default['train_s_median']:.1f} s; rows equal: {result['all_rows_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
