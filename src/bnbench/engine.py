"""Engine: train every member of a config, evaluate exactly, emit one row per member per epoch.

    bnbench run                      # the lab: 5 seeds x {bn, nobn}, 15 epochs, MNIST
    bnbench run --engine reference   # one nn.Sequential per member, stepped like the lab

Engines
  stacked    all members of one variant in one StackedMLP: one baddbmm per layer,
             one F.batch_norm per BN layer, one Adam (elementwise, so = K Adams).
  reference  one torch.nn.Sequential + optimizer per member, the lab's loop.
Both see the same batches: per seed and epoch one permutation, shared by the
bn and nobn members of that seed, drop_last like the lab.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import Config, ConfigError
from .data import Splits
from .distributed import (
    all_reduce_sum,
    backend_name,
    broadcast_buffers,
    check_world,
    convert_sync_bn,
    launched_rank,
    make_accelerator,
    shard,
)
from .models import StackedMLP, init_linears, reference_mlp


def shuffle_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (member seed, epoch), independent of the init stream."""
    h = hashlib.sha256(f"bnbench-shuffle:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which members of `seed` see the n training samples in `epoch` (CPU, int64)."""
    g = torch.Generator().manual_seed(shuffle_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def make_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD. fused=True (stacked engine) runs one kernel per parameter instead of
    ~10 elementwise ops: same update rule, 3x less time in a step dominated by per-op overhead."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, **kw)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, **kw)


def stacked_losses(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """[K] mean cross-entropy per member: xb [S=K, b, 784], yb [K, b]."""
    logits = model(xb)
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), yb.reshape(-1), reduction="none").view(k, b).mean(1)


def reference_losses(seed_row: int, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """[1]: exactly the lab's step on this member's batch."""
    return F.cross_entropy(model(xb[seed_row]), yb[seed_row]).unsqueeze(0)


@dataclass
class Unit:
    """What one optimizer steps: a StackedMLP of one variant, or one member's Sequential."""

    variant: str
    members: slice  # positions in Trainer.members (contiguous by construction)
    model: nn.Module  # what training calls: DDP-wrapped when world size > 1
    optimizer: torch.optim.Optimizer
    net: nn.Module  # the bare module: evaluation, state, buffers
    losses: Callable  # (model, xb, yb) -> [members] losses; torch.compile'd with --compile
    eager_losses: Callable  # the same, never compiled (instruments call it with other weights)


class Trainer:
    """Holds the members of one config on one device and moves them through epochs."""

    def __init__(self, cfg: Config, splits: Splits, accelerator, world_size: int = 1):
        self.cfg, self.splits, self.accelerator = cfg, splits, accelerator
        self.device = accelerator.device
        self.dtype = getattr(torch, cfg.dtype)
        self.world_size, self.rank = world_size, accelerator.process_index
        self.batch = cfg.global_batch(world_size)  # global: every member, every step
        self.local_batch = self.batch // world_size  # this process's slice of it
        n = splits.train_x.shape[0]
        if self.batch > n:
            raise ConfigError(f"global batch {self.batch} exceeds the {n} training samples")
        # With sync BN the statistics span the global batch; without, each process's slice.
        bn_batch = self.batch if cfg.sync_bn else self.local_batch
        if "bn" in cfg.variants and bn_batch < 2:
            raise ConfigError(f"BatchNorm needs at least 2 samples per batch; it would see {bn_batch}")
        if cfg.instrument and world_size > 1:
            # Its extra forwards and backwards would have to run in lock-step on every rank.
            raise ConfigError(f"--instrument measures in one process; this launch has {world_size}. "
                              "Launch it without --nproc / several processes.")
        # Any process group (even of one process, as in bench/) runs the cross-process path.
        self.sync_bn = cfg.sync_bn and dist.is_initialized()
        self.backend = backend_name()
        seeds = list(cfg.seeds)
        inits = {s: [(w.to(self.dtype), b.to(self.dtype)) for w, b in init_linears(s, cfg.layer_sizes)] for s in seeds}
        self.members = [(v, s) for v in cfg.variants for s in seeds]
        self.units: list[Unit] = []
        for vi, v in enumerate(cfg.variants):
            base = vi * len(seeds)
            if cfg.engine == "stacked":
                net = StackedMLP([inits[s] for s in seeds], bn=(v == "bn"), activation=cfg.activation,
                                 sync_bn=self.sync_bn, drop_bias=cfg.bn_drop_bias)
                self._add(v, slice(base, base + len(seeds)), net, stacked_losses, fused=True)
            else:
                for j, s in enumerate(seeds):
                    net = reference_mlp(inits[s], bn=(v == "bn"), activation=cfg.activation, drop_bias=cfg.bn_drop_bias)
                    if self.sync_bn and v == "bn":
                        net = convert_sync_bn(net, self.backend)
                    self._add(v, slice(base + j, base + j + 1), net, partial(reference_losses, j), fused=False)
        self.steps_done = 0
        self.instruments = None
        if cfg.instrument:
            from .instruments import Instruments

            self.instruments = Instruments(cfg, self.members, splits.test_x, sync=self._sync)
        self.diverged = torch.zeros(len(self.members), dtype=torch.bool)
        self.diverged_epoch: list[int | None] = [None] * len(self.members)

    def _add(self, variant: str, members: slice, net: nn.Module, losses: Callable, fused: bool) -> None:
        net = net.to(self.device)  # fused optimizers want their parameters placed first
        opt = make_optimizer(self.cfg, net.parameters(), fused=fused)
        with warnings.catch_warnings():
            # accelerate can only pass DDP broadcast_buffers=False, which torch now calls deprecated
            # in favour of forward_sync_buffers; both skip the per-step buffer broadcast we avoid.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            model, opt = self.accelerator.prepare(net, opt)  # DDP when world size > 1
        eager = losses
        if self.cfg.compile:
            losses = torch.compile(losses)
        self.units.append(Unit(variant, members, model, opt, self.accelerator.unwrap_model(model), losses, eager))

    def warm_up(self) -> float:
        """With --compile: compile every unit's forward and backward on the first batch, then
        restore every parameter and buffer, so that training is unchanged. Returns the seconds
        spent (reported apart from training). Without --compile: 0.0, nothing done."""
        if not self.cfg.compile:
            return 0.0
        self._sync()
        t0 = time.perf_counter()
        xb, yb = self.gather(self.epoch_order(1), 0)
        for u in self.units:
            saved = {k: v.detach().clone() for k, v in u.net.state_dict().items()}
            u.model.train()
            self.accelerator.backward(u.losses(u.model, xb, yb).sum())
            u.optimizer.zero_grad(set_to_none=True)
            u.net.load_state_dict(saved)
        self._sync()
        return time.perf_counter() - t0

    # -- training -----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.splits.train_x.shape[0] // self.batch  # drop_last, as the lab

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """[S, N] permutations, one per seed, on the device."""
        n = self.splits.train_x.shape[0]
        return torch.stack([epoch_permutation(s, epoch, n) for s in self.cfg.seeds]).to(self.device)

    def local_indices(self, order: torch.Tensor, t: int) -> torch.Tensor:
        """[S, b]: the samples this rank trains on in step t, its slice of the global batch."""
        start = t * self.batch + self.rank * self.local_batch
        return order[:, start : start + self.local_batch]

    def gather(self, order: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step t's inputs [S, b, 784] and labels [S, b] for every seed: one gather each."""
        idx = self.local_indices(order, t).reshape(-1)
        s = len(self.cfg.seeds)
        # index_select is ~3x faster than x[idx] on the CPU.
        xb = self.splits.train_x.index_select(0, idx).view(s, self.local_batch, -1)
        yb = self.splits.train_y.index_select(0, idx).view(s, self.local_batch)
        return xb, yb

    def step(self, xb: torch.Tensor, yb: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One optimizer step of every member; adds each member's batch loss to loss_sum (on the device)."""
        probe = self.instruments
        for u in self.units:
            u.optimizer.zero_grad(set_to_none=True)
            losses = u.losses(u.model, xb, yb)
            # Summing member losses keeps each member's gradient its own.
            self.accelerator.backward(losses.sum())
            if probe is not None:
                probe.before_step(u, xb, yb, self.steps_done)
            u.optimizer.step()
            if probe is not None:
                probe.after_step(u, xb, yb, self.steps_done)
            loss_sum[u.members] += losses.detach()

    def train_steps(self, stop: int, on_step=None) -> tuple[torch.Tensor, float]:
        """Step every member from step self.steps_done up to `stop` (a window of an epoch or
        across epochs). Returns (mean mini-batch loss per member over the window, seconds).

        Global step g is step g % S of epoch g // S + 1 (S steps per epoch). Every rank draws
        the same permutation; rank r takes [r*b, (r+1)*b) of each global batch of B = W*b
        samples, so ranks see disjoint slices that together are exactly the one-process batch.
        Instruments' time is taken out of the seconds.
        """
        start, per_epoch = self.steps_done, self.steps_per_epoch()
        # Accumulated on the device: no host synchronisation inside the step loop.
        loss_sum = torch.zeros(len(self.members), dtype=torch.float64, device=self.device)
        for u in self.units:
            u.model.train()
        measured = self.instruments.seconds if self.instruments else 0.0
        self._sync()
        t0 = time.perf_counter()
        order_of = (None, None)
        for g in range(start, stop):
            epoch, t = g // per_epoch + 1, g % per_epoch
            if order_of[0] != epoch:  # shuffling is part of an epoch's cost, as in a DataLoader
                order_of = (epoch, self.epoch_order(epoch))
            self.step(*self.gather(order_of[1], t), loss_sum)
            self.steps_done = g + 1
            if on_step is not None:
                on_step(g + 1 - start)
        # Equal slices: the mean of the ranks' slice losses is the global-batch loss.
        all_reduce_sum(loss_sum)
        if not self.sync_bn:
            # Each rank's BN running statistics followed its own slice: from here on, all hold rank 0's.
            broadcast_buffers([u.net for u in self.units])
        self._sync()
        seconds = time.perf_counter() - t0 - ((self.instruments.seconds - measured) if self.instruments else 0.0)
        return (loss_sum / ((stop - start) * self.world_size)).cpu(), seconds

    def train_epoch(self, epoch: int, on_step=None) -> tuple[torch.Tensor, float]:
        """Epoch `epoch` for every member (the next one): train_steps to its last step."""
        per_epoch = self.steps_per_epoch()
        if self.steps_done != (epoch - 1) * per_epoch:
            raise ValueError(f"epoch {epoch} starts at step {(epoch - 1) * per_epoch}; {self.steps_done} steps are done")
        return self.train_steps(epoch * per_epoch, on_step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Eval mode over every sample of (x, y), each scored exactly once over all ranks
        (contiguous shares, no padding): per member the mean loss (float64), the number
        correct (int64), and the number of samples scored. Every rank returns the same."""
        m = len(self.members)
        loss_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
        correct = torch.zeros(m, dtype=torch.int64, device=self.device)
        for u in self.units:
            u.net.eval()
        mine = shard(x.shape[0], self.rank, self.world_size)
        for start in range(mine.start, mine.stop, self.cfg.eval_batch):
            stop = min(start + self.cfg.eval_batch, mine.stop)
            xc, yc = x[start:stop], y[start:stop]
            for u in self.units:
                logits = u.net(xc)
                if logits.dim() == 2:
                    logits = logits.unsqueeze(0)
                k, n, c = logits.shape
                per_sample = F.cross_entropy(logits.reshape(k * n, c), yc.repeat(k), reduction="none").view(k, n)
                loss_sum[u.members] += per_sample.sum(1, dtype=torch.float64)
                correct[u.members] += (logits.argmax(-1) == yc).sum(1)
        all_reduce_sum(loss_sum)
        all_reduce_sum(correct)
        total = x.shape[0]
        return (loss_sum / total).cpu(), correct.cpu(), total

    # -- member access (tests, checkpoints) ---------------------------------------
    def _unit(self, variant: str, seed: int) -> tuple[Unit, int]:
        i = self.members.index((variant, seed))
        for u in self.units:
            if u.members.start <= i < u.members.stop:
                return u, i - u.members.start
        raise KeyError((variant, seed))

    def member_state(self, variant: str, seed: int) -> dict[str, torch.Tensor]:
        """The member's weights and BN buffers under nn.Sequential's keys, whatever the engine."""
        u, k = self._unit(variant, seed)
        if isinstance(u.net, StackedMLP):
            return u.net.member_state_dict(k)
        return {key: v.detach().clone() for key, v in u.net.state_dict().items()}

    def load_member_state(self, variant: str, seed: int, state: dict[str, torch.Tensor]) -> None:
        u, k = self._unit(variant, seed)
        if isinstance(u.net, StackedMLP):
            u.net.load_member_state_dict(k, state)
        else:
            u.net.load_state_dict(state)

    def mark_diverged(self, epoch: int, *values: torch.Tensor) -> None:
        bad = torch.zeros_like(self.diverged)
        for v in values:
            bad |= ~torch.isfinite(v)
        for i in torch.nonzero(bad & ~self.diverged).flatten().tolist():
            self.diverged_epoch[i] = epoch
        self.diverged |= bad


# -- the run: config -> data -> trainer -> rows ------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .results import cpu_name

    return cpu_name()


def new_run_id() -> str:
    import secrets

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{os.getpid() % 10000:04d}{secrets.token_hex(2)}"


def static_fields(cfg: Config, run_id: str, trainer: Trainer, device: str, dev_name: str, git: str) -> dict:
    """The columns every row of a run shares."""
    from . import __version__

    return {
        "run_id": run_id,
        "unit": cfg.unit_id(trainer.world_size, trainer.device.type, torch.__version__),
        "repeat": cfg.repeat,
        "preset": cfg.preset,
        "dataset": cfg.dataset,
        "batch_size": trainer.batch,
        "per_device_batch": trainer.local_batch,
        "lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "momentum": cfg.momentum,
        "hidden": ",".join(map(str, cfg.hidden)),
        "activation": cfg.activation,
        "epochs": cfg.epochs,
        "engine": cfg.engine,
        "dtype": cfg.dtype,
        "device": device,
        "device_name": dev_name,
        "world_size": trainer.world_size,
        "backend": trainer.backend,
        "sync_bn": cfg.sync_bn,
        "bn_drop_bias": cfg.bn_drop_bias,
        "eval_every": cfg.eval_every,
        "compile": cfg.compile,
        "tf32": cfg.tf32,
        "members": len(trainer.members),
        "bnbench_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git,
    }


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process and peak GPU memory allocated by torch, in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss, 1), "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def epoch_rows(trainer: Trainer, static: dict, epoch, running, seconds: float, train, test, steps: int) -> list[dict]:
    """One row per member after a window of `steps` steps; a diverged member's metrics are None (null in JSON)."""
    from .results import utcnow

    (train_loss, train_correct, train_total), (test_loss, test_correct, test_total) = train, test
    throughput = len(trainer.members) * steps * trainer.batch / seconds
    memory = peak_memory(trainer.device)
    now = utcnow()
    rows = []
    for i, (variant, seed) in enumerate(trainer.members):
        ok = not bool(trainer.diverged[i])
        rows.append(
            {
                **static,
                "variant": variant,
                "seed": seed,
                "epoch": epoch,
                "step": trainer.steps_done,
                "train_loss": float(train_loss[i]) if ok else None,
                "train_acc": int(train_correct[i]) / train_total if ok else None,
                "test_loss": float(test_loss[i]) if ok else None,
                "test_acc": int(test_correct[i]) / test_total if ok else None,
                "train_correct": int(train_correct[i]),
                "train_total": train_total,
                "test_correct": int(test_correct[i]),
                "test_total": test_total,
                "train_loss_running": float(running[i]) if ok else None,
                "train_seconds": seconds,
                "samples_per_s": throughput,
                **memory,
                "diverged": not ok,
                "time": now,
            }
        )
    return rows


TABLE = ["epoch", "variant", "train_loss", "train_acc", "test_loss", "test_acc", "diverged", "train_s", "member-samples/s"]


def table_lines(rows: list[dict], header: bool) -> list[str]:
    """The per-epoch console table: per variant the mean over live members, columns aligned."""
    lines = []
    widths = [max(len(c), 9) for c in TABLE]
    if header:
        lines.append("  ".join(c.rjust(w) for c, w in zip(TABLE, widths)))
    for v in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == v]
        live = [r for r in mine if not r["diverged"]]

        def mean(key):
            return f"{sum(r[key] for r in live) / len(live):.4f}" if live else "nan"

        vals = [
            str(mine[0]["epoch"]), v, mean("train_loss"), mean("train_acc"), mean("test_loss"), mean("test_acc"),
            f"{len(mine) - len(live)}/{len(mine)}", f"{mine[0]['train_seconds']:.2f}", f"{mine[0]['samples_per_s']:,.0f}",
        ]
        lines.append("  ".join(x.rjust(w) for x, w in zip(vals, widths)))
    return lines


def training_function(
    cfg: Config,
    out_dir,
    data_root=None,
    quiet: bool = False,
    accelerator=None,
    splits: Splits | None = None,
    trainer_hook=None,
    dist_timeout: float = 600.0,
    hold_lock: bool = True,
    on_epoch=None,
) -> str:
    """Run cfg, append every epoch's rows to out_dir/results.jsonl, return the run id.

    Runs unchanged in one process or under `accelerate launch` / torchrun; only
    rank 0 writes. Its output folder is opened first: a folder that cannot be
    written, or that a sweep holds, fails before any data is read or any step is taken.
    hold_lock=False: the caller (a sweep) holds the folder. on_epoch(epoch, rows): after
    each epoch's rows are on disk.
    """
    from tqdm.auto import tqdm

    from . import data
    from .results import INSTRUMENTS_FILE, ResultsWriter, environment, signals_deferred, update_meta, utcnow

    main = launched_rank() == 0
    writer = ResultsWriter(out_dir, hold_lock=hold_lock) if main else None
    run_id = None
    try:
        accelerator = accelerator or make_accelerator(cfg.cpu, dist_timeout)
        world_size = check_world(accelerator)
        # TF32 is opt-in: results stay comparable across GPUs and with the CPU.
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
        # One process per machine fills the data cache (or downloads) while the others wait.
        with accelerator.local_main_process_first():
            if splits is None:
                splits = data.load(cfg.dataset, data_root, device=accelerator.device, dtype=getattr(torch, cfg.dtype))
        trainer = Trainer(cfg, splits, accelerator, world_size=world_size)
        if trainer_hook is not None:
            trainer_hook(trainer)  # tests: inspect or perturb members before training
        run_id = new_run_id()
        env = environment()
        dev, dev_name = str(accelerator.device), device_name(accelerator.device)
        static = static_fields(cfg, run_id, trainer, dev, dev_name, env["git_commit"])
        if main:
            update_meta(out_dir, run_id, {
                "config": cfg.to_dict(), "unit": static["unit"], "status": "running", "started": utcnow(),
                "device": dev, "device_name": dev_name, "world_size": world_size, "backend": trainer.backend,
                "processes_per_machine": int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                "batch_size": trainer.batch, "per_device_batch": trainer.local_batch,
                "mixed_precision": str(accelerator.mixed_precision), "data_sources": splits.sources,
                "train_samples": int(splits.train_x.shape[0]), "test_samples": int(splits.test_x.shape[0]),
                **env,
            })
        compile_seconds = trainer.warm_up()
        if main and cfg.compile:
            update_meta(out_dir, run_id, {"compile_seconds": compile_seconds})
        show = main and not quiet
        if show:
            where = f"{world_size} processes ({trainer.backend}), " if world_size > 1 else ""
            accelerator.print(
                f"bnbench run {run_id}: {len(cfg.seeds)} seeds x {','.join(cfg.variants)}, {cfg.epochs} epochs, "
                f"{cfg.dataset}, engine {cfg.engine}, batch {trainer.batch}"
                f"{f' ({trainer.local_batch}/process)' if world_size > 1 else ''}"
                f"{', sync BN' if trainer.sync_bn else ''}, {where}{dev} ({dev_name})"
            )
        per_epoch = trainer.steps_per_epoch()
        stops = cfg.eval_steps(world_size, int(splits.train_x.shape[0]))  # the evaluation points
        tick = max(1, per_epoch // 100)  # progress updates: ~100 per epoch, not one per step
        # One bar for the whole run (its ETA is the run's); off when not a terminal or --quiet.
        bar = tqdm(total=stops[-1], unit="step", leave=False, disable=None if show else True)
        for point, stop in enumerate(stops, start=1):
            # Whole epochs are integers; a window ends in the middle of one with --eval-every.
            epoch = stop // per_epoch if stop % per_epoch == 0 else stop / per_epoch
            window = stop - trainer.steps_done
            bar.set_description(f"epoch {epoch:g}/{cfg.epochs}")
            running, seconds = trainer.train_steps(stop, on_step=lambda t: bar.update(tick) if t % tick == 0 else None)
            bar.update(stop - bar.n)
            bar.set_description(f"epoch {epoch:g}/{cfg.epochs} eval")
            train = trainer.evaluate(splits.train_x, splits.train_y)
            test = trainer.evaluate(splits.test_x, splits.test_y)
            trainer.mark_diverged(epoch, running, train[0], test[0])
            rows = epoch_rows(trainer, static, epoch, running, seconds, train, test, window)
            if main:
                if trainer.instruments is not None:
                    # Before the window's results: a unit whose results are complete has all its measures.
                    writer.append(trainer.instruments.rows({k: static[k] for k in ("run_id", "unit", "repeat")}),
                                  INSTRUMENTS_FILE)
                writer.append(rows)  # durable before the next window starts
            if on_epoch is not None:
                on_epoch(epoch, rows)
            if show:
                for line in table_lines(rows, header=point == 1):
                    bar.write(line)  # above the bar, which stays at the bottom
        bar.close()
        n_div = int(trainer.diverged.sum())
        if main:
            done = {"status": "complete", "finished": utcnow(), "diverged_members": n_div}
            if trainer.instruments is not None:
                done["instrument_seconds"] = round(trainer.instruments.seconds, 3)
            with signals_deferred():
                update_meta(out_dir, run_id, done)
        if show and n_div:
            names = [f"{v}/seed{s} (epoch {trainer.diverged_epoch[i]})" for i, (v, s) in enumerate(trainer.members) if trainer.diverged[i]]
            accelerator.print(f"warning: {n_div} member(s) diverged: {', '.join(names)}")
        return run_id
    except BaseException as e:
        if run_id is not None and main:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            with signals_deferred():
                update_meta(out_dir, run_id, {"status": status, "finished": utcnow(), "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if writer is not None:
            writer.close()
