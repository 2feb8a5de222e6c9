"""./launch.sh's process count on a CPU machine without --nproc: one seed group per usable core (issue 32).
Whether that is faster is bench/main_job_time.py's business; here: what it chooses, and that it launches it."""
from __future__ import annotations

import pytest

from bnbench import main_job
from bnbench.config import make_config
from bnbench.dist.layout import cpu_processes


@pytest.mark.parametrize("settings, cores, expected", [
    ({}, 1, (1, None)),  # one core: one process, in this process
    ({}, 2, (2, None)),  # the lab's 10 members on this VM's two cores
    ({}, 64, (10, None)),  # never more seed groups than members
    ({"seeds": (0,), "variants": ("bn",)}, 8, (1, None)),  # one member: nothing to share out
    ({"dp": 2}, 2, (2, None)),  # --dp 2 asked for: one data-parallel group of the two cores
    ({"dp": 2}, 5, (4, None)),  # a multiple of dp
    ({"instrument": True}, 2, (1, "--instrument measures in one process")),
    ({"dp": 2, "batch_size": 2}, 2, (1, "BatchNorm needs at least 2 samples per batch; it would see 1")),
])
def test_cpu_processes(settings, cores, expected):
    assert cpu_processes(make_config(**settings), cores) == expected


class Launched(Exception):
    pass


def test_the_main_job_launches_one_seed_group_per_core_when_not_told(tmp_path, monkeypatch, capsys):
    """No process starts: Popen records the command and stops the job there."""
    seen = {}

    def popen(cmd, **kwargs):
        seen["cmd"] = cmd
        raise Launched

    monkeypatch.setattr(main_job.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(main_job.subprocess, "Popen", popen)
    with pytest.raises(Launched):
        main_job.main(["--cpu", "--seeds", "0-1", "--epochs", "1", "--out", str(tmp_path / "o")])
    cmd = seen["cmd"]
    assert cmd[cmd.index("--num_processes") + 1] == "3" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert "launch.sh: 3 processes: 3 seed groups x dp 1 (members per group 2,1,1)" in capsys.readouterr().err
    # told: --nproc wins; several machines: one each unless told
    for argv, processes in ((["--nproc", "2"], "2"), (["--num_machines", "2", "--machine_rank", "0",
                                                       "--main_process_ip", "127.0.0.1"], "2")):
        with pytest.raises(Launched):
            main_job.main(["--cpu", "--seeds", "0-1", "--epochs", "1", *argv, "--out", str(tmp_path / "p")])
        cmd = seen["cmd"]
        assert cmd[cmd.index("--num_processes") + 1] == processes, argv
