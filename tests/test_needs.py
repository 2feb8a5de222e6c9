"""A test whose need is missing (needs_* markers, tests/conftest.py) is skipped with one line that says
what provides it, and under CI it fails with that line instead: never a silent skip in CI.

Each case runs pytest in a subprocess on a tiny test file, with this suite's conftest.py and markers
(read from pyproject.toml), so that the environment (PATH, CI) is the child's alone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO

def run_tiny(tmp_path, tests: dict[str, tuple[str, ...]], **env) -> subprocess.CompletedProcess:
    """pytest in a child on one file: each named test carries its markers, and test_needs_nothing none."""
    folder = tmp_path / "suite"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", folder / "conftest.py")
    registered = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    (folder / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
                                       + "".join(f"    {m}\n" for m in registered))
    (folder / "test_tiny.py").write_text("import pytest\n\n\ndef test_needs_nothing():\n    pass\n" + "".join(
        "\n\n" + "".join(f"@pytest.mark.{m}\n" for m in marks) + f"def {name}():\n    pass\n" for name, marks in tests.items()))
    child = {k: v for k, v in os.environ.items() if k not in ("CI", "BNBENCH_TEST_MISSING")}
    child.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-rsE", "test_tiny.py"], cwd=folder, env=child,
                          capture_output=True, text=True, timeout=300)


CHROMIUM = "needs Debian's chromium (not on PATH: chromium, chromium-browser): apt-get install chromium, " \
           "or run ./launch.sh test as root, which installs it"
HIDDEN = {
    "root": "needs root (hidden by BNBENCH_TEST_MISSING): run ./launch.sh test as root, e.g. sudo ./launch.sh test "
            "(it mounts a tmpfs or starts daemons)",
    "slurm": "needs Debian's slurmctld, slurmd, slurm-client and munge (hidden by BNBENCH_TEST_MISSING): "
             "apt-get install slurmctld slurmd slurm-client munge, or run ./launch.sh test as root, which installs them",
    "fashion_mnist": "needs Debian's dataset-fashion-mnist (hidden by BNBENCH_TEST_MISSING): "
                     "apt-get install dataset-fashion-mnist, or run ./launch.sh test as root, which installs it",
}
CI_SAYS = " [CI is set: not skipped]"


def test_a_command_missing_from_path_skips_with_its_package_and_fails_under_ci(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    # The child runs as sys.executable: it needs no PATH, chromium is simply not found.
    p = run_tiny(tmp_path / "local", {"test_browser": ("needs_chromium",)}, PATH=str(empty))
    assert p.returncode == 0 and "1 passed, 1 skipped in" in p.stdout, p.stdout + p.stderr
    assert f"SKIPPED [1] test_tiny.py:8: {CHROMIUM}\n" in p.stdout, p.stdout
    p = run_tiny(tmp_path / "ci", {"test_browser": ("needs_chromium",)}, PATH=str(empty), CI="true")
    assert p.returncode == 1 and "1 passed, 1 error in" in p.stdout and "SKIPPED" not in p.stdout, p.stdout + p.stderr
    assert f"ERROR test_tiny.py::test_browser - Failed: {CHROMIUM}{CI_SAYS}\n" in p.stdout, p.stdout


def test_every_need_skips_with_its_line_outside_ci_and_fails_with_it_under_ci(tmp_path):
    # BNBENCH_TEST_MISSING makes present needs count as missing (for tests only), so this holds on any machine.
    tests = {f"test_{need}": (f"needs_{need}",) for need in HIDDEN} | {"test_root_and_slurm": ("needs_root", "needs_slurm")}
    hidden = ",".join(HIDDEN)
    p = run_tiny(tmp_path / "local", tests, BNBENCH_TEST_MISSING=hidden)
    assert p.returncode == 0 and "1 passed, 4 skipped in" in p.stdout, p.stdout + p.stderr
    for need, line in HIDDEN.items():
        assert f": {line}\n" in p.stdout, (need, p.stdout)
    assert f": {HIDDEN['root']}; {HIDDEN['slurm']}\n" in p.stdout, p.stdout  # every missing need, in one line
    p = run_tiny(tmp_path / "ci", tests, BNBENCH_TEST_MISSING=hidden, CI="true")
    assert p.returncode == 1 and "1 passed, 4 errors in" in p.stdout and "SKIPPED" not in p.stdout, p.stdout + p.stderr
    for need, line in HIDDEN.items():
        assert f"ERROR test_tiny.py::test_{need} - Failed: {line}{CI_SAYS}\n" in p.stdout, (need, p.stdout)


def test_a_need_that_is_present_runs_the_test_and_a_misspelt_need_is_refused(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "chromium").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "chromium").chmod(0o755)
    p = run_tiny(tmp_path / "present", {"test_browser": ("needs_chromium",)}, PATH=str(tmp_path / "bin"))
    assert p.returncode == 0 and "2 passed in" in p.stdout, p.stdout + p.stderr
    p = run_tiny(tmp_path / "typo", {"test_browser": ("needs_chromium",)}, BNBENCH_TEST_MISSING="chromuim")
    assert p.returncode != 0 and "BNBENCH_TEST_MISSING: unknown need chromuim; valid: root, slurm, chromium, fashion_mnist" \
        in p.stdout + p.stderr, p.stdout + p.stderr
