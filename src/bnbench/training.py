"""The run: config -> data -> trainer -> rows, as accelerate's examples read.

    training_function(cfg, out_dir)      # what `bnbench run` calls, on every rank

Set up (accelerator, data, trainer), open the record, then per evaluation window:
train, evaluate exactly, append the rows, show the table; record how it ended. A Setup
says where the accelerator, the data and the trainer come from: sweeps reuse theirs,
tests hand in their own.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .config import Config, row_values
from .train.data import Splits
from .dist.groups import Mesh, check_world, from_first, gather_to_first, make_accelerator, make_mesh, same_settings
from .train.cost import probe
from .train.engine import Trainer
from .store.folder import INSTRUMENTS_FILE
from .dist.launch import launched_rank
from .train.memory import check_fits
from .dist.layout import SYNC_BN_DP1, choose_layout
from .store.provenance import cpu_name, environment, utcnow
from .store.record import RunRecord
from .store.results import ResultsWriter
from .store.tracking import Live


@dataclass
class Setup:
    """Where a run's accelerator, data and trainer come from. One Setup serves many runs (a
    sweep's in-process units): the accelerator is made once, each dataset loaded once."""

    data_root: str | None = None
    dist_timeout: float = 600.0  # seconds for process-group set-up and any one collective
    log_with: list[str] | None = None  # Accelerate trackers (checked: tracking.check_trackers)
    logging_dir: str | None = None  # where local trackers write (default: the results folder)
    accelerator: object = None  # made on first use unless given
    splits: Splits | None = None  # given data (tests: a subset); else loaded per (dataset, dtype)
    loaded: dict = field(default_factory=dict)

    def get_accelerator(self, cfg: Config):
        if self.accelerator is None:
            self.accelerator = make_accelerator(cfg.cpu, self.dist_timeout, self.log_with, self.logging_dir)
        return self.accelerator

    def data(self, cfg: Config, accelerator) -> Splits:
        from .train import data

        if self.splits is not None:
            return self.splits
        key = (cfg.dataset, cfg.dtype)
        if key not in self.loaded:
            # One process per machine fills the data cache (or downloads) while the others wait.
            with accelerator.local_main_process_first():
                self.loaded[key] = data.load(cfg.dataset, self.data_root, device=accelerator.device,
                                             dtype=getattr(torch, cfg.dtype))
        return self.loaded[key]

    def trainer(self, cfg: Config, splits: Splits, accelerator, mesh: Mesh) -> Trainer:
        """Tests override this to inspect or perturb members before training."""
        return Trainer(cfg, splits, accelerator, mesh)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_label(device: torch.device) -> str:
    """cpu / cuda:N: Accelerate's one-GPU device is `cuda` without an index, and rows say which GPU."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def new_run_id() -> str:
    import secrets

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{os.getpid() % 10000:04d}{secrets.token_hex(2)}"


def static_fields(cfg: Config, run_id: str, trainer: Trainer, device: str, dev_name: str, git: str) -> dict:
    """The columns every row of a run shares: its settings (declared in config.py) and run facts."""
    from . import __version__

    layout = trainer.mesh.layout
    return {
        "run_id": run_id,
        "unit": cfg.unit_id(layout.world, trainer.device.type, torch.__version__, layout.dp),
        **row_values(cfg),
        "batch_size": trainer.batch,  # resolved: the global and per-process batch whichever was given
        "per_device_batch": trainer.local_batch,
        "dp": layout.dp,  # resolved: the layout's, whether given or chosen
        "device": device,
        "device_name": dev_name,
        "world_size": layout.world,
        "seed_groups": layout.seed_groups,
        "backend": trainer.backend,
        "members": layout.members,
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


def epoch_rows(trainer: Trainer, static: dict, epoch, running, seconds: float, train, test, steps: int,
               costs: dict | None = None) -> list[dict]:
    """One row per member of this process's seed group after a window of `steps` steps; a
    diverged member's metrics are None (null in JSON). `run_rows` makes them the run's.
    costs: the cost probe's member-samples/s per variant (train/cost.py), this process's."""
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
                "seed_group": trainer.mesh.seed_group,
                "epoch": epoch,
                "step": trainer.steps_done,
                "step_impl": trainer.step_impl(variant, seed),
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
                "variant_samples_per_s": (costs or {}).get(variant),
                **memory,
                "diverged": not ok,
                "time": now,
            }
        )
    return rows


def run_rows(rows: list[dict], mesh: Mesh, steps: int, batch: int) -> list[dict] | None:
    """Rank 0: the rows of every seed group in the run's member order, with the run's window
    time (the slowest group's), throughput (every member) and peak memory (the largest);
    other ranks: None. One seed group: its rows as they are, on every rank."""
    groups = gather_to_first(rows, mesh)
    if groups is None or len(groups) == 1:
        return None if groups is None else rows
    rows = [r for g in groups for r in g]
    seconds = max(r["train_seconds"] for r in rows)
    run = {"train_seconds": seconds, "samples_per_s": len(rows) * steps * batch / seconds,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    if rows[0]["peak_gpu_mb"] is not None:
        run["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in rows)
    return [{**r, **run} for r in rows]


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


def training_function(cfg: Config, out_dir, setup: Setup | None = None, quiet: bool = False,
                      hold_lock: bool = True, on_window=None) -> str:
    """Run cfg, append every window's rows to out_dir/results.jsonl, return the run id.

    Runs unchanged in one process or under `accelerate launch` / torchrun; only rank 0
    writes. Its output folder is opened first: a folder that cannot be written, or that a
    sweep holds, fails before any data is read or any step is taken. hold_lock=False: the
    caller (a sweep) holds the folder. on_window(epoch, rows): after each window's rows are on disk.
    """
    setup = setup or Setup()
    main = launched_rank() == 0
    writer = ResultsWriter(out_dir, hold_lock=hold_lock) if main else None
    record = live = None
    try:
        # -- set up
        accelerator = setup.get_accelerator(cfg)
        world_size = check_world(accelerator)
        layout = choose_layout(cfg, world_size)
        mesh = make_mesh(layout, accelerator.process_index)
        same_settings(cfg.to_dict(), mesh)
        # Before any allocation: the most members a process holds must fit its device (on the CPU,
        # the processes of this machine share its memory).
        here = 1 if accelerator.device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        check_fits(cfg, max(layout.sizes()), cfg.global_batch(layout.dp) // layout.dp, accelerator.device, here)
        # TF32 is opt-in: results stay comparable across GPUs and with the CPU.
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
        splits = setup.data(cfg, accelerator)
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)  # peak_gpu_mb: this run's, not a sweep's earlier units'
        trainer = setup.trainer(cfg, splits, accelerator, mesh)
        run_id = from_first(new_run_id(), mesh)
        env = environment()
        dev, dev_name = device_label(accelerator.device), device_name(accelerator.device)
        static = static_fields(cfg, run_id, trainer, dev, dev_name, env["git_commit"])
        record = RunRecord(out_dir, run_id, main)
        record.start({
            "config": cfg.to_dict(), "unit": static["unit"], "started": utcnow(),
            "device": dev, "device_name": dev_name, "world_size": world_size, "backend": trainer.backend,
            "dp": layout.dp, "seed_groups": layout.seed_groups, "members_per_group": layout.sizes(),
            "layout": layout.line(),
            "processes_per_machine": int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
            "batch_size": trainer.batch, "per_device_batch": trainer.local_batch,
            "mixed_precision": str(accelerator.mixed_precision), "data_sources": splits.sources,
            "train_samples": int(splits.train_x.shape[0]), "test_samples": int(splits.test_x.shape[0]),
            **env,
        })
        compile_seconds = trainer.warm_up()
        if cfg.compile:
            record.update({"compile_seconds": compile_seconds})
        costs = {}
        if cfg.cost_probe:  # what each variant costs alone: the run trains them together (train/cost.py)
            costs, probe_seconds = probe(trainer)
            record.update({"cost_probe_seconds": round(probe_seconds, 3)})
            if accelerator.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(accelerator.device)  # peak_gpu_mb: training's, not the probe's
        stops = cfg.eval_steps(layout.dp, int(splits.train_x.shape[0]))  # the evaluation points
        display = Display(trainer, stops[-1] if stops else 0, show=main and not quiet)
        display.banner(run_id, dev, dev_name)
        live = Live(accelerator, run_id, cfg.to_dict(), main)

        # -- the loop: train a window, evaluate, record
        per_epoch = trainer.steps_per_epoch()
        for point, stop in enumerate(stops, start=1):
            # Whole epochs are integers; a window ends in the middle of one with --eval-every.
            epoch = stop // per_epoch if stop % per_epoch == 0 else stop / per_epoch
            window = stop - trainer.steps_done
            display.training(epoch)
            running, seconds = trainer.train_steps(stop, on_step=display.step)
            display.evaluating(epoch, stop)
            train = trainer.evaluate(splits.train_x, splits.train_y)
            test = trainer.evaluate(splits.test_x, splits.test_y)
            trainer.mark_diverged(running, train[0], test[0])
            rows = epoch_rows(trainer, static, epoch, running, seconds, train, test, window, costs)
            rows = run_rows(rows, mesh, window, trainer.batch)  # every group's, at rank 0
            if main:
                if trainer.instruments is not None:
                    # Before the window's results: a unit whose results are complete has all its measures.
                    writer.append(trainer.instruments.rows({k: static[k] for k in ("run_id", "unit", "repeat")}),
                                  INSTRUMENTS_FILE)
                writer.append(rows)  # durable before the next window starts
                live.window(rows)
            if on_window is not None and rows is not None:
                on_window(epoch, rows)
            display.table(rows, header=point == 1)
        display.close()

        # -- how it ended
        done = {"diverged_members": sum(bool(r["diverged"]) for r in rows) if rows else 0}
        if trainer.instruments is not None:
            done["instrument_seconds"] = round(trainer.instruments.seconds, 3)
        record.finish("complete", **done)
        display.diverged()
        return run_id
    except BaseException as e:
        if record is not None:
            record.ended_by(e)
        raise
    finally:
        if live is not None:
            live.close()
        if writer is not None:
            writer.close()


class Display:
    """What a person sees of a run on rank 0: a banner, one progress bar for the whole run (its
    ETA is the run's; off when not a terminal), the per-window table above it, diverged members."""

    def __init__(self, trainer: Trainer, total_steps: int, show: bool):
        from tqdm.auto import tqdm

        self.trainer, self.show, self.cfg = trainer, show, trainer.cfg
        self.first_diverged: dict[tuple[str, int], object] = {}  # member -> epoch its rows first say diverged
        self.tick = max(1, trainer.steps_per_epoch() // 100)  # ~100 updates per epoch, not one per step
        self.bar = tqdm(total=total_steps, unit="step", leave=False, disable=None if show else True)

    def banner(self, run_id: str, dev: str, dev_name: str) -> None:
        if not self.show:
            return
        t, cfg = self.trainer, self.cfg
        layout = t.mesh.layout
        where = f"{layout.line()}, {t.backend}, " if t.world_size > 1 else ""
        t.accelerator.print(
            f"bnbench run {run_id}: {len(cfg.seeds)} seeds x {','.join(cfg.variants)}, {cfg.epochs} epochs, "
            f"{cfg.dataset}, engine {cfg.engine}, batch {t.batch}"
            f"{f' ({t.local_batch}/process)' if t.dp > 1 else ''}"
            f"{', sync BN' if cfg.sync_bn else ''}, {where}{dev} ({dev_name})"
        )
        if cfg.sync_bn and t.dp == 1:
            t.accelerator.print(SYNC_BN_DP1)

    def training(self, epoch) -> None:
        self.bar.set_description(f"epoch {epoch:g}/{self.cfg.epochs}")

    def step(self, t: int) -> None:
        if t % self.tick == 0:
            self.bar.update(self.tick)

    def evaluating(self, epoch, stop: int) -> None:
        self.bar.update(stop - self.bar.n)
        self.bar.set_description(f"epoch {epoch:g}/{self.cfg.epochs} eval")

    def table(self, rows: list[dict] | None, header: bool) -> None:
        for r in rows or ():
            if r["diverged"]:
                self.first_diverged.setdefault((r["variant"], r["seed"]), r["epoch"])
        if self.show:
            for line in table_lines(rows, header):
                self.bar.write(line)  # above the bar, which stays at the bottom

    def close(self) -> None:
        self.bar.close()

    def diverged(self) -> None:
        if self.show and self.first_diverged:
            names = [f"{v}/seed{s} (epoch {e:g})" for (v, s), e in self.first_diverged.items()]
            self.trainer.accelerator.print(f"warning: {len(names)} member(s) diverged: {', '.join(names)}")
