"""Launch: ranks as launchers set them, launch errors, the one `accelerate launch` command line, and a
launch's output on its way to the user (LaunchOutput: each rank's error once, torch's tracebacks only when news).

Torch-free at import, so that `bnbench --help` stays instant. Sweeps (sweep.py) and the
main job (main_job.py) build their multi-process launches with accelerate_command, and nothing else does.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time

from ..faults import LOST_PEER, LOST_PEER_TEXT

SWEEP_CHILD_ENV = "BNBENCH_SWEEP_CHILD"  # set by a sweep in the processes of its units
MACHINE_OPTIONS = ("--machine_rank", "--main_process_ip", "--main_process_port")  # accelerate launch's own
LAUNCH_ENV = "BNBENCH_LAUNCH"  # the main job's --nproc and --num_machines, as each machine was started


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


def launched_as_started() -> bool:
    """Whether the launch has the processes this machine's ./launch.sh options make (always true without
    ./launch.sh). Machines started with other --nproc or --num_machines make a world none of them asked for."""
    m = re.fullmatch(r"--nproc (\d+) --num_machines (\d+)", os.environ.get(LAUNCH_ENV, ""))
    return m is None or int(m.group(1)) * int(m.group(2)) == launched_world()


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


# -- a launch's output on its way to the user --------------------------------------------------------
_RANK_PREFIX = re.compile(r"\[rank\d+\]: ?")  # torch's prefix on an uncaught exception's lines in a rank
_OUR_ERROR = re.compile(r"bnbench(?: \[rank \d+\])?: error: (.*)")
_OUR_END = re.compile(r"bnbench \[rank \d+\]: (terminated|interrupted)\b")  # the launcher says it once
_LOG = re.compile(r"\[?([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ ")  # torch's glog-style lines (Python's and C++'s)
_FAILING = re.compile(r"signal|retrying|failed|timed out|error", re.IGNORECASE)
# Where a traceback starts: Python's, and C++'s (c10::Error's backtrace).
_TRACEBACK = ("Traceback (most recent call last):", "Exception raised from ")
# An exception's line: its class by the usual suffixes, and the common ones without (a warning raised as an
# error, torch.compile's failures, StopIteration).
_EXCEPTION = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning|Failed)|Unsupported|"
                        r"StopIteration|StopAsyncIteration)(?::|$)(.*)")
# A lost peer restates bnbench's own line only as the collective's error; any other exception that mentions a
# reset connection (a tracker's upload, say) is news.
_LOST_PEER_KINDS = {"RuntimeError", "DistBackendError", "DistNetworkError"}
# Exceptions that only restate a failure bnbench names in its own line: torch-elastic's summary of failed
# ranks, its agent's rendezvous and signal errors (and, by their text, a peer gone: LOST_PEER_TEXT).
_RESTATING = {"ChildFailedError", "SignalException", "DistNetworkError", "DistStoreError", "DistError",
              "RendezvousTimeoutError", "RendezvousClosedError", "RendezvousConnectionError", "KeyboardInterrupt"}


class LaunchOutput:
    """A launch's stderr (the launcher's and, through it, its ranks') on its way to ours.

    Everything passes as it comes, a progress bar's redraws included, except what a failed launch piles
    around bnbench's own lines: tracebacks (Python's and C++'s), torch's failure logs, every rank repeating
    one error. Each error of the ranks is shown once, as it comes (`bnbench: error: ...`, its other lines
    after it; a lost peer at the end, where no rank refused); the rest is held, then dropped if the launch fails in a way bnbench names (`end`), else
    shown: an unknown failure is never hidden. A held traceback that the launch outlives by HOLD_S, still
    drawing its progress bar or printing other lines, with no rank's error, is shown then.
    """

    HOLD_S = 20.0

    def __init__(self, write):
        self.write = write
        self.lock = threading.Lock()
        self.pending = ""  # the current line's text not yet written
        self.started = ""  # the current line's beginning, written: its rest follows as it is
        self.in_traceback = False
        self.held: list[str] = []
        self.held_since: float | None = None
        self.alive_at: float | None = None  # when the launch last showed it goes on: a line through, a bar's update
        self.errors: dict[str, list[str]] = {}  # the ranks' error messages, in order: the lines that followed each
        self.following: list[str] | None = None  # the lines after the error shown last
        self.repeat: tuple[list[str], int] | None = None  # another rank's copy of a shown error: its lines to skip
        self.notes: list[str] = []  # lines a diagnosis reads (errors, exit codes)
        self.lost = ""  # the first rank's line that it lost a peer

    # -- the stream
    def feed(self, text: str) -> None:
        with self.lock:
            self.pending += text
            while (m := re.search(r"[\r\n]", self.pending)) is not None:
                line, end = self.pending[:m.start()], m.group()
                self.pending = self.pending[m.end():]
                self._line(line, end)
            # A bar's update, or a line that cannot be held, goes now, not at its end (unless it may be part
            # of another rank's copy of an error).
            if (self.pending and not self.in_traceback and self.repeat is None
                    and (self.started or not _may_be_held(self.pending))):
                self._pass(self.pending)
                self.started += self.pending
                self.pending = ""

    def tick(self, now: float | None = None) -> None:
        """Called while the launch runs: what was held is shown once the launch has gone on past it for HOLD_S."""
        with self.lock:
            now = time.monotonic() if now is None else now
            if (self.held and not self.errors and self.alive_at is not None and self.alive_at >= self.held_since
                    and now - self.held_since > self.HOLD_S):
                self._release()

    def _pass(self, text: str) -> None:
        self.write(text)
        self.alive_at = time.monotonic()

    def _hold(self, text: str) -> None:
        if not self.held:
            self.held_since = time.monotonic()
        self.held.append(text)

    def _line(self, line: str, end: str) -> None:
        glued = line.find("bnbench [rank ", 1)
        if glued > 0:  # two ranks' lines run into one (a writer whose newline came apart): take them one by one
            self._line(line[:glued], "\n")
            self._line(line[glued:], end)
            return
        started, self.started = self.started, ""
        if started:  # its beginning is out (a bar's last update): the rest goes too, unless a traceback starts in it
            at = min((i for i in (line.find(t) for t in _TRACEBACK) if i >= 0), default=-1)
            if at < 0:
                self._pass(line + end)
                if self.following is not None:
                    self.following.append(started + line)
                return
            self._pass(line[:at] + "\n")
            line = line[at:]
        if "rror" in line or "exitcode" in line or "EADDRINUSE" in line:
            self.notes.append(line)
        ours = _OUR_ERROR.match(line)
        if ours is not None:
            message = ours.group(1)
            if message in self.errors:  # another rank's copy: skip it, and its lines as far as they are the same
                self.repeat, self.following = (self.errors[message], 0), None
                return
            self.errors[message] = self.following = []
            self.repeat = None
            if message.startswith(LOST_PEER):  # said at the end, unless a rank refused: then it was the refusal's doing
                self.lost = self.lost or f"bnbench: error: {message}\n"
            else:
                self._pass(f"bnbench: error: {message}{end or chr(10)}")
            return
        if self.repeat is not None:
            lines, at = self.repeat
            self.repeat = (lines, at + 1) if at < len(lines) and lines[at] == line else None
            if self.repeat is not None:
                return
        bare = _RANK_PREFIX.sub("", line, count=1)
        if bare.startswith(_TRACEBACK):  # (a rank's prefix alone is no traceback: torch prefixes its warnings too)
            self.in_traceback = bare.startswith(_TRACEBACK[0]) and "python" or "c++"
        log = _LOG.match(line)
        if self.in_traceback or _OUR_END.match(line) or (
                log and (log.group(1) in "EF" or self.errors or self.held or _FAILING.search(line))):
            self.following = None
            self._hold(line + end)
            # A Python traceback ends at its exception's line: what follows is the launch's own output again
            # (except after torch-elastic's ChildFailedError, whose summary of the failed ranks follows it).
            if self.in_traceback == "python" and (m := _EXCEPTION.match(bare.rstrip("\r\n"))) and m.group(1) != "ChildFailedError":
                self.in_traceback = False
            if end == "\r":  # a bar's update: the launch goes on
                self.alive_at = time.monotonic()
            return
        if self.following is not None:
            self.following.append(line)
        self._pass(line + end)

    def _release(self) -> None:
        self.write("".join(self.held))
        self.held, self.held_since, self.in_traceback = [], None, False

    # -- the diagnosis, once the launch has ended
    def unknown(self) -> list[str]:
        """The held exceptions that say something bnbench's lines do not (anything but the restating kinds)."""
        found = []
        for line in self.held:
            bare = _RANK_PREFIX.sub("", line, count=1).rstrip("\r\n")
            m = _EXCEPTION.match(bare)
            if m is None:
                continue
            kind, rest = m.groups()
            if kind in _RESTATING or (kind in _LOST_PEER_KINDS and any(t in rest for t in LOST_PEER_TEXT)):
                continue
            found.append(bare)
        return found

    def exit_codes(self) -> list[int]:
        """The failed ranks' exit codes, as torch-elastic's summary lists them."""
        return [int(m.group(1)) for line in self.notes if (m := re.search(r"exitcode\s*:\s*(-?\d+)", line))]

    def end(self, explained: bool) -> list[str]:
        """After the launch: drop what was held when `explained` and nothing unknown is in it, else show it.
        Returns the unknown exceptions held."""
        with self.lock:
            if self.pending:
                self._line(self.pending, "")
                self.pending = ""
            unknown = self.unknown()
            if self.lost and all(m.startswith(LOST_PEER) for m in self.errors):
                self.write(self.lost)
            if self.held and not (explained and not unknown):
                self._release()
            self.held, self.in_traceback = [], False
            return unknown


def _may_be_held(partial: str) -> bool:
    """Whether an unfinished line may turn out to be one that is held or rewritten (so wait for its end)."""
    starts = ("Traceback", "Exception raised", "bnbench", "[rank")
    return (any(s.startswith(partial) or partial.startswith(s) for s in starts)
            or re.match(r"\[?[IWEF]\d{0,4}( |$)", partial) is not None)
