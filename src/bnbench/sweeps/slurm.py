"""The SLURM executor: a sweep's units as SLURM jobs through submitit; the sweep collects their rows.

    bnbench sweep my.toml --executor slurm    # or [sweep] executor = "slurm"; [slurm] says where and how much

Every unit not done is submitted: one job array per invocation (one per resource shape, nproc x device,
where a sweep mixes them), at most [slurm] array_parallelism jobs at once. A job runs its unit as
`bnbench run --out DIR/jobs/<unit id>/<job id>/`: a results folder of its own, so that no two jobs (on
nodes sharing a network filesystem) ever append to one file. The sweep, the folder's single writer
(it holds DIR/.lock), moves each finished unit's rows into results.jsonl in one append as units finish,
and records in units.jsonl, beside the local executor's events:
    submitted  {job_id, tasks, log}: the job is SLURM's now. Killing the sweep (even -9) leaves it running;
               a rerun of the same command adopts it by this id instead of submitting the unit twice,
               and collects what finished while no sweep watched.
    done / failed  {job_id; failed: SLURM's state and reason, the unit's own error, the log}. A failed,
               cancelled or timed-out job is a failed unit; a rerun submits it again.
DIR/jobs/submitit/  submitit's pickles, sbatch files and the jobs' logs (<job id>_<task>_log.err/.out)

Job states, with or without slurmdbd: sacct needs the accounting daemon; without it submitit warns
"Bypassing sacct error" and sees every job as UNKNOWN for ever, so a cancelled job would be waited for
endlessly. States here come from what every cluster has: submitit's result pickles (the job's own end,
success or its error), `squeue -t all` for queued and running jobs and for ended ones SLURM still
remembers (MinJobAge, 300 s by default) with their state (CANCELLED, TIMEOUT, ...) and reason, and
sacct only for a job squeue has forgotten, where slurmdbd runs. A job found nowhere that left no result
ended unseen (cancelled or killed while no sweep watched): a failed unit.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import ConfigError, run_argv
from ..store.folder import INSTRUMENTS_FILE, META_FILE, RESULTS_FILE, end_torn_line
from ..dist.launch import SWEEP_CHILD_ENV, accelerate_command, failure_cause
from ..store.record import update_meta
from ..store.results import append_lines, done_units, read_events, read_jsonl, rows_of_unit

JOBS_DIR = "jobs"
PROGRAMS = ("sbatch", "squeue", "sinfo", "srun")  # submitit's executor needs srun too
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
LIVE = QUEUED | {"CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}
POLL_S = 1.0
# A job whose result is on disk while SLURM still lists it as running: wait this long for SLURM's final
# state (a scancel'd job's unit ends with its own error first); a job gone from squeue without a result
# pickle: look again for this long (a result in flight over a network filesystem) before calling it failed.
SETTLE_S = 30.0
DEFAULT_TIME_MIN = 60


def check_cluster(conf: dict) -> None:
    """SLURM's commands are here, its controller answers, and the partition exists: before any job."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        raise ConfigError(f"--executor slurm needs SLURM's client commands; {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not on PATH: run "
                          f"the sweep on a machine of the cluster (a login node), or install them (Debian: apt-get install "
                          f"slurm-client); --executor local runs the units here")
    p = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise ConfigError(f"sinfo failed (exit status {p.returncode}): {p.stderr.strip() or p.stdout.strip()}: "
                          f"is the SLURM controller up, and SLURM_CONF right?")
    partitions = [x.strip() for x in p.stdout.split()]
    names = [x.rstrip("*") for x in partitions]
    want = conf.get("partition")
    if want is not None and want not in names:
        raise ConfigError(f"slurm.partition: no partition {want!r} on this cluster; partitions: "
                          f"{', '.join(partitions) or 'none'} (* the default); sinfo lists them")
    if want is None and not any(x.endswith("*") for x in partitions):
        raise ConfigError(f"this cluster has no default partition: set [slurm] partition to one of {', '.join(names)}")


def home_device(conf: dict) -> str:
    """What device "auto" means for units run on the cluster's nodes."""
    return "cuda" if conf.get("gpus_per_node") else "cpu"


def resources(unit, conf: dict) -> dict:
    """submitit's parameters for the job of one unit.

    On CPUs: one node, one task that runs the unit exactly as the local executor does (`bnbench run`,
    or `accelerate launch` of nproc gloo ranks over localhost), with nproc x cpus_per_task CPUs: the
    same launcher, environment and rendezvous, so the same rows. On GPUs: ceil(nproc / gpus_per_node)
    nodes, one task per node running `accelerate launch` of that node's ranks, machine rank and main
    address taken from the job (submitit's JobEnvironment and TorchDistributedEnvironment).
    """
    cpus = conf.get("cpus_per_task", 1)
    if unit.device == "cpu":
        return {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": unit.nproc * cpus}
    gpus = conf.get("gpus_per_node", 0)
    if not gpus:
        raise ConfigError("device cuda on SLURM: set [slurm] gpus_per_node (GPUs each node gives a job)")
    nodes = -(-unit.nproc // gpus)
    if unit.nproc % nodes:
        raise ConfigError(f"nproc {unit.nproc} does not split evenly over the {nodes} nodes of {gpus} GPUs it needs: "
                          f"use a multiple of {nodes}")
    per_node = unit.nproc // nodes
    return {"nodes": nodes, "tasks_per_node": 1, "gpus_per_node": per_node, "cpus_per_task": per_node * cpus}


def job_parameters(conf: dict, shape: dict) -> dict:
    """submitit's parameters for a job array of one resource shape (`resources`): every value here reaches the
    job script as an #SBATCH line, checked first (plan.py: _check_slurm refuses control characters)."""
    return {"name": "bnbench", "timeout_min": conf.get("time_min", DEFAULT_TIME_MIN),
            "slurm_array_parallelism": conf.get("array_parallelism", 256),
            **({"slurm_partition": conf["partition"]} if "partition" in conf else {}),
            **({"slurm_account": conf["account"]} if "account" in conf else {}),
            **({"mem_gb": conf["mem_gb"]} if "mem_gb" in conf else {}),
            **({"slurm_additional_parameters": dict(conf["additional"])} if conf.get("additional") else {}),
            **shape}


@dataclass
class UnitJob:
    """What a job runs (submitit pickles it; the job's python is the sweep's): one unit, as `bnbench run`."""
    jobs: str  # DIR/jobs
    unit: str
    nproc: int
    cpu: bool
    run_args: list
    env: dict = field(default_factory=dict)
    timeout: float = 600.0

    def __call__(self) -> str:
        import submitit

        job = submitit.JobEnvironment()
        out = Path(self.jobs) / self.unit / job.job_id
        run = ["--out", str(out), *self.run_args]
        env = {**os.environ, **self.env, SWEEP_CHILD_ENV: "1"}  # the unit dies with this task, even by -9
        if self.nproc == 1:
            cmd = [sys.executable, "-m", "bnbench", "run", *run]
        else:
            machines, machine_args = job.num_nodes, []
            if machines > 1:
                dist = submitit.helpers.TorchDistributedEnvironment()  # node 0's host; a port from the job id
                machine_args = ["--machine_rank", str(job.node), "--main_process_ip", dist.master_addr,
                                "--main_process_port", str(dist.master_port)]
            cmd, extra = accelerate_command(self.nproc, run, machines, cpu=self.cpu, machine_args=machine_args,
                                            gpus=self.nproc // machines, timeout=self.timeout)
            env.update(extra)
        print(" ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            status = proc.wait()
        except BaseException:  # submitit's time-out signal: tell the unit, as a launcher tells its ranks
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if status != 0:
            raise RuntimeError(f"bnbench run exited with status {status}")
        return str(out)


def queue() -> dict[str, tuple[str, str]] | None:
    """{job id: (STATE, reason)} of this user's jobs that SLURM knows, ended ones too while it remembers
    them; None when squeue is missing or fails (nothing is known then, and nothing is concluded)."""
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    jobs = {}
    for line in p.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        jobs[job_id.strip()] = (state.strip(), "" if reason.strip() in ("None", "(null)") else reason.strip())
    return jobs


def accounted(job_id: str) -> tuple[str, str] | None:
    """(STATE, reason) from sacct, for a job squeue has forgotten; None without slurmdbd."""
    try:
        p = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,Reason"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in p.stdout.splitlines() if p.returncode == 0 else []:
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        if jid == job_id and state:
            return state.split()[0], "" if reason in ("None", "") else reason
    return None


def shown(out: Path, unit, event: dict, jobs: dict | None, sweeping: bool) -> tuple[str, str, int]:
    """(state, detail, epochs recorded) of a submitted unit, for `bnbench status`."""
    job = event.get("job_id", "?")
    rows = rows_of_unit(Path(out) / JOBS_DIR / unit.id / job, unit.id)
    epochs = int(max((r.get("epoch", 0) for r in rows), default=0))
    if jobs is None:
        return "submitted", f"job {job} (no squeue here to ask SLURM its state)", epochs
    state, reason = jobs.get(job, (None, ""))
    if state in QUEUED:
        return "queued", f"job {job}{f' ({reason})' if reason else ''}", epochs
    if state in LIVE:
        return "running", f"job {job}", epochs
    then = "the sweep collects it" if sweeping else "rerun the sweep to collect it"
    return "ended", f"job {job} ended ({state or 'no longer in the queue'}): {then}", epochs


@dataclass
class Watch:
    unit: object
    job: object  # submitit.SlurmJob
    state: str = ""  # last shown
    since: float | None = None  # when it first looked ended without a result, or finished while SLURM still ran it


class SlurmUnits:
    """Submits the units of a sweep to SLURM, or adopts their recorded jobs, and collects each as it ends."""

    def __init__(self, out: Path, conf: dict, runner, progress):
        self.out, self.conf, self.runner, self.progress = out, conf, runner, progress
        self.jobs = out.resolve() / JOBS_DIR  # the jobs may start in another directory
        self.folder = self.jobs / "submitit"

    def run(self, units: list) -> dict[str, str]:
        """{unit id: done / diverged / failed} for every unit; KeyboardInterrupt passes through, jobs running."""
        import submitit

        outcome, watch, new = {}, {}, []
        events, _ = read_events(self.out)
        for u in units:
            last = events.get(u.id, {})
            if u.error is not None:
                outcome[u.id] = self._end(u, "failed", u.error)
            elif last.get("event") == "submitted" and last.get("job_id"):
                job = submitit.SlurmJob(folder=self.folder, job_id=last["job_id"], tasks=range(last.get("tasks", 1)))
                watch[u.id] = Watch(u, job)
                self._say(f"unit {u.index} {u.label}: job {job.job_id}, submitted {last['time']}: waiting for it")
            else:
                new.append(u)
        watch.update(self._submit(new, outcome))
        self.results = os.open(self.out / RESULTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while watch:
                jobs = queue()
                for uid, w in list(watch.items()):
                    verdict = self._verdict(w, jobs)
                    if verdict is not None:
                        outcome[uid] = verdict
                        del watch[uid]
                if watch:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            ids = " ".join(w.job.job_id for w in watch.values())
            self.progress.say(f"bnbench: {len(watch)} jobs keep running in SLURM ({ids}): rerun the sweep to collect "
                              f"them, or scancel them")
            raise
        finally:
            os.close(self.results)
        return outcome

    def _say(self, text: str) -> None:
        if self.progress.mode != "quiet":
            self.progress.say(text)

    def _end(self, unit, state: str, detail: str, **event) -> str:
        recorded = "failed" if state == "failed" else "done"
        self.runner.record(unit, recorded, **({"reason": detail} if state == "failed" else {}), **event)
        p = self.progress
        p.n += 1
        p.head = f"[{p.n}/{p.total}] unit {unit.index} {unit.label}"
        p.end(state, detail if state == "failed" else f"job {event.get('job_id')}")
        return state

    def _submit(self, units: list, outcome: dict) -> dict:
        """Submit units, one array per resource shape; record each job id as soon as sbatch gives it."""
        import submitit

        if not units:
            return {}
        shapes: dict[tuple, list] = {}
        for u in units:
            try:
                shapes.setdefault(tuple(sorted(resources(u, self.conf).items())), []).append(u)
            except ConfigError as e:
                outcome[u.id] = self._end(u, "failed", str(e))
        executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
        env = {"BNBENCH_DATA_ROOT": str(self.runner.data_root)} if self.runner.data_root else {}
        trackers = ["--log-with", ",".join(self.runner.trackers)] if self.runner.trackers else []
        watch = {}
        for shape, group in shapes.items():
            executor.update_parameters(**job_parameters(self.conf, dict(shape)))
            try:
                with executor.batch():
                    jobs = [executor.submit(UnitJob(str(self.jobs), u.id, u.nproc, u.device == "cpu",
                                                    ["--quiet", "--dist-timeout", str(self.runner.timeout),
                                                     *run_argv(u.config), *trackers], env, self.runner.timeout))
                            for u in group]
            except Exception as e:  # sbatch's refusal (account, limits, ...), in its own words
                raise ConfigError(f"sbatch refused the jobs of {len(group)} units: {str(e).strip()[-1500:]}") from None
            for u, job in zip(group, jobs):
                self.runner.record(u, "submitted", job_id=job.job_id, tasks=job.num_tasks, nproc=u.nproc,
                                   device=u.device, log=str(self._log(job)))
                watch[u.id] = Watch(u, job)
            first = jobs[0].job_id.split("_")[0]
            self._say(f"bnbench: {len(group)} units ({group[0].nproc} x {group[0].device}) submitted to SLURM as "
                      f"{'job array ' if len(jobs) > 1 else 'job '}{first}; logs in {self.folder}")
        return watch

    def _verdict(self, w: Watch, jobs: dict | None) -> str | None:
        """The unit's outcome once its job has ended (collected or failed), else None."""
        job, now = w.job, time.monotonic()
        state, reason = (jobs or {}).get(job.job_id, (None, ""))
        if state in LIVE:
            shown_state = "queued" if state in QUEUED else "running"
            if shown_state != w.state:
                w.state = shown_state
                self._say(f"unit {w.unit.index} {w.unit.label}: {shown_state} (job {job.job_id})")
        if all(job.task(k).paths.result_pickle.exists() for k in range(job.num_tasks)):
            error = job.exception()  # the result pickles are there: no waiting, no sacct
            if error is None:
                return self._collect(w)
            if state in LIVE and (w.since is None or now - w.since < SETTLE_S):
                w.since = w.since or now  # a scancel'd job: its unit's error comes before SLURM's end
                return None
            return self._failed(w, state, reason, result=True)
        if state in LIVE:
            return None
        if state is None and jobs is None:
            return None  # squeue did not answer: nothing is concluded
        if state is None or state == "COMPLETED":
            if w.since is None or now - w.since < SETTLE_S:
                w.since = w.since or now
                return None
            if state is None:
                state, reason = accounted(job.job_id) or (None, "")
        return self._failed(w, state, reason, result=False)

    def _log(self, job) -> Path:
        return job.task(0).paths.stderr

    def _failed(self, w: Watch, state: str | None, reason: str, result: bool) -> str:
        """result: the job's own error is in its result pickle; else the job ended without a word."""
        job = w.job
        log = self._log(job)
        cause = failure_cause(log.read_text(errors="replace")) if log.exists() else "no log"
        if state is None and not result:
            how = (f"SLURM job {job.job_id} is gone from the queue without a result (cancelled or killed while no sweep "
                   f"watched, and SLURM no longer remembers it; sacct would know where slurmdbd runs)")
        else:
            how = (f"SLURM job {job.job_id} {state or 'ended'}{f' ({reason})' if reason else ''}"
                   f"{'' if result else ' without a result'}")
        return self._end(w.unit, "failed", f"{how}: {cause} (log: {log})", job_id=job.job_id, slurm_state=state or "unknown")

    def _collect(self, w: Watch) -> str:
        """Move a finished job's whole unit into the sweep's folder: instruments, the run's record, then its rows
        in one append (the rows decide `done`: a crash in between leaves a unit that a rerun collects again)."""
        unit, job = w.unit, w.job
        folder = self.jobs / unit.id / job.job_id
        rows = rows_of_unit(folder, unit.id)
        done = done_units(pd.DataFrame(rows), [unit]).get(unit.id)
        if done is None:
            return self._end(unit, "failed", f"job {job.job_id} ended without writing all its rows under its unit id "
                             f"(a bnbench bug: please report it) (folder: {folder}; log: {self._log(job)})",
                             job_id=job.job_id)
        run_id = done["run_id"]
        if (folder / INSTRUMENTS_FILE).exists():
            extra = [r for r in read_jsonl(folder / INSTRUMENTS_FILE)[0] if r.get("run_id") == run_id]
            fd = os.open(self.out / INSTRUMENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                end_torn_line(fd, self.out / INSTRUMENTS_FILE)
                if extra:
                    append_lines(fd, extra, self.out / INSTRUMENTS_FILE)
            finally:
                os.close(fd)
        try:
            meta = json.loads((folder / META_FILE).read_text())["runs"][run_id]
        except (OSError, ValueError, KeyError, TypeError):
            meta = {}
        update_meta(self.out, run_id, {**meta, "slurm_job": job.job_id, "slurm_folder": str(folder)})
        append_lines(self.results, [r for r in rows if r.get("run_id") == run_id], self.out / RESULTS_FILE)
        state = "diverged" if done["all_diverged"] else "done"
        return self._end(unit, state, "", job_id=job.job_id, run_id=run_id, diverged_members=done["diverged"])

