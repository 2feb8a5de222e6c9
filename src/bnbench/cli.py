"""Command line: `bnbench run | sweep | status | export | report | data | list`.

    bnbench run --out runs/lab                 # the lab, 5 seeds, 15 epochs, MNIST
    bnbench run --seeds 0-9 --epochs 5 --out runs/ten
    bnbench sweep my.toml                      # a grid of units; rerun to resume (--example: a sample file)
    bnbench sweep my.toml --executor slurm     # the units as SLURM jobs (submitit); rerun to collect
    bnbench status runs/my                     # done / running / failed / left
    bnbench export runs/my --format parquet    # one flat table for pandas
    bnbench report runs/lab                    # -> runs/lab/report/report.html
"""
from __future__ import annotations

import argparse
from functools import partial
import os
import signal
import sys
import time
from pathlib import Path

from .config import (
    DATASETS,
    DEFAULT_PRESET,
    MAX_TIMEOUT_S,
    PRESETS,
    Config,
    ConfigError,
    flag,
    make_config,
    parse_float_list,
    parse_int_list,
    parse_list,
    parse_seeds,
    VARIANTS,
    settings,
)
from . import versions
from .files import disk_fault
from .store.folder import FolderBusy, remove_untouched, snapshot
from .dist.launch import SWEEP_CHILD_ENV, LaunchError, die_with_parent, launched_as_started, launched_rank, launched_world
from .faults import LOST_PEER, lost_peer
from .store.tracking import check_trackers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _timeout_s(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:,} seconds (7 days), got {text}")
    return value


def _non_negative_int(text: str) -> int:
    if not str(text).isdigit():
        raise ConfigError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _wrap(parse):
    def f(text):
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return f


# How a setting's kind is read from the command line; Config's validation does the rest.
_PARSE = {
    "str": str,
    "int": _positive_int,
    "float": float,
    "ints": parse_int_list,
    "strs": parse_list,
    "floats": parse_float_list,
    "seeds": parse_seeds,
}
GROUPS = {"instruments": "what BN changes inside the network, to DIR/instruments.jsonl; "
                         "training is bitwise the same with them on; one process only"}


def _default_text(f) -> str:
    """The value a run gets without the option: the default preset's, else the field's."""
    value = PRESETS[DEFAULT_PRESET].get(f.name, f.default)
    if value is None:
        return ""
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else value
    return f" (default {shown})"


def add_setting_options(parser: argparse.ArgumentParser, cls=Config) -> None:
    """One option per setting of cls, from its declaration: --name, its kind, help and default.

    Every default is None (an option not given): the preset's value, then the field's, applies.
    """
    groups = {}
    for f in settings(cls):
        m = f.metadata
        where = parser
        if m["group"]:
            if m["group"] not in groups:
                groups[m["group"]] = parser.add_argument_group(m["group"], GROUPS.get(m["group"]))
            where = groups[m["group"]]
        listed = not m["choices"] or all(c in m["help"] for c in m["choices"])
        text = m["help"] + ("" if listed else f"; one of: {', '.join(m['choices'])}")
        if f.name == "preset":
            where.add_argument(flag(f.name), default=DEFAULT_PRESET, help=f"starting values; one of: {', '.join(PRESETS)} "
                               f"(default {DEFAULT_PRESET}; bnbench list shows them)")
        elif m["kind"] == "bool":
            where.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                               help=text + _default_text(f))
        else:
            parse = _PARSE[m["kind"]]
            if m["kind"] == "int" and m["check"] == "non_negative":
                parse = _non_negative_int
            elif m["kind"] == "float" and m["check"] == "positive":
                parse = _positive_float
            if m["kind"] in ("ints", "floats"):
                parse = partial(parse, what=flag(f.name))
            where.add_argument(flag(f.name), type=_wrap(parse), metavar=m["metavar"], help=text + _default_text(f))


def build_parser(config_cls=Config) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnbench",
        description="What batch normalization buys a network: BN vs no-BN MLPs, many seeds, exact metrics.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="train BN and no-BN members over seeds; append rows to DIR/results.jsonl")
    add_setting_options(r, config_cls)
    r.add_argument("--dist-timeout", type=_timeout_s, default=600.0, metavar="SECONDS",
                   help="multi-process runs: limit for process-group set-up and any one collective (default 600, "
                        "at most 7 days)")
    r.add_argument("--data-root", help="folder with the four IDX files (default: $BNBENCH_DATA_ROOT, the cache, a download)")
    r.add_argument("--out", help="results folder (default runs/<UTC time>)")
    r.add_argument("--report", action="store_true", help="build the report when the run completes")
    r.add_argument("--log-with", metavar="TRACKER[,TRACKER]",
                   help="live curves through Accelerate's trackers: tensorboard, wandb, mlflow, trackio, aim, comet_ml, "
                        "clearml, dvclive, swanlab or all (installed ones)")
    r.add_argument("--logging-dir", metavar="DIR", help="where local trackers write (default: the results folder)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch table")

    sw = sub.add_parser("sweep", help="run a grid of units (SWEEP.toml) into one folder; rerun to resume",
                        description="Run every unit of SWEEP.toml not yet done in its results folder. "
                        "Exit status 0: every unit done; 1: a unit failed or every member of one diverged.")
    sw.add_argument("file", nargs="?", metavar="SWEEP.toml", help="the sweep file (bnbench sweep --example prints a sample)")
    sw.add_argument("--example", action="store_true", help="print the annotated sample sweep file and exit")
    sw.add_argument("--out", help="results folder (default: the file's [sweep] out, else runs/<file name>)")
    sw.add_argument("--data-root", help="folder with the IDX files (default: [sweep] data_root, $BNBENCH_DATA_ROOT, ...)")
    sw.add_argument("--dry-run", action="store_true", help="list the units and what is done; run and write nothing")
    sw.add_argument("--log-with", metavar="TRACKER[,TRACKER]", help="every unit's live curves through Accelerate's "
                    "trackers, as `bnbench run --log-with` (default: [sweep] log_with)")
    sw.add_argument("--max-units", type=_positive_int, metavar="N",
                    help="refuse a sweep of more than N units before planning it (default: [sweep] max_units, else 10000)")
    sw.add_argument("--executor", choices=("local", "slurm"),
                    help="where units run (default: [sweep] executor, else local): local, one after another on this "
                         "machine; slurm, as SLURM jobs through submitit (one job array), placed by the file's [slurm] "
                         "table (partition, time_min, gpus_per_node, cpus_per_task, mem_gb, account, array_parallelism, "
                         "additional sbatch options); each job writes to DIR/jobs/, the sweep moves finished units into "
                         "results.jsonl; killed, it leaves the jobs running and a rerun adopts them")
    sw.add_argument("--quiet", action="store_true", help="no progress; failures and the summary only")

    st = sub.add_parser("status", help="what a sweep folder holds: units done, running, failed, left")
    st.add_argument("dir", help="results folder")

    ex = sub.add_parser("export", help="results.jsonl as one flat CSV or Parquet table")
    ex.add_argument("dir", help="results folder")
    ex.add_argument("--format", choices=("csv", "parquet"), default="csv", help="default csv")
    ex.add_argument("--out", help="file to write (default DIR/results.csv or DIR/results.parquet)")

    rep = sub.add_parser("report", help="figures, tables and the verdicts (each variant against a baseline, paired by seed) from DIR/results.jsonl")
    rep.add_argument("dir", help="results folder (one run, a sweep, several devices)")
    rep.add_argument("--baseline", choices=VARIANTS, default=None, metavar="VARIANT",
                     help="the variant every other is compared with, paired by seed (default: nobn where present, "
                          "else the first)")
    rep.add_argument("--target", type=_positive_float, default=None, metavar="ACC",
                     help="test accuracy for time-to-target (default 0.97)")

    d = sub.add_parser("data", help="find, verify and cache a dataset; print where its files are")
    d.add_argument("--dataset", default="mnist", help=f"one of: {', '.join(DATASETS)}")
    d.add_argument("--data-root", help="folder with the four IDX files")

    sub.add_parser("list", help="presets, variants, datasets, engines, activations, optimizers")
    return p


def config_from_args(a) -> Config:
    """The Config of parsed `bnbench run` options."""
    return make_config(a.preset, **{f.name: getattr(a, f.name) for f in settings() if f.name != "preset"})


def preflight(a, cfg: Config, out, world: int, processes_here: int = 1, device: str | None = None):
    """Every check of `bnbench run`'s options that needs no rank, before any folder, file or process
    is made (a refused command leaves nothing behind): the output paths, the layout and what each rank
    would refuse (dist/layout.py: check_launch), a named data root, and the members' memory on
    `device` (None: not checked here; each rank checks its own device). Returns the layout."""
    from .dist.layout import check_launch, choose_layout
    from .store.results import refuse_own_file

    refuse_own_file(out, "--out")
    if a.logging_dir:
        refuse_own_file(a.logging_dir, "--logging-dir")
        _check_logging_dir(a.logging_dir, create=bool(a.log_with))
    layout = choose_layout(cfg, world)
    check_launch(cfg, world, layout.dp)
    if a.data_root or os.environ.get("BNBENCH_DATA_ROOT"):  # a named root must hold the files: no download
        from .train.data import locate

        locate(cfg.dataset, a.data_root, download=False)
    if device is not None:
        from .train.memory import check_fits

        check_fits(cfg, max(layout.sizes()), cfg.global_batch(layout.dp) // layout.dp, device, processes_here)
    return layout


def _check_logging_dir(path, create: bool) -> None:
    """--logging-dir: a folder, or one that can be made (made now, where trackers will write)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--logging-dir {path} is a file, not a folder: give a folder where trackers may write")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--logging-dir {path} cannot be made: {e.strerror or e}") from None


def _say(text: str) -> None:
    """A line to stderr in one write: the ranks of a launch share one pipe, and print() writes the newline
    apart, so two ranks' lines could run into one (seen in CI: a rank's error glued to another's)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cmd_run(a) -> int:
    from .training import Setup, training_function

    cfg = config_from_args(a)
    out = Path(a.out or f"runs/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    world = launched_world()
    device = None
    if world == 1:  # alone: this process is the one that trains, on the device Accelerate will choose
        import torch

        device = "cpu" if cfg.cpu or not torch.cuda.is_available() else torch.device("cuda")
    # Before any folder or process is made. Not in a world that this machine's ./launch.sh did not ask for:
    # its layout would be refused for the wrong reason; the ranks name the machines' difference (groups.same_launch).
    if launched_as_started():
        preflight(a, cfg, out, world, 1, device)
    child = bool(os.environ.get(SWEEP_CHILD_ENV))
    if child:
        die_with_parent(signal.SIGTERM)  # a sweep killed with -9 takes its units down with it
    trackers = check_trackers(a.log_with.split(",")) if a.log_with else None
    setup = Setup(data_root=a.data_root, dist_timeout=a.dist_timeout, log_with=trackers,
                  logging_dir=a.logging_dir or (str(out) if trackers else None))
    writes = launched_rank() == 0 and not child  # a sweep's unit: the sweep owns the folder
    before = snapshot(out) if writes else None
    try:
        run_id = training_function(cfg, out, setup, quiet=a.quiet, hold_lock=not child)
    except BaseException:
        if writes:  # refused on a rank (machines started differently) or stopped before anything was written
            remove_untouched(out, before)
        raise
    if launched_world() > 1:
        setup.accelerator.end_training()  # the process group ends with the run (NCCL warns at exit otherwise)
    if launched_rank() != 0:
        return 0  # rank 0 wrote the results and reports them
    print(f"results: {out / 'results.jsonl'} (run {run_id})")
    if a.report:
        return cmd_report(argparse.Namespace(dir=str(out)))
    print(f"report:  bnbench report {out}")
    return 0


def cmd_sweep(a) -> int:
    from .sweeps import runner as sweep
    from .sweeps.plan import example

    if a.example:
        print(example(), end="")
        return 0
    if not a.file:
        raise ConfigError("give a sweep file (bnbench sweep SWEEP.toml), or --example for a sample")
    return sweep.run_sweep(a.file, out=a.out, quiet=a.quiet, data_root=a.data_root, dry_run=a.dry_run,
                           max_units=a.max_units, log_with=a.log_with, executor=a.executor)


def cmd_status(a) -> int:
    from .sweeps.status import status

    return status(a.dir)


def cmd_export(a) -> int:
    from .sweeps.status import export

    print(f"exported: {export(a.dir, a.format, a.out)}")
    return 0


def cmd_report(a) -> int:
    from .reporting.report import DEFAULT_TARGET, build_report

    path = build_report(a.dir, target=getattr(a, "target", None) or DEFAULT_TARGET, baseline=getattr(a, "baseline", None))
    print(f"report: {path}")
    return 0


def cmd_data(a) -> int:
    from .train import data

    paths = data.locate(a.dataset, a.data_root)
    splits = data.load(a.dataset, a.data_root)
    for role, p in paths.items():
        print(f"{role:8s} {p}")
    print(f"{a.dataset}: {splits.train_x.shape[0]} train, {splits.test_x.shape[0]} test samples, verified; cache {data.cache_dir()}")
    return 0


def cmd_list(a) -> int:
    print("presets:     " + ", ".join(PRESETS))
    for name, values in PRESETS.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    for f in settings():
        if f.metadata["choices"] and f.name != "preset":
            print(f"{f.name + ':':12s} " + ", ".join(f.metadata["choices"]))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping its ranks, a scheduler's time limit): wind down like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The run's meta.json then says `interrupted` instead of staying `running` forever.
    signal.signal(signal.SIGTERM, _on_sigterm)
    who = f"bnbench [rank {launched_rank()}]" if launched_world() > 1 else "bnbench"
    try:
        if args.command in ("run", "sweep"):
            versions.check()  # before any folder or process exists
        commands = {"run": cmd_run, "sweep": cmd_sweep, "status": cmd_status, "export": cmd_export,
                    "report": cmd_report, "data": cmd_data, "list": cmd_list}
        rc = commands[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return rc
    except BrokenPipeError:  # `bnbench status D | head -1`: the reader has what it wanted
        _stdout_to_devnull()
        return 141  # as a program that SIGPIPE ended
    except ConfigError as e:
        _say(f"{who}: error: {e}")
        return 2
    except (LaunchError, FolderBusy) as e:
        _say(f"{who}: error: {e}")
        return 1
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        kept = "; completed epochs are in results.jsonl" if launched_rank() == 0 and args.command == "run" else ""
        _say(f"{who}: error: {LOST_PEER}: the output of the other processes or machines says why{kept}. "
             "Rerun once every machine is up")
        return 1
    except OSError as e:
        fault = disk_fault(e)
        if fault is None:
            raise
        _say(f"{who}: error: {fault}")
        return 1
    except KeyboardInterrupt as e:
        kept = "completed units are kept; rerun the sweep to resume" if args.command == "sweep" else "completed epochs are in results.jsonl"
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        # Only rank 0 writes the results: the other ranks (machine 1's all) have none to point at.
        _say(f"{who}: {how}; {kept}" if launched_rank() == 0 else f"{who}: {how}")
        return 143 if isinstance(e, Terminated) else 130


def _stdout_to_devnull() -> None:
    """What is still buffered for a closed pipe goes nowhere, so that the exit does not fail on it."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
