"""Launch: ranks as launchers set them, launch errors, and the one `accelerate launch` command line.

Torch-free at import, so that `bnbench --help` stays instant. Sweeps (sweep.py) and the
main job (main_job.py) build their multi-process launches with accelerate_command, and nothing else does.
"""
from __future__ import annotations

import os
import re
import socket
import sys

SWEEP_CHILD_ENV = "BNBENCH_SWEEP_CHILD"  # set by a sweep in the processes of its units
MACHINE_OPTIONS = ("--machine_rank", "--main_process_ip", "--main_process_port")  # accelerate launch's own


class LaunchError(RuntimeError):
    """The processes of a launch could not form or keep their group."""


def failure_cause(log: str) -> str:
    """The line of a failed launch's output that says why: bnbench's own error first (rank 0's
    if several), else the last line that mentions an error, else the last line."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    ours = [x for x in lines if re.match(r"bnbench( \[rank \d+\])?: (error|terminated|interrupted)", x)]
    errors = [x for x in lines if "error" in x.lower()]
    return (ours[:1] or errors[-1:] or lines[-1:] or ["no output"])[0]


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch, mpirun) set it; 0 alone."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def launched_world() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def die_with_parent(signum: int, expected_parent: int | None = None) -> None:
    """Linux: have the kernel send `signum` to this process when its parent dies, even by SIGKILL.

    A sweep killed with -9 must not leave its units' processes running and writing.
    A no-op elsewhere. expected_parent: exit at once if the parent is already gone.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid() if expected_parent is None else expected_parent
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took hold
        os.kill(os.getpid(), signum)


def free_port() -> int:
    """A TCP port free on this machine now (for a one-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(processes: int, run_args: list[str], machines: int = 1, cpu: bool = True,
                       machine_args: list[str] = (), gpus: int = 0, timeout: float = 600.0) -> tuple[list[str], dict]:
    """(argv, extra environment) of `accelerate launch` for `processes` ranks of `bnbench run run_args`.

    --multi_gpu is Accelerate's DDP mode; on CPUs ACCELERATE_USE_CPU=true makes it gloo (without
    it, N processes would each train alone on all the data; bnbench refuses that). A GPU launch
    of more processes per machine than visible GPUs would put two ranks on one device, which
    NCCL refuses at the first collective: refused here, before any process starts.
    """
    per_machine = processes // machines
    if not cpu and per_machine > gpus:
        from ..config import ConfigError

        raise ConfigError(f"{per_machine} processes per machine but {gpus} visible GPU(s): two ranks would share a "
                          "device, which NCCL refuses; use at most one process per GPU, or --cpu")
    if not any(a.startswith("--main_process_port") for a in machine_args):
        machine_args = [*machine_args, "--main_process_port", str(free_port())] if machines == 1 else list(machine_args)
    # The launcher's own rendezvous (machines meeting at the main process's port) waits for every
    # machine up to rdzv_conf's timeout, 600 s by default, silently: --dist-timeout bounds it too.
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no", *machine_args,
            "--rdzv_conf", f"timeout={max(1, round(timeout))}", "-m", "bnbench", "run", *run_args]
    return argv, ({"ACCELERATE_USE_CPU": "true"} if cpu else {})
