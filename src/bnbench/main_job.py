"""The main job: `./launch.sh [--nproc N] [--cpu] [machine options] [RUN OPTIONS]`.

One process runs `bnbench run` in this process; several go through accelerate_command.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time

from . import cli, versions
from .config import ConfigError
from .dist.launch import MACHINE_OPTIONS, accelerate_command, die_with_parent
from .dist.layout import SYNC_BN_DP1

HELP = """\
usage: ./launch.sh [--nproc N] [--cpu] [--num_machines M --machine_rank R --main_process_ip IP
                   --main_process_port P] [--out DIR] [RUN OPTIONS]

The lab's benchmark: 5 seeds x {BN, no-BN} x 15 epochs on MNIST, then its report.
  --nproc N     N processes per machine under `accelerate launch` (default one per visible GPU,
                else 1). All processes form seed groups x data-parallel groups: seed groups train
                shares of the members apart, --dp N processes train a group's members together
                (DDP). Default: as many seed groups as fit (8 processes: 8 seed groups x dp 1)
  --cpu         CPU processes (gloo), even when GPUs are visible
  --num_machines, --machine_rank, --main_process_ip, --main_process_port
                several machines, as accelerate launch takes them
  --out DIR     results folder (default runs/lab-<UTC time>)
Any other option goes to `bnbench run`.
Other commands: ./launch.sh test [PYTEST ARGS] | bench [ARGS] | sweep SWEEP.toml | CMD [ARGS] (bnbench --help).
"""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.sh", add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--nproc", type=_positive)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--num_machines", type=_positive, default=1)
    for option in MACHINE_OPTIONS:
        p.add_argument(option)
    p.add_argument("--out")
    return p


def main(argv: list[str] | None = None) -> int:
    a, run_args = main_parser().parse_known_args(argv)
    if a.help:
        print(HELP + "\nRUN OPTIONS (bnbench run --help):")
        return cli.main(["run", "--help"])
    import torch

    gpus = 0 if a.cpu else torch.cuda.device_count()
    cpu = a.cpu or gpus == 0
    nproc = a.nproc or max(gpus, 1)
    total = nproc * a.num_machines
    out = a.out or f"runs/lab-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    run_args = ["--out", out, "--report", *(["--cpu"] if cpu else []), *run_args]
    machine_args = [x for o in MACHINE_OPTIONS if getattr(a, o[2:]) is not None for x in (o, getattr(a, o[2:]))]
    # What can be checked before any process starts is checked here, once: bad options exit
    # through argparse, everything else that needs no rank in one line, exit status 2, leaving
    # nothing behind: machine options, output paths, the layout, what each rank would refuse.
    options = cli.build_parser().parse_args(["run", *run_args])
    try:
        versions.check()
        _check_machines(a)
        if total == 1:
            return cli.main(["run", *run_args])
        cfg = cli.config_from_args(options)
        layout = cli.preflight(options, cfg, out, total, nproc, "cpu" if cpu else None)
        cmd, env = accelerate_command(total, run_args, a.num_machines, cpu, machine_args, gpus, options.dist_timeout)
    except ConfigError as e:
        print(f"bnbench: error: {e}", file=sys.stderr)
        return 2
    print(f"launch.sh: {layout.line()}; {nproc} per machine x {a.num_machines} machine(s), "
          f"{'CPU, gloo' if cpu else 'GPU, nccl'}", file=sys.stderr)
    if options.sync_bn and layout.dp == 1:
        print(f"launch.sh: {SYNC_BN_DP1}", file=sys.stderr)
    # The launcher dies with us, even by SIGKILL: its agent would otherwise keep its ranks and port.
    # Several machines: its stderr passes through us, to turn a rendezvous that never completes
    # into one line (on one machine it stays the terminal's, and the progress bar with it).
    several = a.num_machines > 1
    # Its own process group: a Ctrl-C at the terminal, a `kill -INT` of launch.sh and a SIGTERM to it all reach
    # the launcher once, passed on by us (a Ctrl-C used to reach it twice over, a `kill -INT` never).
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stderr=subprocess.PIPE if several else None,
                            text=True, bufsize=1, preexec_fn=lambda: die_with_parent(signal.SIGTERM), process_group=0)
    terminated, interrupted = [], []
    signal.signal(signal.SIGTERM, lambda signum, frame: (terminated.append(signum), proc.send_signal(signal.SIGTERM)))
    seen: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stderr, seen), daemon=True)
    if several:
        relay.start()
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)
            proc.send_signal(signal.SIGINT)  # the launcher winds its ranks down
    if several:
        relay.join(timeout=10)
    # Only the main machine (machine rank 0) writes the results folder.
    kept = f" Completed epochs are in {out}/results.jsonl" if int(a.machine_rank or 0) == 0 else ""
    if (terminated or interrupted) and rc != 0:  # stopped by us, not done before the signal came
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"launch.sh: {how}; the ranks were stopped.{kept}", file=sys.stderr)
        return 143 if terminated else 130
    if rc != 0:
        rendezvous = _rendezvous_failure(seen, a, options.dist_timeout)
        print(rendezvous or f"launch.sh: the launch failed (exit {rc}); the failing rank is named above.{kept}",
              file=sys.stderr)
    return rc


def _check_machines(a) -> None:
    """The machine options, as far as one machine can check them (that every machine was started with the
    same --nproc and --num_machines only the ranks can tell)."""
    if a.machine_rank is not None:
        if not a.machine_rank.isdigit() or int(a.machine_rank) >= a.num_machines:
            raise ConfigError(f"--machine_rank {a.machine_rank}: with --num_machines {a.num_machines} it is one of "
                              f"0 .. {a.num_machines - 1}")
    if a.main_process_port is not None and not (a.main_process_port.isdigit()
                                                and 1 <= int(a.main_process_port) <= 65535):
        raise ConfigError(f"--main_process_port {a.main_process_port}: a TCP port, 1 .. 65535")


def _relay(stream, seen: list[str]) -> None:
    """The launcher's stderr, passed through line by line as it comes; the lines kept for _rendezvous_failure."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        if "Dist" in line and "Error" in line:
            seen.append(line)


def _rendezvous_failure(lines: list[str], a, timeout: float) -> str | None:
    """One line for machines that never met: torch's DistStoreError/DistNetworkError come as a traceback."""
    for line in lines:
        joined = re.search(r"Timed out after \d+ seconds waiting for clients\. (\d+)/(\d+) clients joined", line)
        if joined or "DistNetworkError" in line or "DistStoreError" in line:
            where = f"{a.main_process_ip or '127.0.0.1'}:{a.main_process_port or '?'}"
            got = f"only {joined.group(1)} of {joined.group(2)} machines joined" if joined else "this machine could not reach the main one"
            return (f"bnbench: error: the machines did not meet at {where} within --dist-timeout {timeout:g} s: {got}. "
                    f"Start the same command on every machine (--machine_rank 0 .. {a.num_machines - 1}), check "
                    f"--main_process_ip/--main_process_port, or allow longer with --dist-timeout.")
    return None


if __name__ == "__main__":
    sys.exit(main())
