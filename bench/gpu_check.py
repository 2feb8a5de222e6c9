"""On a lent GPU: is the CUDA path right, and how fast is it? One JSON, written section by section.

The device command (run from the repository root on the lent machine, under its own python3;
the MNIST files carried in the ignored folder .mnist/, made here by `bench/gpu_check.py --stage .mnist`):

    set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/gpu_check.py --data-root .mnist \\
        --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"

(device tool: carry [".mnist"], timeout_s 600; the full run is sized for 8 minutes, --quick for 3.)
The CPU rehearsal is the same line with `--device cpu`: every CUDA-only part says "skipped: no
CUDA", the rest runs at CPU sizes (tests/test_bench_scripts.py runs it).

Sections, each bounded in time and written to the JSON as soon as it ends (a failed one records
its error; the others still run):
  environment   torch, CUDA, cuDNN, Accelerate; the card; whether the functional all_reduce has
                a backward (the sync-BN gradient needs it)
  correctness   float64 on the device: stacked == reference over 120 steps (<= 1e-9, as on the
                CPU); the device == the CPU from the same init and batches (<= 1e-9); the seam's
                self-check and the hand-written step against autograd over 40 steps; exact counts
  sync_bn       two processes on one device (gloo; CUDA tensors on a GPU) as one data-parallel
                group with --sync-bn, each on half of every batch, against one process on the
                whole batch: torch's nn.SyncBatchNorm (reference engine, on CUDA) and bnbench's
                cross-process BN (stacked engine); per tensor the max abs and relative difference,
                judged against a relative bound of 1e-9 (float64)
  timing        the lab's own loop (DataLoader, one model at a time) and the default run's training
                on the same card, steps between CUDA events after warm-up: per-step time,
                member-samples/s, the ratio; the lab config's 15 epochs of training in seconds
  cuda_graphs   the default step captured (train/graphs.py) against the uncaptured one, 100 steps
                (equal within the bound stated there), and per-step time eager vs replayed
  k_scaling     K = 1 ... 1024 members (512 seeds x bn, nobn): member-samples/s and peak memory
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The one device command (docs/performance.md shows it; tests/test_bench_scripts.py runs it with --device cpu).
DEVICE_COMMAND = ('set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=src {python} bench/gpu_check.py --data-root {mnist} '
                  '--out "$OUT/gpu_check.json"{extra} 2>&1 | tee "$OUT/gpu_check.log"')


def device_command(python: str = "python3", mnist: str = ".mnist", extra: str = "") -> str:
    return DEVICE_COMMAND.format(python=python, mnist=mnist, extra=extra)
GRAPH_RTOL = 1e-6  # captured vs uncaptured, float32: max |diff| over the member's largest |value|
SYNC_RTOL = 1e-9  # two processes vs one, float64: max |diff| over the member's largest |value|


# -- running sections ----------------------------------------------------------------------------
class SectionTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise SectionTimeout()


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_section(report: dict, out: Path, name: str, fn, budget_s: int, ctx: dict) -> None:
    """fn(ctx) -> dict, within budget_s seconds (SIGALRM); its result, or its error, into the JSON now."""
    t0 = time.perf_counter()
    print(f"== {name} (at most {budget_s} s)", flush=True)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(budget_s)
    try:
        result = fn(ctx)
        status = result.pop("_status", "ok")
    except SectionTimeout:
        result, status = {"error": f"over its {budget_s} s budget"}, "timeout"
    except Exception as e:  # noqa: BLE001 - a section's failure is its result; the others still run
        result, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}, "error"
    finally:
        signal.alarm(0)
    result["status"], result["seconds"] = status, round(time.perf_counter() - t0, 2)
    report["sections"][name] = result
    report["failed"] = [k for k, v in report["sections"].items() if v["status"] not in ("ok", "skipped: no CUDA")
                        or v.get("pass") is False]
    write_json(out, report)
    print(f"   {name}: {status}{' PASS' if result.get('pass') else ''}{' FAIL' if result.get('pass') is False else ''}"
          f" ({result['seconds']:.1f} s) {json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)[:400]}",
          flush=True)


def skipped() -> dict:
    return {"_status": "skipped: no CUDA"}


# -- helpers -------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_step(fn, device, steps: int, warmup: int) -> float:
    """Seconds per call of fn in a loop of `steps` after `warmup` calls: between CUDA events on a
    GPU (a loop's throughput, not one call's latency), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def stepping(tr):
    """A call that takes tr's next training step on epoch 1's batches, round and round (for per_step)."""
    order = tr.epoch_order(1)
    loss_sum = torch.zeros(len(tr.members), dtype=torch.float64, device=tr.device)
    count = iter(range(10**9))

    def one_step():
        tr.step(*tr.batch_at(order, next(count) % tr.steps_per_epoch()), loss_sum)

    return one_step


def compare_tensors(a: dict, b: dict) -> dict:
    """Two state dicts (one member's, say): per tensor max |a - b| and that over the tensor's largest
    |b|; overall the worst |a - b| and that over the largest |b| of all the tensors (`rel`, what the
    bounds judge: a tensor near zero, a BN shift after a few steps, makes its own ratio large)."""
    per, worst, scale = {}, 0.0, 0.0
    for k in a:
        x, y = a[k].double().cpu(), b[k].double().cpu()
        d = (x - y).abs().max().item() if x.numel() else 0.0
        s = y.abs().max().item() if y.numel() else 0.0
        per[k] = {"abs": d, "rel": d / s if s else (0.0 if d == 0 else float("inf"))}
        worst, scale = max(worst, d), max(scale, s)
    return {"max_abs": worst, "rel": worst / scale if scale else 0.0, "tensors": per}


def trainer_diff(a, b) -> dict:
    """The worst member of two trainers over the same members: max |diff| and its member-relative size."""
    out = {"max_abs": 0.0, "rel": 0.0}
    for v, s in a.members:
        d = compare_tensors(a.member_state(v, s), b.member_state(v, s))
        out = {"max_abs": max(out["max_abs"], d["max_abs"]), "rel": max(out["rel"], d["rel"])}
    return out


def train_steps(cfg, splits, acc, steps: int):
    from bnbench.train.engine import Trainer

    tr = Trainer(cfg, splits, acc)
    tr.train_steps(steps)  # across epochs, each with its own order, as a run steps
    return tr


class OnDevice:
    """What a Trainer asks of an Accelerator, on a device given here (one Accelerate state per process
    cannot hold a CUDA and a CPU device side by side)."""

    process_index = 0

    def __init__(self, device):
        self.device = torch.device(device)

    def prepare(self, *objs):
        return objs if len(objs) > 1 else objs[0]

    def backward(self, loss):
        loss.backward()

    def unwrap_model(self, model):
        return model


def subset(s, n: int):
    from bnbench.train.data import Splits

    return Splits(s.train_x[:n], s.train_y[:n], s.test_x, s.test_y, s.sources)


def load(ctx, device, dtype=torch.float32):
    from bnbench.train import data

    return data.load("mnist", ctx["data_root"], device=device, dtype=dtype, download=False)


# -- sections ------------------------------------------------------------------------------------
def environment(ctx) -> dict:
    import accelerate
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    device = ctx["device"]
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "accelerate": accelerate.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["driver"] = f"unknown ({e})"
    else:
        env["card"] = platform.processor() or "cpu"
    # The sync-BN backward: a one-process gloo group, all_reduce of a leaf, its gradient back.
    store = Path(tempfile.mkdtemp()) / "pg"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        x = torch.ones(3, requires_grad=True)
        funcol.wait_tensor(funcol.all_reduce(x * 2, "sum", dist.group.WORLD)).sum().backward()
        env["functional_all_reduce_backward"] = x.grad is not None and torch.equal(x.grad, torch.full((3,), 2.0))
    except Exception as e:  # noqa: BLE001
        env["functional_all_reduce_backward"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    from bnbench import versions

    try:
        versions.check()
        env["versions_ok"] = True
    except Exception as e:  # noqa: BLE001
        env["versions_ok"] = str(e)
    ctx["env"] = env
    print("   " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    env["pass"] = env["functional_all_reduce_backward"] is True and env["versions_ok"] is True
    return env


def correctness(ctx) -> dict:
    from bnbench.config import make_config
    from bnbench.train import step as seam

    device, quick = ctx["device"], ctx["quick"]
    dev64, cpu64 = load(ctx, device, torch.float64), load(ctx, "cpu", torch.float64)
    n, steps = (2000, 40) if quick or device.type == "cpu" else (6000, 120)
    acc, cpu_acc = OnDevice(device), OnDevice("cpu")
    kw = dict(seeds=(0, 1, 2), dtype="float64")
    r = {"steps": steps}
    stacked = train_steps(make_config(engine="stacked", **kw), subset(dev64, n), acc, steps)
    reference = train_steps(make_config(engine="reference", **kw), subset(dev64, n), acc, steps)
    r["stacked_vs_reference"] = {**trainer_diff(stacked, reference), "bound_abs": 1e-9}
    if device.type == "cuda":
        on_cpu = train_steps(make_config(engine="stacked", **kw), subset(cpu64, n), cpu_acc, steps)
        r["device_vs_cpu"] = {**trainer_diff(stacked, on_cpu), "bound_abs": 1e-9}
        c_dev = stacked.evaluate(dev64.test_x, dev64.test_y)[1]
        c_cpu = on_cpu.evaluate(cpu64.test_x, cpu64.test_y)[1]
        r["exact_counts"] = {"device": c_dev.tolist(), "cpu": c_cpu.tolist(), "equal": torch.equal(c_dev, c_cpu)}
    else:
        r["device_vs_cpu"] = "skipped: no CUDA"
    # The seam: its self-check verdict on this device, and the hand-written step against autograd.
    dev32 = load(ctx, device)
    seam_r = {}
    for dtype, splits in (("float32", dev32), ("float64", dev64)):
        n_steps = 40 if device.type == "cuda" else 10
        fast = train_steps(make_config(seeds=(0, 1), dtype=dtype), subset(splits, 4000), acc, n_steps)
        plain = train_steps(make_config(seeds=(0, 1), dtype=dtype, step_impl="autograd"), subset(splits, 4000), acc, n_steps)
        seam_r[dtype] = {"self_check": seam.self_check(fast.cfg, fast.stacks[0].net) or "agrees",
                         "step_impl": fast.stacks[0].step_impl, **trainer_diff(fast, plain),
                         "bitwise": all(torch.equal(a, b) for m in fast.members for a, b in
                                        zip(fast.member_state(*m).values(), plain.member_state(*m).values()))}
    r["hand_written_vs_autograd"] = {"steps": n_steps, **seam_r}
    r["pass"] = (r["stacked_vs_reference"]["max_abs"] <= 1e-9
                 and (device.type != "cuda" or (r["device_vs_cpu"]["max_abs"] <= 1e-9 and r["exact_counts"]["equal"]))
                 and all(v["self_check"] == "agrees" and v["step_impl"] == "fused" for v in seam_r.values())
                 and (device.type == "cuda" or all(v["bitwise"] for v in seam_r.values())))  # exact on the CPU
    return r


SYNC_ENGINES = ("stacked", "reference")


def _sync_config(engine: str, sync_bn: bool):
    from bnbench.config import make_config

    return make_config(engine=engine, sync_bn=sync_bn, variants=("bn",), seeds=(0, 1), dtype="float64",
                       dp=2 if sync_bn else None)


def worker(out: str, device_kind: str, data_root, n: int, steps: int) -> None:
    """One of the two processes of the sync_bn section (under torch.distributed.run)."""
    import torch.distributed as dist
    from torch import nn

    from bnbench.dist.groups import make_mesh
    from bnbench.dist.layout import choose_layout
    from bnbench.train.engine import Trainer

    rank = int(os.environ["RANK"])
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    dist.init_process_group("gloo")  # gloo takes CUDA tensors: both ranks share the one GPU

    class OnDDP(OnDevice):
        def __init__(self):
            super().__init__(device)
            self.process_index = rank

        def prepare(self, *objs):
            wrapped = [nn.parallel.DistributedDataParallel(o, broadcast_buffers=False) if isinstance(o, nn.Module)
                       else o for o in objs]
            return wrapped if len(wrapped) > 1 else wrapped[0]

        def unwrap_model(self, model):
            return getattr(model, "module", model)

    try:
        splits = subset(load({"data_root": data_root}, device, torch.float64), n)
        states = {}
        for engine in SYNC_ENGINES:
            cfg = _sync_config(engine, True)
            tr = Trainer(cfg, splits, OnDDP(), make_mesh(choose_layout(cfg, 2), rank))
            tr.train_steps(steps)
            states[engine] = {f"{v}/{s}": {k: t.cpu() for k, t in tr.member_state(v, s).items()} for v, s in tr.members}
            states[engine + "/module"] = type(tr.stacks[0].net[1]).__name__ if engine == "reference" else "stacked"
        torch.save({"backend": dist.get_backend(), "states": states}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def sync_bn(ctx) -> dict:
    from bnbench.dist.launch import free_port

    device, quick = ctx["device"], ctx["quick"]
    n, steps = (1000, 10) if quick or device.type == "cpu" else (3000, 30)
    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", str(out), "--device", device.type, "--samples", str(n), "--steps", str(steps),
           "--data-root", str(ctx["data_root"])]
    # torchrun in a session of its own: on a timeout (its own, or the section's SIGALRM) it gets SIGTERM,
    # which it passes to its workers (they run in sessions of their own, beyond a process-group kill),
    # so that no worker keeps the GPU busy while the next sections time it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    limit = max(30, ctx["budget"]["sync_bn"] - 20)
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        return {"_status": "timeout", "error": f"the two processes took over {limit} s", "pass": False}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        return {"_status": "error", "error": err[-3000:], "pass": False}
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    whole = subset(load(ctx, device, torch.float64), n)
    r = {"backend": ranks[0]["backend"], "steps": steps, "bound_rel": SYNC_RTOL, "ranks_equal": True}
    worst = 0.0
    for engine in SYNC_ENGINES:
        one = train_steps(_sync_config(engine, False), whole, OnDevice(device), steps)
        for key, state in ranks[0]["states"][engine].items():
            v, s = key.split("/")
            d = compare_tensors(state, one.member_state(v, int(s)))
            r[f"{engine}/{key}"] = d
            worst = max(worst, d["rel"])
            other = ranks[1]["states"][engine][key]
            r["ranks_equal"] &= all(torch.equal(state[k], other[k]) for k in state)
        r[f"{engine}/module"] = ranks[0]["states"][engine + "/module"]
    r["rel"] = worst
    r["pass"] = worst <= SYNC_RTOL and r["ranks_equal"]
    return r


def _torchvision_root(ctx) -> Path:
    """MNIST/raw/ decompressed, as torchvision.datasets.MNIST wants it."""
    from bnbench.train import data

    root = Path(tempfile.mkdtemp())
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for p in data.locate("mnist", ctx["data_root"], download=False).values():
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as src, open(raw / p.name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def lab_loop(ctx, batches: int) -> float:
    """Seconds per batch of the notebook's own training loop: torchvision MNIST through a shuffled
    DataLoader of 100, each batch moved to the device, the BN and then the no-BN model stepped."""
    import torchvision.datasets as dsets
    import torchvision.transforms as transforms

    from bnbench.train.models import init_linears, reference_mlp

    device = ctx["device"]
    train = dsets.MNIST(root=str(_torchvision_root(ctx)), train=True, transform=transforms.ToTensor(), download=False)
    loader = torch.utils.data.DataLoader(dataset=train, batch_size=100, shuffle=True, drop_last=True)
    models = [reference_mlp(init_linears(1, (784, 32, 32, 10)), norm).to(device) for norm in ("bn", "nobn")]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    criterion = torch.nn.CrossEntropyLoss().to(device)
    batches_iter = iter(loader)

    def one_batch():
        nonlocal batches_iter
        try:
            X, Y = next(batches_iter)
        except StopIteration:
            batches_iter = iter(loader)
            X, Y = next(batches_iter)
        X, Y = X.view(-1, 28 * 28).to(device), Y.to(device)
        for m, o in zip(models, opts):
            o.zero_grad()
            criterion(m(X), Y).backward()
            o.step()

    for m in models:
        m.train()
    return per_step(one_batch, device, batches, warmup=20)


def timing(ctx) -> dict:
    from bnbench.config import make_config
    from bnbench.train.engine import Trainer

    device, quick = ctx["device"], ctx["quick"]
    cuda = device.type == "cuda"
    full = load(ctx, device)
    acc = OnDevice(device)
    r = {}
    lab_s = lab_loop(ctx, 600 if cuda and not quick else (200 if cuda else 50))
    r["lab_loop"] = {"s_per_batch": lab_s, "member_samples_per_s": 2 * 100 / lab_s}
    tr = Trainer(make_config(), full, acc)
    s = per_step(stepping(tr), device, 500 if cuda else 30, warmup=10)
    r["default_step"] = {"s": s, "member_samples_per_s": len(tr.members) * tr.batch / s}
    r["default_step"]["vs_lab_loop"] = r["default_step"]["member_samples_per_s"] / r["lab_loop"]["member_samples_per_s"]
    # The lab config's training, as a run trains it (train_epoch: its seconds exclude evaluation).
    epochs = 15 if cuda and not quick else (2 if cuda else 1)
    splits = full if cuda else subset(full, 6000)
    run = Trainer(make_config(), splits, acc)
    seconds = [run.train_epoch(e)[1] for e in range(1, epochs + 1)]
    samples = len(run.members) * run.steps_per_epoch() * run.batch * epochs
    r["lab_config_training"] = {"epochs": epochs, "train_samples": splits.train_x.shape[0], "seconds": sum(seconds),
                                "member_samples_per_s": samples / sum(seconds),
                                "vs_lab_loop": samples / sum(seconds) / r["lab_loop"]["member_samples_per_s"]}
    if cuda and epochs == 15:
        r["targets"] = {"lab_config_50x_lab_loop": r["lab_config_training"]["vs_lab_loop"] >= 50,
                        "lab_config_under_5_s": sum(seconds) < 5}
    return r


def cuda_graphs(ctx) -> dict:
    from bnbench.config import make_config
    from bnbench.train.engine import Trainer
    from bnbench.train.graphs import GraphStep

    device = ctx["device"]
    if device.type != "cuda":
        return skipped()
    full = load(ctx, device)
    acc = OnDevice(device)
    captured = GraphStep(Trainer(make_config(), full, acc), capture=True)
    eager = GraphStep(Trainer(make_config(), full, acc), capture=False, capturable=True)
    order = captured.trainer.epoch_order(1)
    for t in range(100):
        for g in (captured, eager):
            g(*g.trainer.batch_at(order, t))
    torch.cuda.synchronize(device)
    d = trainer_diff(captured.trainer, eager.trainer)
    losses = compare_tensors({"l": eager.loss_sum}, {"l": captured.loss_sum})
    r = {"steps": 100, "params": d, "loss_sums": losses, "bound_rel": GRAPH_RTOL,
         "bitwise": d["max_abs"] == 0.0 and losses["max_abs"] == 0.0}
    t = {"i": 100}

    def replay():
        captured(*captured.trainer.batch_at(order, t["i"] % 600))
        t["i"] += 1

    plain = Trainer(make_config(), full, acc)
    ls = torch.zeros(len(plain.members), dtype=torch.float64, device=device)
    u = {"i": 0}

    def eager_step():
        plain.step(*plain.batch_at(order, u["i"] % 600), ls)
        u["i"] += 1

    r["eager_step_s"] = per_step(eager_step, device, 500, warmup=20)
    r["graph_step_s"] = per_step(replay, device, 500, warmup=20)
    r["speedup"] = r["eager_step_s"] / r["graph_step_s"]
    r["pass"] = d["rel"] <= GRAPH_RTOL and losses["rel"] <= GRAPH_RTOL
    return r


def k_scaling(ctx) -> dict:
    from bnbench.config import make_config
    from bnbench.train.engine import Trainer

    device, quick = ctx["device"], ctx["quick"]
    cuda = device.type == "cuda"
    full = load(ctx, device)
    acc = OnDevice(device)
    top = 1024 if cuda and not quick else (256 if cuda else 8)
    r = {}
    k = 1
    while k <= top:
        variants = ("bn",) if k == 1 else ("bn", "nobn")
        seeds = tuple(range(k // len(variants)))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        tr = Trainer(make_config(seeds=seeds, variants=variants), full, acc)
        s = per_step(stepping(tr), device, 100 if cuda else 10, warmup=5)
        r[f"K{k}"] = {"members": len(tr.members), "s": s, "member_samples_per_s": len(tr.members) * tr.batch / s,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}
        del tr
        k *= 2
    if cuda and top == 1024:
        r["targets"] = {"K1024_10M_member_samples_per_s": r["K1024"]["member_samples_per_s"] >= 10e6}
    return r


SECTIONS = [  # name, function, seconds allowed (full run; --quick and the CPU use less)
    ("environment", environment, 60),
    ("correctness", correctness, 90),
    ("sync_bn", sync_bn, 110),
    ("timing", timing, 110),
    ("cuda_graphs", cuda_graphs, 60),
    ("k_scaling", k_scaling, 50),
]


def stage(folder: Path, data_root) -> int:
    """Copy the four MNIST IDX files (as found here) into folder, for a lent machine to carry."""
    from bnbench.train import data

    folder.mkdir(parents=True, exist_ok=True)
    for p in data.locate("mnist", data_root, download=False).values():
        shutil.copy2(p, folder / p.name)
    print(f"gpu_check: MNIST staged in {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.1f} MiB)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default), or cpu for the rehearsal")
    p.add_argument("--quick", action="store_true", help="smaller cases: fits 3 minutes on the GPU")
    p.add_argument("--out", default=str(REPO / "reports" / "gpu" / "gpu_check.json"), help="the JSON, rewritten after each section")
    p.add_argument("--data-root", default=os.environ.get("BNBENCH_DATA_ROOT"), help="folder with the MNIST IDX files")
    p.add_argument("--only", help="comma list of sections to run (default all)")
    p.add_argument("--stage", metavar="DIR", help="copy the MNIST files into DIR (e.g. .mnist) and exit")
    p.add_argument("--command", action="store_true", help="print the device command and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a process of the sync_bn section
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.command:
        print(device_command())
        return 0
    if a.stage:
        return stage(Path(a.stage), a.data_root)
    if a.worker:
        worker(a.worker, a.device, a.data_root, a.samples, a.steps)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (--device cpu rehearses on the CPU)", file=sys.stderr)
        return 2
    names = [n for n, _, _ in SECTIONS]
    only = a.only.split(",") if a.only else names
    if unknown := set(only) - set(names):
        print(f"gpu_check: unknown section(s) {sorted(unknown)}; sections: {', '.join(names)}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    scale = 0.4 if a.quick else 1.0  # --quick: about 3 of the full run's 8 minutes
    ctx = {"device": device, "quick": a.quick, "data_root": a.data_root,
           "budget": {n: max(60 if n == "sync_bn" else 30, int(b * scale)) for n, _, b in SECTIONS}}
    out = Path(a.out)
    report = {"script": "bench/gpu_check.py", "argv": sys.argv[1:], "quick": a.quick,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "sections": {}, "failed": []}
    t0 = time.perf_counter()
    for name, fn, _ in SECTIONS:
        if name in only:
            run_section(report, out, name, fn, ctx["budget"][name], ctx)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(out, report)
    print(f"gpu_check: {len(report['sections'])} sections in {report['wall_s']:.0f} s; "
          f"failed: {', '.join(report['failed']) or 'none'}; written {out}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
