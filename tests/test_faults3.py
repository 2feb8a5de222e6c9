"""Faults from issue 29, items 4-17: values that reach a job script, duplicate units, errors a launcher can
catch before any process starts, huge numbers, output-path mistakes, impossible metric values, and the low
items (machine options, signals to launch.sh, a closed pipe, debris after a refused command, status of plain
runs, [slurm] and TOML checks, --eval-batch's effect). Most are in-process: cli.main / main_job.main with
capsys; a launcher that would start a process is replaced by one that fails the test."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types

import pytest

from bnbench import cli, main_job
from bnbench.config import ConfigError
from bnbench.dist.launch import LaunchOutput
from bnbench.faults import LOST_PEER
from bnbench.store.results import ResultsWriter, read_results
from bnbench.sweeps.plan import load_sweep, plan

from conftest import REPO
from test_faults import bnbench, in_process, rows, write


def toml(tmp_path, text: str, name: str = "s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def no_process(monkeypatch):
    """main_job's launcher: any process started fails the test (the checks must come first)."""
    def popen(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0][:6]}")

    monkeypatch.setattr(main_job.subprocess, "Popen", popen)


def launch(*argv, capsys) -> tuple[int, str, str]:
    """./launch.sh's main job, in this process."""
    return in_process(main_job.main, *argv, capsys=capsys)


def refused(*argv, capsys) -> str:
    """The one error line of a command refused with exit status 2 (argparse's or bnbench's own)."""
    try:
        rc, out, err = bnbench(*argv, capsys=capsys)
    except SystemExit as e:
        rc, (out, err) = e.code, capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 4: values that reach a job script ----------------------------------------------------------------
CONTROL = "holds the control character"
HOSTILE = [
    ("account = \"proj'\\ntouch pwned #\"", "slurm.account", CONTROL),
    ("partition = \"debug\\rx\"", "slurm.partition", CONTROL),
    ("additional = { qos = \"high\\ntouch pwned\" }", "slurm.additional.qos", CONTROL),
    ("additional = { \"qos\\ntouch pwned #\" = \"high\" }", "slurm.additional", "is not an sbatch option's name"),
    ("additional = { mail-user = \"a@b\\u2028c\" }", "slurm.additional.mail-user", CONTROL),
]


@pytest.mark.parametrize("line, key, why", HOSTILE)
def test_a_slurm_string_with_a_control_character_is_refused_naming_its_key(tmp_path, capsys, line, key, why):
    path = toml(tmp_path, f"[sweep]\nexecutor = \"slurm\"\n[slurm]\n{line}\n[fixed]\nepochs = 1\n")
    error = refused("sweep", path, "--dry-run", "--out", tmp_path / "o", capsys=capsys)
    assert error.startswith(f"bnbench: error: {key}: ") and why in error, error
    assert not (tmp_path / "o").exists()


def test_a_results_folder_whose_path_holds_a_newline_is_refused_for_slurm(tmp_path, capsys):
    path = toml(tmp_path, "[sweep]\nexecutor = \"slurm\"\nout = \"runs/a\\nb\"\n")
    error = refused("sweep", path, capsys=capsys)
    assert error.startswith("bnbench: error: sweep.out:") and "control character" in error


def test_the_sbatch_script_holds_every_value_on_its_own_sbatch_line(tmp_path):
    """The job script as submitit writes it (no SLURM needed): every [slurm] value on one #SBATCH line of
    its own, quoted; nothing but #SBATCH lines among the parameters. Hostile values never get this far."""
    import submitit

    from bnbench.sweeps.slurm import job_parameters, resources

    text = ("[slurm]\npartition = \"debug\"\naccount = \"proj'x y\"\ntime_min = 7\nmem_gb = 1.5\ncpus_per_task = 2\n"
            "additional = { qos = \"high\", mail-user = \"a@b.c\", exclusive = true, comment = \"$(touch pwned) #x\" }\n")
    conf = load_sweep(toml(tmp_path, text)).slurm
    unit = types.SimpleNamespace(device="cpu", nproc=2)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**job_parameters(conf, resources(unit, conf)))
    script = executor._executor._make_submission_file_text("python -m bnbench run", "uid")
    lines = script.splitlines()
    params = lines[lines.index("# Parameters") + 1:lines.index("# command") - 1]
    assert params and all(x.startswith("#SBATCH --") for x in params), script
    want = {"partition": "debug", "account": "proj'x y", "time": "7", "mem": "1536MB", "cpus-per-task": "4",
            "qos": "high", "mail-user": "a@b.c", "comment": "$(touch pwned) #x", "job-name": "bnbench"}
    for key, value in want.items():
        assert lines.count(f"#SBATCH --{key}={shlex.quote(value)}") == 1, (key, script)
    assert "#SBATCH --exclusive" in lines
    for line, _, why in HOSTILE:  # and what would have broken a line out is refused before any script
        with pytest.raises(ConfigError, match=why):
            load_sweep(toml(tmp_path, f"[slurm]\n{line}\n", "h.toml"))


# -- 5: duplicate units ---------------------------------------------------------------------------
def test_grid_points_that_make_one_unit_run_once(tmp_path, capsys, data_root, monkeypatch):
    path = toml(tmp_path, "[fixed]\nepochs = 1\nseeds = [0]\nbatch_size = 6000\n"
                          "[grid]\nlr = [0.01, 0.01]\ndevice = [\"auto\", \"cpu\"]\n")
    units = plan(load_sweep(path), cuda_available=False)
    assert len(units) == 1 and len({u.id for u in units}) == 1
    assert units[0].same == ["grid point 2 (lr=0.01 device=cpu)", "grid point 3 (lr=0.01 device=auto)",
                             "grid point 4 (lr=0.01 device=cpu)"]
    monkeypatch.setattr("bnbench.sweeps.runner._cuda_count", lambda: 0)  # "auto" is the CPU here
    rc, out, err = bnbench("sweep", path, "--dry-run", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 0 and ": 1 units (dry run" in out
    assert "unit 1 (lr=0.01 device=auto) is also grid point 2 (lr=0.01 device=cpu), grid point 3" in out, out
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    rc, out, err = bnbench("sweep", path, "--out", tmp_path / "o", "--quiet", capsys=capsys)
    assert rc == 0 and "1 of 1 units done (1 now)" in out, out + err
    df, problems = read_results(tmp_path / "o")
    assert len(df) == 2 and not problems  # bn and nobn of seed 0, epoch 1, once
    rc, out, err = bnbench("status", tmp_path / "o", capsys=capsys)
    assert "1 units; 1 done" in out, out


# -- 6: what the ranks would refuse, refused before any process starts --------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2", "--cpu", "--dp", "2", "--per-device-batch", "30001"], "global batch 60002 exceeds the 60000"),
    (["--nproc", "2", "--cpu", "--dp", "2", "--batch-size", "2"], "BatchNorm needs at least 2 samples per batch; it would see 1"),
    (["--nproc", "2", "--cpu", "--instrument"], "--instrument measures in one process; this launch has 2"),
])
def test_the_launcher_refuses_what_a_rank_would_before_any_process(tmp_path, capsys, no_process, argv, message):
    rc, out, err = launch(*argv, "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and err.startswith("bnbench: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_the_launchers_check_and_the_trainers_agree_on_what_reads_batch_statistics():
    from bnbench.dist.layout import BATCH_STATISTICS
    from bnbench.train.norms import BATCH_NORMS

    assert set(BATCH_STATISTICS) == set(BATCH_NORMS)


def test_a_sweep_plans_such_units_invalid(tmp_path, capsys):
    path = toml(tmp_path, "[fixed]\nepochs = 1\nseeds = [0]\ndevice = \"cpu\"\n[grid]\ncase = [\n"
                          "  { nproc = 2, dp = 2, batch_size = 2 },\n  { nproc = 2, instrument = true },\n"
                          "  { nproc = 2, dp = 2, per_device_batch = 30001 },\n  { nproc = 2, dp = 2 },\n]\n")
    units = plan(load_sweep(path), cuda_available=False)
    assert [u.error is None for u in units] == [False, False, False, True]
    rc, out, err = bnbench("sweep", path, "--dry-run", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 0 and out.count(" failed ") == 3 and "BatchNorm needs at least 2 samples" in out
    assert "--instrument measures in one process" in out and "global batch 60002 exceeds" in out


# -- 7: huge and infinite numbers ------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--seeds", "18446744073709551616"], "seed 18446744073709551616 is above 9223372036854775807"),
    (["--seeds", "0-10000000000"], "10,000,000,001 seeds, more than the 2,000,000"),
    (["--seeds", "1" * 5000], "a seed of 5,000 digits is above"),
    (["--epochs", "99999999999"], "epochs must be at most 1,000,000, got 99,999,999,999"),
    (["--epochs", "100000", "--eval-every", "1"], "evaluations, more than 100,000"),
    (["--dist-timeout", "1e300"], "--dist-timeout: must be at most 604,800 seconds"),
    (["--dist-timeout", "inf"], "--dist-timeout: must be a positive finite number"),
])
def test_huge_numbers_are_one_line_where_parsed(tmp_path, capsys, argv, message):
    error = refused("run", "--cpu", *argv, "--out", tmp_path / "o", capsys=capsys)
    assert message in error, error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, message", [
    ("[sweep]\ndist_timeout = inf\n", "sweep.dist_timeout: expected a finite number, got inf"),
    ("[sweep]\ndist_timeout = 1e300\n", "sweep.dist_timeout: at most 604,800 seconds"),
    ("[fixed]\nseeds = \"0-10000000000\"\n", "fixed.seeds: --seeds 0-10000000000: 10,000,000,001 seeds"),
    ("[fixed]\nseeds = [0, 18446744073709551616]\n", "fixed.seeds: seed 18446744073709551616 is above 9223372036854775807"),
    ("[fixed]\nlr = inf\n", "fixed.lr: expected a finite number, got inf"),
    ("[slurm]\nmem_gb = inf\n", "slurm.mem_gb: expected a finite number, got inf"),
    ("[slurm]\nmem_gb = 1e-9\n", "slurm.mem_gb: 1e-09 GB is below 0.001 GB (1 MB)"),
    ("[slurm]\nadditional = { exclusive = false }\n", "slurm.additional.exclusive: false is no sbatch value"),
    ("[grid]\noptim = [{ optimizer = \"sgd\" }, 0.1]\n", "grid.optim: a group's choices are tables of options"),
])
def test_sweep_file_numbers_and_tables_are_checked_key_by_key(tmp_path, capsys, text, message):
    error = refused("sweep", toml(tmp_path, text), "--dry-run", "--out", tmp_path / "o", capsys=capsys)
    assert message in error, error


def test_a_byte_order_mark_is_no_statement(tmp_path, capsys):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[fixed]\nepochs = 1\n")
    assert load_sweep(path).fixed == {"epochs": 1}
    path.write_bytes(b"[fixed]\nepochs = 1 # \xff\n")
    assert "not UTF-8 text" in refused("sweep", path, "--dry-run", capsys=capsys)


# -- 8: output paths --------------------------------------------------------------------------------
def test_output_path_mistakes_are_one_line(tmp_path, capsys):
    write(tmp_path / "d", rows())
    error = refused("export", tmp_path / "d", "--out", tmp_path / "missing" / "dir" / "x.csv", capsys=capsys)
    assert f"there is no folder {tmp_path}/missing/dir" in error
    (tmp_path / "folder").mkdir()
    assert "is a folder: give a file" in refused("export", tmp_path / "d", "--out", tmp_path / "folder", capsys=capsys)
    (tmp_path / "file").write_text("")
    for logging_dir, message in ((tmp_path / "file", "is a file, not a folder"), ("/proc/nope", "cannot be made")):
        error = refused("run", "--cpu", "--seeds", "0", "--epochs", "1", "--batch-size", "6000", "--log-with",
                        "tensorboard", "--logging-dir", logging_dir, "--out", tmp_path / "r", capsys=capsys)
        assert f"--logging-dir {logging_dir} {message}" in error, error
        assert not (tmp_path / "r").exists()  # before the results folder is made


# -- 9: impossible metric values ---------------------------------------------------------------------
def test_impossible_metric_values_are_problems_like_foreign_rows(tmp_path, capsys):
    good = rows()
    bad = [{**good[0], "test_acc": 1.5}, {**good[1], "test_acc": float("nan")}, {**good[2], "test_loss": -0.1},
           {**good[3], "train_acc": -0.01}, {**good[4], "test_loss": None}, {**good[5], "train_loss": float("inf")}]
    write(tmp_path, good[6:])
    with open(tmp_path / "results.jsonl", "a") as f:  # as a hand edit or another program would write them
        f.writelines(json.dumps(r) + "\n" for r in bad)
    df, problems = read_results(tmp_path)
    assert len(df) == len(good) - 6 and len(problems) == 6, problems
    assert "test_acc is 1.5: an accuracy is in [0, 1]" in problems[0]
    assert "test_acc is nan: not a finite number though diverged is false" in problems[1]
    assert "test_loss is -0.1: a cross-entropy loss is >= 0" in problems[2]
    assert "train_acc is -0.01: an accuracy is in [0, 1]" in problems[3]
    assert "test_loss is null though diverged is false" in problems[4]
    assert "train_loss is inf: not a finite number" in problems[5]
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    assert "6 problem lines" in out
    diverged = {**good[0], "diverged": True, "test_acc": None, "test_loss": None, "train_acc": None, "train_loss": None}
    assert not read_results(_one(tmp_path / "ok", diverged))[1]  # null metrics of a diverged member are fine


def _one(folder, row):
    write(folder, [row])
    return folder


# -- 10, 11: machine options, signals to launch.sh ---------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--num_machines", "2", "--machine_rank", "5"], "--machine_rank 5: with --num_machines 2 it is one of 0 .. 1"),
    (["--num_machines", "2", "--machine_rank", "1", "--main_process_port", "70000"], "--main_process_port 70000"),
])
def test_machine_options_are_checked_before_any_process(tmp_path, capsys, no_process, argv, message):
    rc, out, err = launch("--cpu", *argv, "--main_process_ip", "127.0.0.1", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


class FakeLauncher:
    """accelerate launch as main_job sees it: wait() runs `act` (a signal arriving while it waits)."""

    def __init__(self, act, rc):
        self.act, self.rc, self.signals, self.stderr = act, rc, [], iter(())
        self.plain = act is None  # no signal: it ends with rc

    def __call__(self, cmd, **kwargs):
        self.kwargs = kwargs
        return self

    def wait(self):
        act, self.act = self.act, None
        if act is not None:
            act()
        return self.rc if self.signals or self.plain else 0  # a signal not passed on: the run goes on to its end

    def send_signal(self, signum):
        self.signals.append(signum)


@pytest.mark.parametrize("signum, rc, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_a_signal_to_launch_sh_reaches_the_launcher_once_and_is_named(tmp_path, capsys, monkeypatch, signum, rc, said):
    fake = FakeLauncher(_sigterm if signum == signal.SIGTERM else _raise_interrupt, -signum)
    monkeypatch.setattr(main_job.subprocess, "Popen", fake)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        got, out, err = launch("--nproc", "2", "--cpu", "--seeds", "0", "--out", tmp_path / "o", capsys=capsys)
    finally:
        signal.signal(signal.SIGINT, old)
    assert fake.signals == [signum] and fake.kwargs.get("process_group") == 0
    assert got == rc and f"launch.sh: {said}; the ranks were stopped. Completed epochs are in" in err, err


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # `kill -TERM` of launch.sh while its launcher runs


def _raise_interrupt():
    raise KeyboardInterrupt  # a `kill -INT` of launch.sh alone, or Ctrl-C at the terminal


def test_machine_1_does_not_point_at_results_it_never_writes(tmp_path, capsys, monkeypatch):
    fake = FakeLauncher(None, 1)
    monkeypatch.setattr(main_job.subprocess, "Popen", fake)
    rc, out, err = launch("--nproc", "1", "--cpu", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip",
                          "127.0.0.1", "--main_process_port", "29500", "--seeds", "0", "--out", tmp_path / "o",
                          capsys=capsys)
    assert rc == 1 and "the launch failed (exit 1)" in err and "Completed epochs" not in err, err


# -- 6, 11: what a failed launch shows -------------------------------------------------------------------
# The launcher's stderr as ./launch.sh received it (captured 2026-12-07, torch 2.14.1, accelerate 1.15.0;
# the launcher's traceback cut to its first and last frames).
ELASTIC = """E1207 12:25:31.524000 29678 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: {code}) local_rank: 0 (pid: 29765) of binary: /work/main/.venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
bnbench FAILED
------------------------------------------------------------
Failures:
{others}
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_12:25:31
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 29765) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""
SIGTERMED = """[1]:
  time      : 2026-12-07_12:28:31
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 30995)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 30995"""
REFUSED = "rank 1 started with other settings than rank 0: rank 1: epochs = 2 (rank 0: 1). Start every machine with the same options."
NO_DATA = """mnist: missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]
  looked in: /root/.cache/bnbench/downloads, /root/.cache/bnbench/downloads/MNIST/raw, /root/.cache/bnbench/downloads/MNIST
  download failed: RuntimeError: Error downloading train-images-idx3-ubyte.gz:
Tried https://ossci-datasets.s3.amazonaws.com/mnist/, got:
<urlopen error [Errno -2] Name or service not known>

  fix: put the four IDX files (gzipped or not) in a folder, flat or as MNIST/raw/, and pass --data-root DIR or set BNBENCH_DATA_ROOT=DIR
"""
PEER_TRACEBACK = """[rank1]: Traceback (most recent call last):
[rank1]:   File "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 6371, in barrier
[rank1]:     work.wait()
[rank1]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:10137. This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f
W1207 12:28:31.623000 30989 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30995 closing signal SIGTERM
"""
CRASH = """[rank1]: Traceback (most recent call last):
[rank1]:   File "/tmp/exp/crash.py", line 6, in <module>
[rank1]:     {}["no such key"]
[rank1]:     ~~^^^^^^^^^^^^^^^
[rank1]: KeyError: 'no such key'
""" + PEER_TRACEBACK.replace("[rank1]", "[rank0]")
BAR = ["\r  0%|          | 0/200 [00:00<?, ?step/s]", "\repoch 1/2:  22%|\u2588\u2588\u258f       | 45/200 [00:00<00:01, 106.45step/s]",
       "\r" + " " * 60 + "\r", "    epoch    variant  train_loss\n", "\repoch 1/2 eval:  50%|\u2588\u2588\u2588\u2588\u2588     | 100/200"]


def relayed(text: str, explained=None, chunk: int = 7) -> tuple[str, LaunchOutput, list[str]]:
    """`text` through LaunchOutput in chunks of `chunk` characters, as reads of a pipe cut it: what is shown,
    the LaunchOutput, the unknown exceptions it held."""
    shown = []
    out = LaunchOutput(shown.append)
    for i in range(0, len(text), chunk):
        out.feed(text[i:i + chunk])
    unknown = out.end(bool(out.errors) if explained is None else explained)
    return "".join(shown), out, unknown


def test_a_failed_launch_shows_each_ranks_error_once_and_hides_only_what_restates_it():
    # Two machines started with other settings: each machine's rank refuses, then torch-elastic's summary.
    shown, out, unknown = relayed(f"bnbench [rank 0]: error: {REFUSED}\n"
                                  + ELASTIC.format(code=2, others="  <NO_OTHER_FAILURES>"))
    assert shown == f"bnbench: error: {REFUSED}\n" and out.exit_codes() == [2, 2] and unknown == []
    # One machine, --nproc 2: rank 0's error of several lines, rank 1 repeating it, rank 1 losing its peer
    # (torch's [rank1]: traceback, or bnbench's own line for it), the launcher's SIGTERM to it.
    rank1 = "".join(f"bnbench [rank 1]: error: {line}" if i == 0 else line
                    for i, line in enumerate(NO_DATA.splitlines(keepends=True)))
    lost = f"bnbench [rank 1]: error: {LOST_PEER}: the output of the other processes or machines says why. Rerun\n"
    shown, out, unknown = relayed(f"bnbench [rank 0]: error: {NO_DATA}{rank1}{lost}{PEER_TRACEBACK}"
                                  + ELASTIC.format(code=2, others=SIGTERMED))
    assert shown == f"bnbench: error: {NO_DATA}" and 2 in out.exit_codes() and unknown == []
    # A peer lost is said at the end, once, and only where no rank refused (it may come before the refusal).
    assert relayed(lost + f"bnbench [rank 0]: error: {REFUSED}\n")[0] == f"bnbench: error: {REFUSED}\n"
    shown, out, unknown = relayed(lost + PEER_TRACEBACK + ELASTIC.format(code=1, others=SIGTERMED))
    assert shown == lost.replace("bnbench [rank 1]", "bnbench") and unknown == []
    # Anything else is shown whole, in order: a rank's unknown exception, and torch's summary of it.
    crash = CRASH + ELASTIC.format(code=1, others=SIGTERMED)
    shown, out, unknown = relayed(crash, explained=True)
    assert shown == crash and unknown == ["KeyError: 'no such key'"]
    # Two ranks' copies of one error run into one line (a newline written apart): shown once all the same.
    glued = relayed(f"bnbench [rank 1]: error: {REFUSED}bnbench [rank 2]: error: {REFUSED}\n\n")[0]
    assert glued.strip("\n") == f"bnbench: error: {REFUSED}", glued
    # A reset connection restates a lost peer only as the collective's RuntimeError: a tracker's
    # ConnectionResetError, or an exception class without the usual suffix, is news, shown whole.
    for news in ("ConnectionResetError: [Errno 104] Connection reset by peer",
                 "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised", "StopIteration"):
        tb = f"[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n[rank0]: {news}\n"
        crash = tb + lost + ELASTIC.format(code=1, others=SIGTERMED)
        shown, out, unknown = relayed(crash, explained=True)
        assert unknown == [news] and news in shown, (news, shown)
    # A progress bar goes through unchanged, each update as it comes, not at the end of its line.
    shown, out = [], LaunchOutput(lambda text: shown.append(text))
    for update in BAR:
        out.feed(update)
        assert "".join(shown) == "".join(BAR[:BAR.index(update) + 1])
    # A traceback that the run outlives, going on printing, was not its end: shown then, not held to the end.
    out.feed("Exception ignored in: <function f>\nTraceback (most recent call last):\nValueError: x\n")
    out.feed("\repoch 1/2:  60%|\u2588\u2588\u2588\u2588\u2588\u2588    | 120/200")
    # the traceback ended at its exception's line: the bar goes on as it comes, the traceback is held
    assert "ValueError" not in "".join(shown) and "".join(shown).endswith("| 120/200")
    out.tick(time.monotonic() + LaunchOutput.HOLD_S + 1)
    assert "".join(shown).endswith("Traceback (most recent call last):\nValueError: x\n")
    # A rank's prefix alone (torch prefixes its warnings) starts no traceback: what follows is not held.
    shown, out = [], LaunchOutput(lambda text: shown.append(text))
    out.feed("[rank0]:[W1207 13:00:00.000000000 ProcessGroupGloo.cpp:516] Warning: unable to resolve hostname\n")
    out.feed("    epoch    variant  train_loss\n")
    assert "".join(shown).endswith("    epoch    variant  train_loss\n")


def test_a_port_in_use_on_the_main_machine_is_one_line_before_any_process(tmp_path, capsys, no_process):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = launch("--cpu", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
                              "--main_process_port", port, "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and err == (f"bnbench: error: --main_process_port {port} is in use on this machine (another launch, or "
                               "another program): stop that, or start every machine with another --main_process_port\n")
    assert not (tmp_path / "o").exists()


# -- 12: a closed pipe -------------------------------------------------------------------------------
def test_a_reader_that_stops_early_is_no_traceback(tmp_path):
    write(tmp_path / "d", rows())
    sweep = toml(tmp_path, "[fixed]\nepochs = 1\n[grid]\nlr = [" + ", ".join(f"{i}e-4" for i in range(1, 400)) + "]\n")
    for argv in (["status", tmp_path / "d"], ["sweep", sweep, "--dry-run", "--out", tmp_path / "o"]):
        proc = subprocess.Popen([sys.executable, "-m", "bnbench", *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        proc.stdout.close()  # `| head -0`: the reader is gone before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141 and err == "", err


# -- 13: nothing left behind by a refused command -------------------------------------------------------
def test_refused_commands_leave_nothing_behind(tmp_path, capsys, data_root, monkeypatch):
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    for argv in (["--batch-size", "60001"], ["--seeds", "0-1000000"], ["--data-root", tmp_path / "nowhere"],
                 ["--dp", "2"]):
        rc, out, err = bnbench("run", "--cpu", *argv, "--out", tmp_path / "r", capsys=capsys)
        assert rc == 2 and "Traceback" not in err, err
        assert not (tmp_path / "r").exists(), (argv, entries(tmp_path / "r"))
    (tmp_path / "any").mkdir()
    assert bnbench("status", tmp_path / "any", capsys=capsys)[0] == 0
    assert entries(tmp_path / "any") == []  # no .lock made by a reader
    path = toml(tmp_path, "[sweep]\nlog_with = \"nonesuch\"\n[fixed]\nepochs = 1\n")
    assert "unknown tracker nonesuch" in refused("sweep", path, "--dry-run", "--out", tmp_path / "s", capsys=capsys)
    assert "unknown tracker nonesuch" in refused("sweep", path, "--out", tmp_path / "s", capsys=capsys)
    assert not (tmp_path / "s").exists()


# -- 14: status of a folder of plain runs --------------------------------------------------------------
def test_status_of_plain_runs_shows_epochs_recorded_and_runs_meta_does_not_know(tmp_path, capsys):
    from bnbench.store.record import update_meta

    recorded = [r for r in rows(run_id="r1") if r["epoch"] == 1]  # a run of 4 epochs that died after 1
    write(tmp_path, recorded + rows(run_id="r2"))
    update_meta(tmp_path, "r1", {"status": "running", "config": {"epochs": 4}, "pid": 2**22 + 7,
                                 "hostname": socket.gethostname()})  # a pid above Linux's largest: gone
    rc, out, err = bnbench("status", tmp_path, capsys=capsys)
    lines = {x.split()[0]: x for x in out.splitlines() if x.split() and x.split()[0] in ("r1", "r2")}
    assert "1/4" in lines["r1"] and "died" in lines["r1"], out
    assert "not in meta.json" in lines["r2"] and "2/?" in lines["r2"], out
    update_meta(tmp_path, "r3", {"status": "running"}, bury=True)  # the next run records the dead one
    error = json.loads((tmp_path / "meta.json").read_text())["runs"]["r1"]["error"]
    assert "or a disk too full to record it" in error


# -- 16: --eval-batch ---------------------------------------------------------------------------------
def test_eval_batch_says_what_it_changes():
    from bnbench.config import Config

    (field,) = [f for f in Config.__dataclass_fields__.values() if f.name == "eval_batch"]
    assert "memory only" not in field.metadata["help"] and "last digits" in field.metadata["help"]
    row = [x for x in (REPO / "docs" / "usage.md").read_text().splitlines() if x.startswith("| `--eval-batch`")]
    assert len(row) == 1 and "memory only" not in row[0] and "test_loss" in row[0] and "last digits" in row[0]


def test_the_memory_hint_names_what_would_help(monkeypatch):
    """Item 17: a net too large for one member per variant is not told to use fewer seeds."""
    from bnbench.config import ConfigError, make_config
    from bnbench.train import memory
    from bnbench.train.memory import check_fits

    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * 2**30)  # a 4 GiB machine, whatever this one has

    cfg = make_config(hidden=(100_000,), seeds=(0,))
    try:
        check_fits(cfg, 2, 100, "cpu")
    except ConfigError as e:
        text = str(e)
    else:
        raise AssertionError("a 100,000-unit layer with an evaluation chunk of 10,000 fitted")
    assert "fewer seeds" not in text and "smaller --eval-batch" in text and "fewer --variants" in text
    many = make_config(seeds=tuple(range(2_000)))
    try:
        check_fits(many, 4_000, 100, "cpu")
    except ConfigError as e:
        assert "fewer seeds per launch" in str(e)
    else:
        raise AssertionError("4,000 lab members fitted in 4 GiB")
