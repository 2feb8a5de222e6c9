"""A one-node SLURM 22.05 cluster for the tests: munged, slurmctld and slurmd, started here as root.

Installs nothing: `./launch.sh test` (as root) installs Debian's slurmctld, slurmd, slurm-client and
munge. Everything of the cluster but munge's key and socket lives in one temp folder with its own
slurm.conf, passed to every SLURM command by SLURM_CONF; the daemons are stopped by PID.
    with Cluster(tmp_folder) as cluster:
        env = cluster.env()          # os.environ + SLURM_CONF, for subprocesses
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scancel", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """What the machine lacks for a test cluster, and how to get it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    # slurmd drains a node that has less memory than declared: declare half of what it has.
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 // 2
    return 1024


class Cluster:
    def __init__(self, folder: Path, cpus: int = 2):
        self.dir = Path(folder)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.dir / "slurm.conf"

    def env(self, **extra) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def check(self) -> None:
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if missing or os.geteuid() != 0:
            raise ClusterUnavailable(
                f"the SLURM tests start a one-node cluster as root and need Debian's slurmctld, slurmd, slurm-client "
                f"and munge ({'missing: ' + ', '.join(missing) if missing else 'not root'}): run `./launch.sh test` as root, "
                f"which installs them")

    def _munge(self) -> None:
        """munged as the munge user, with its key; an already running one (its socket answers) is kept."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(128))
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
        for d in (MUNGE_SOCKET_DIR, Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, munge.pw_uid, munge.pw_gid)
        log = open(self.dir / "munged.log", "ab")
        self.procs.append(subprocess.Popen(["munged", "--foreground", "--force"], user="munge", group="munge",
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        self._wait(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                   10, "munged to answer", self.dir / "munged.log")

    def write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=bnbench
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Schedule on every submission and every job end, not on a timer: a freed CPU is reused in well under a second.
SchedulerType=sched/builtin
SchedulerParameters=sched_min_interval=100000
# Ended jobs stay in squeue (with their state and reason) this long: long enough for a sweep polling every
# second to read a cancellation, short enough that the tests also meet jobs SLURM has forgotten.
MinJobAge=60
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> Cluster:
        self.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._munge()
        self.write_conf()
        env = self.env()
        for name, argv in (("slurmctld", ["slurmctld", "-D", "-c", "-i"]), ("slurmd", ["slurmd", "-D", "-c"])):
            out = open(self.dir / f"{name}.out", "ab")
            self.procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            if name == "slurmctld":
                self._wait(lambda: self.sinfo() is not None, 30, "slurmctld to answer", self.dir / "slurmctld.log")
        self._wait(lambda: (self.sinfo() or "").strip() == "idle", 60, "the node to be idle", self.dir / "slurmd.log")
        return self

    def sinfo(self) -> str | None:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True, text=True)
        return p.stdout if p.returncode == 0 else None

    def squeue(self) -> list[str]:
        """Every job SLURM knows, ended ones too: 'ID STATE REASON' lines."""
        p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T %r"], env=self.env(), capture_output=True,
                           text=True, check=True)
        return p.stdout.split("\n")[:-1]

    def _wait(self, ready, seconds: float, what: str, log: Path) -> None:
        until = time.monotonic() + seconds
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > until:
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                self.stop()
                raise ClusterUnavailable(f"waited for {what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}; "
                                         f"{log}:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, then a munged of ours
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
