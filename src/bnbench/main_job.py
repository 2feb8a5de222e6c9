"""The main job: `./launch.sh [--nproc N] [--cpu] [machine options] [RUN OPTIONS]`.

One process runs `bnbench run` in this process; several go through accelerate_command.
"""
from __future__ import annotations

import argparse
import codecs
import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from . import cli, versions
from .config import ConfigError
from .dist.launch import LAUNCH_ENV, MACHINE_OPTIONS, LaunchOutput, accelerate_command, die_with_parent
from .faults import LOST_PEER
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
        _check_port(a)
        cmd, env = accelerate_command(total, run_args, a.num_machines, cpu, machine_args, gpus, options.dist_timeout)
    except ConfigError as e:
        print(f"bnbench: error: {e}", file=sys.stderr)
        return 2
    print(f"launch.sh: {layout.line()}; {nproc} per machine x {a.num_machines} machine(s), "
          f"{'CPU, gloo' if cpu else 'GPU, nccl'}", file=sys.stderr)
    if options.sync_bn and layout.dp == 1:
        print(f"launch.sh: {SYNC_BN_DP1}", file=sys.stderr)
    # Every machine's ranks compare these with rank 0's (dist/groups.py: same_launch): a machine started
    # with another --nproc or --num_machines is refused there, by name.
    env = {**env, LAUNCH_ENV: f"--nproc {nproc} --num_machines {a.num_machines}"}
    # The launcher's stderr (its ranks' too) passes through us: a failed launch's tracebacks are held
    # there and dropped when a rank said why in its own line (dist/launch.py: LaunchOutput). On a terminal
    # it is a pseudo-terminal, so that the ranks still draw their progress bar.
    read_fd, child_err, child_out = _output_channel()
    output = LaunchOutput(_to_stderr)
    # The launcher dies with us, even by SIGKILL: its agent would otherwise keep its ranks and port.
    # Its own process group: a Ctrl-C at the terminal, a `kill -INT` of launch.sh and a SIGTERM to it all reach
    # the launcher once, passed on by us (a Ctrl-C used to reach it twice over, a `kill -INT` never).
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=child_out, stderr=child_err,
                                preexec_fn=lambda: die_with_parent(signal.SIGTERM), process_group=0)
    finally:
        os.close(child_err)
    terminated, interrupted = [], []
    signal.signal(signal.SIGTERM, lambda signum, frame: (terminated.append(signum), proc.send_signal(signal.SIGTERM)))
    relay = threading.Thread(target=_pump, args=(read_fd, output), daemon=True)
    relay.start()
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)
            proc.send_signal(signal.SIGINT)  # the launcher winds its ranks down
    relay.join(timeout=10)
    signal.signal(signal.SIGWINCH, signal.SIG_DFL)  # the pseudo-terminal's size is no longer followed
    # Only the main machine (machine rank 0) writes the results folder.
    kept = f" Completed epochs are in {out}/results.jsonl" if int(a.machine_rank or 0) == 0 else ""
    if (terminated or interrupted) and rc != 0:  # stopped by us, not done before the signal came
        output.end(explained=True)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"launch.sh: {how}; the ranks were stopped.{kept}", file=sys.stderr)
        return 143 if terminated else 130
    if rc == 0:
        output.end(explained=False)  # anything held is shown: nothing failed that would explain it
        return 0
    # Machines that never met, or a port taken between machines: diagnoses of several machines only (on one
    # machine the port is a free one chosen here, and a store error there is news, shown whole).
    several = a.num_machines > 1
    port = _port_failure(output.notes, a) if several else None
    rendezvous = _rendezvous_failure(output.notes, a, options.dist_timeout) if several else None
    codes = output.exit_codes()
    # A rank's refusal explains the failure; a lost peer only where no rank ended otherwise than with
    # bnbench's line or the launcher's SIGTERM (a rank killed by a signal is news: the summary is shown).
    refused = [m for m in output.errors if not m.startswith(LOST_PEER)]
    explained = bool(port or rendezvous or refused or (output.errors and codes and set(codes) <= {1, -15}))
    output.end(explained)
    if port or rendezvous:
        print(port or rendezvous, file=sys.stderr)
        return 2 if port else rc
    if explained:  # the ranks' own lines, shown once each as they came; 2: they refused the settings
        return 2 if 2 in codes else rc
    print(f"launch.sh: the launch failed (exit {rc}); the failing rank is named above.{kept}", file=sys.stderr)
    return rc


def _output_channel() -> tuple[int, int, int | None]:
    """(our read end, the launcher's stderr, the launcher's stdout or None to share ours).

    On a terminal, a pseudo-terminal of its size: the ranks see a terminal (their progress bar is drawn,
    stdout stays line-buffered), and bytes pass unchanged (no output processing). Where our stdout is
    that same terminal, the launcher's stdout shares the pseudo-terminal, so that the bar's redraws and
    the lines printed above it keep their order. Elsewhere a pipe, for stderr only.
    """
    if not _on_terminal(sys.stderr):
        read_fd, write_fd = os.pipe()
        return read_fd, write_fd, None
    import termios

    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    _copy_size(master)
    signal.signal(signal.SIGWINCH, lambda signum, frame: _copy_size(master))
    same = _on_terminal(sys.stdout) and os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    return master, slave, slave if same else None


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _copy_size(master: int) -> None:
    import fcntl
    import termios

    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass


def _pump(fd: int, output: LaunchOutput) -> None:
    """Read the launch's output as it comes into `output`; every second without any, let it release what waited."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while True:
            if not select.select([fd], [], [], 1.0)[0]:
                output.tick()
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every holder of the pseudo-terminal's other end is gone
                data = b""
            if not data:
                break
            output.feed(decoder.decode(data))
        output.feed(decoder.decode(b"", final=True))
    finally:
        os.close(fd)


def _to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


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


def _check_port(a) -> None:
    """Machine 0 of several listens at --main_process_port; taken there, accelerate would fail in a traceback."""
    if a.num_machines == 1 or int(a.machine_rank or 0) != 0 or a.main_process_port is None:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds: a closing socket is no user
        try:
            s.bind(("", int(a.main_process_port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(_port_message(a)) from None


def _port_message(a) -> str:
    return (f"--main_process_port {a.main_process_port} is in use on this machine (another launch, or another "
            f"program): stop that, or start every machine with another --main_process_port")


def _port_failure(lines: list[str], a) -> str | None:
    """One line for a port taken between our check and the launcher's."""
    if any("utilizing it" in x or "EADDRINUSE" in x for x in lines):
        return f"bnbench: error: {_port_message(a)}"
    return None


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
