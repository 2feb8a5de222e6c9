"""On a lent GPU: are the engines right on CUDA, and how fast are the key cases? One JSON.

    .venv/bin/python bench/gpu_check.py                        # ~3 minutes on one GPU
    .venv/bin/python bench/gpu_check.py --device cpu --quick   # a dry run (what the tests do)

Checks (float64 on the device, against torch itself):
  stacked == reference    30 steps of Adam from one init and data order: max |dparam| <= 1e-9
  cuda == cpu             the same 30 steps on the CPU: max |dparam| <= 1e-9
  sync path, 1 process    the cross-process BN inside a one-process group == BatchNorm1d <= 1e-10
  torch SyncBatchNorm     reference engine converted with torch.nn.SyncBatchNorm (NCCL) == BN <= 1e-10
                          (in a group of one these prove the sync code's arithmetic on the device,
                          not its communication: torch's SyncBatchNorm then falls back to
                          F.batch_norm, and bnbench's skips its all-reduce. The cross-process
                          equalities are tests/test_distributed.py's, over gloo processes.)
  exact metrics           correct counts on the device == on the CPU, count for count
  sync BN, 2 processes    the real cross-process check: 2 processes (torchrun) as one data-parallel
                          group with --sync-bn, each on half of every batch, == one process on the
                          whole batch, per member, Adam, float64, <= 1e-10 (stacked: bnbench's
                          cross-process BN; reference: torch.nn.SyncBatchNorm on NCCL). NCCL on 2+
                          GPUs; on one GPU gloo with both ranks on it (gloo takes CUDA tensors);
                          gloo on the CPU in the dry run.
Timings (float32, synchronised): one step of reference and stacked K=1,5,32 for bn / nobn /
sync-bn, a default epoch, one full evaluation, data to the device, TF32 on vs off, and
--compile against eager with its compile time apart. Writes reports/gpu/<card>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from accelerate import Accelerator

from bnbench.train import data
from bnbench.config import make_config
from bnbench.train.data import Splits
from bnbench.dist.groups import make_mesh
from bnbench.train.engine import Trainer
from bnbench.dist.launch import free_port
from bnbench.dist.layout import choose_layout

REPO = Path(__file__).resolve().parents[1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn over reps, CUDA synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def max_diff(a: Trainer, b: Trainer) -> float:
    worst = 0.0
    for v, s in a.members:
        sa, sb = a.member_state(v, s), b.member_state(v, s)
        worst = max(worst, max((sa[k].double().cpu() - sb[k].double().cpu()).abs().max().item() for k in sa))
    return worst


def subset(s: Splits, n: int) -> Splits:
    return Splits(s.train_x[:n], s.train_y[:n], s.test_x, s.test_y, s.sources)


def train_steps(cfg, splits, acc, steps: int) -> Trainer:
    tr = Trainer(cfg, splits, acc)
    order = tr.epoch_order(1)
    loss_sum = torch.zeros(len(tr.members), dtype=torch.float64, device=tr.device)
    for t in range(steps):
        tr.step(*tr.batch_at(order, t), loss_sum)
    return tr


class OnCpu:
    """What a Trainer asks of an Accelerator, on the CPU. Accelerate keeps one state per process:
    a second Accelerator(cpu=True) beside a CUDA one raises (or would report the shared device)."""

    device = torch.device("cpu")
    process_index = 0

    def prepare(self, *objs):
        return objs if len(objs) > 1 else objs[0]

    def backward(self, loss):
        loss.backward()

    def unwrap_model(self, model):
        return model


def one_process_group(device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    path = Path(tempfile.mkdtemp()) / "pg"
    # NCCL wants a device with an index; Accelerate's one-GPU device is plain `cuda`.
    cuda = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else None
    dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, device_id=cuda)


class OnDDP(OnCpu):
    """What a Trainer asks of an Accelerator, for a process group made here (Accelerate would give
    NCCL to two ranks on one GPU, which NCCL refuses): DDP as Accelerate wraps it."""

    def __init__(self, device):
        self.device, self.process_index = device, dist.get_rank()

    def prepare(self, *objs):
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = [nn.parallel.DistributedDataParallel(o, device_ids=ids, broadcast_buffers=False)
                   if isinstance(o, nn.Module) else o for o in objs]  # modules DDP-wrapped, optimizers as they are
        return wrapped if len(wrapped) > 1 else wrapped[0]

    def unwrap_model(self, model):
        return getattr(model, "module", model)


SYNC_CASES = {"stacked": "stacked", "reference": "reference"}


def sync_config(engine: str, sync_bn: bool):
    return make_config(engine=engine, sync_bn=sync_bn, variants=("bn",), seeds=(0, 1), dtype="float64",
                       dp=2 if sync_bn else None)


def worker(out: str, device_kind: str, data_root, n: int, steps: int) -> None:
    """One of the two processes of the cross-process check (under torchrun)."""
    cuda = device_kind == "cuda"
    nccl = cuda and torch.cuda.device_count() >= 2
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank if nccl else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if nccl else "gloo", device_id=device if nccl else None)
    try:
        acc = OnDDP(device)
        splits = subset(data.load("mnist", data_root, device=device, dtype=torch.float64), n)
        states = {}
        for engine in SYNC_CASES:
            cfg = sync_config(engine, True)
            tr = Trainer(cfg, splits, acc, make_mesh(choose_layout(cfg, 2), rank))
            tr.train_steps(steps)
            states[engine] = {f"{v}/{s}": {k: t.cpu() for k, t in tr.member_state(v, s).items()} for v, s in tr.members}
            states[engine + "/module"] = type(tr.stacks[0].net[1]).__name__ if engine == "reference" else "stacked"
        torch.save({"backend": dist.get_backend(), "states": states}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_process_sync(device, data_root, n: int, steps: int, acc) -> dict:
    """Launch the two workers, then train one process on the whole batch and compare member by member."""
    import subprocess

    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", str(out), "--device", device.type, "--samples", str(n), "--steps", str(steps),
           *(["--data-root", data_root] if data_root else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"max_abs": float("inf"), "bound": 1e-10, "error": proc.stderr[-2000:]}
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    whole = subset(data.load("mnist", data_root, device=device, dtype=torch.float64), n)
    result = {"backend": ranks[0]["backend"], "bound": 1e-10, "max_abs": 0.0, "ranks_equal": True}
    for engine in SYNC_CASES:
        one = train_steps(sync_config(engine, False), whole, acc, steps)
        for key, state in ranks[0]["states"][engine].items():
            v, s = key.split("/")
            mine = one.member_state(v, int(s))
            worst = max((state[k].double() - mine[k].double().cpu()).abs().max().item() for k in state)
            result["max_abs"] = max(result["max_abs"], worst)
            result[f"{engine}/{key}"] = worst
            other = ranks[1]["states"][engine][key]
            result["ranks_equal"] &= all(torch.equal(state[k], other[k]) for k in state)
        result[f"{engine}/module"] = ranks[0]["states"][engine + "/module"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases (a dry run)")
    p.add_argument("--out", help="JSON path (default reports/gpu/<card>-<date>.json)")
    p.add_argument("--data-root", default=os.environ.get("BNBENCH_DATA_ROOT"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a process of the two-process check
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.device, a.data_root, a.samples, a.steps)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    acc = Accelerator(cpu=a.device == "cpu")
    device = acc.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": str(device), "card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "checks": {}, "timings": {}}
    checks, timings = report["checks"], report["timings"]
    t_start = time.perf_counter()

    # -- correctness, float64 -------------------------------------------------------
    cpu_acc = OnCpu()
    full64 = data.load("mnist", a.data_root, device=device, dtype=torch.float64)
    cpu64 = data.load("mnist", a.data_root, device="cpu", dtype=torch.float64)
    n, steps = (1000, 8) if a.quick else (3000, 30)
    sub, sub_cpu = subset(full64, n), subset(cpu64, n)
    kw = dict(seeds=(0, 1), dtype="float64")
    stacked = train_steps(make_config(engine="stacked", **kw), sub, acc, steps)
    reference = train_steps(make_config(engine="reference", **kw), sub, acc, steps)
    on_cpu = train_steps(make_config(engine="stacked", **kw), sub_cpu, cpu_acc, steps)
    checks["stacked_vs_reference"] = {"max_abs": max_diff(stacked, reference), "bound": 1e-9}
    checks["device_vs_cpu"] = {"max_abs": max_diff(stacked, on_cpu), "bound": 1e-9}
    c_dev = stacked.evaluate(full64.test_x, full64.test_y)[1]
    c_cpu = on_cpu.evaluate(cpu64.test_x, cpu64.test_y)[1]
    checks["exact_metrics"] = {"device_correct": c_dev.tolist(), "cpu_correct": c_cpu.tolist(), "equal": torch.equal(c_dev, c_cpu)}

    one_process_group(device)
    try:
        synced = train_steps(make_config(engine="stacked", sync_bn=True, variants=("bn",), **kw), sub, acc, steps)
        plain = train_steps(make_config(engine="stacked", variants=("bn",), **kw), sub, acc, steps)
        checks["sync_path_vs_bn"] = {"max_abs": max_diff(synced, plain), "bound": 1e-10, "backend": dist.get_backend()}
        ref_sync = train_steps(make_config(engine="reference", sync_bn=True, variants=("bn",), **kw), sub, acc, steps)
        ref_plain = train_steps(make_config(engine="reference", variants=("bn",), **kw), sub, acc, steps)
        kind = type(ref_sync.stacks[0].net[1]).__name__
        checks["reference_sync_vs_bn"] = {"max_abs": max_diff(ref_sync, ref_plain), "bound": 1e-10, "module": kind}

        # -- timings, float32 -------------------------------------------------------
        full = data.load("mnist", a.data_root, device=device, dtype=torch.float32)
        timings["data_to_device_s"] = timed(lambda: data.load("mnist", a.data_root, device=device), device, 3, 1)
        ks = (1, 5) if a.quick else (1, 5, 32)
        for engine, k in [("reference", 1)] + [("stacked", k) for k in ks]:
            for variant in ("bn", "nobn", "sync-bn"):
                cfg = make_config(engine=engine, seeds=tuple(range(k)), variants=("nobn" if variant == "nobn" else "bn",),
                                  sync_bn=variant == "sync-bn")
                tr = Trainer(cfg, full, acc)
                xb, yb = tr.batch_at(tr.epoch_order(1), 0)
                ls = torch.zeros(len(tr.members), dtype=torch.float64, device=device)
                s = timed(lambda: tr.step(xb, yb, ls), device, 20 if a.quick else 100)
                timings[f"step/{engine}/K{k}/{variant}"] = {"s": s, "member_samples_per_s": k * 100 / s}
    finally:
        dist.destroy_process_group()
    checks["sync_bn_two_processes"] = two_process_sync(device, a.data_root, n, steps, acc)

    epoch_splits = subset(full, 10_000) if a.quick else full
    for name, extra in [("eager", {}), ("tf32", {"tf32": True}), ("compile", {"compile": True})]:
        if name == "tf32" and device.type != "cuda":
            continue
        if name == "compile" and a.quick:
            continue
        torch.set_float32_matmul_precision("high" if extra.get("tf32") else "highest")
        tr = Trainer(make_config(**extra), epoch_splits, acc)
        warm = tr.warm_up()
        _, first = tr.train_epoch(1)
        _, second = tr.train_epoch(2)
        n_samples = len(tr.members) * tr.steps_per_epoch() * tr.batch
        timings[f"epoch/default/{name}"] = {"compile_s": warm, "epoch1_s": first, "epoch2_s": second,
                                            "member_samples_per_s": n_samples / second}
    torch.set_float32_matmul_precision("highest")
    tr = Trainer(make_config(), epoch_splits, acc)
    timings["full_evaluation_s"] = timed(lambda: (tr.evaluate(full.train_x, full.train_y), tr.evaluate(full.test_x, full.test_y)), device,
                                        *((1, 0) if a.quick else (3, 1)))
    if device.type == "cuda":
        timings["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["wall_s"] = time.perf_counter() - t_start

    failed = [k for k, c in checks.items() if ("bound" in c and not c["max_abs"] <= c["bound"]) or c.get("equal") is False
              or c.get("ranks_equal") is False]
    report["failed_checks"] = failed
    out = Path(a.out) if a.out else REPO / "reports" / "gpu" / f"{card.replace(' ', '_')}-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for k, c in checks.items():
        print(f"check {k:24s} {'FAIL' if k in failed else 'ok  '} {json.dumps(c)[:150]}")
    for k, v in timings.items():
        print(f"time  {k:32s} {json.dumps(v)[:150]}")
    print(f"written: {out} ({report['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
