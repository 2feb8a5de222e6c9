"""The Python API (issue 31): bnbench.run / load / sweep / figures / report, their docstring examples, the
same one-line errors as the command line, and figures that leave the caller's matplotlib state alone."""
from __future__ import annotations

import doctest
import json
import subprocess
import sys
import traceback

import pytest

import bnbench
from bnbench import cli
from bnbench.config import ConfigError
from bnbench.store.results import ResultsWriter

from conftest import REPO


def test_import_bnbench_stays_cheap():
    # The API is imported on first use: `import bnbench` (and with it `bnbench --help`) loads no torch or pandas.
    code = ("import sys, bnbench; print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'bnbench.api') if m in sys.modules));"
            "bnbench.load; print('bnbench.api' in sys.modules, callable(bnbench.run), 'sweep' in dir(bnbench))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True True True", out
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        bnbench.nothing  # noqa: B018


def test_docstring_examples_run(tmp_path, monkeypatch, data_root):
    """Every example in api.py's docstrings, as written (1-2 seeds, 1-2 epochs, batches of 6000: seconds)."""
    import bnbench.api

    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    monkeypatch.chdir(tmp_path)  # nothing an example writes lands in the checkout
    result = doctest.testmod(bnbench.api, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 15 and result.failed == 0, result
    assert not (tmp_path / "runs").exists()


def _cli_error(argv, capsys) -> str:
    """The one line `bnbench ...` prints for bad input, without its `bnbench...: error: ` prefix."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: usage, then the line
        rc = e.code
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    return line.split(": error: ", 1)[1]


def _raised_here(e: BaseException) -> None:
    """The exception comes from the API's own frame: no traceback through bnbench's machinery."""
    frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    inside = [f for f in frames if "/bnbench/" in f and not f.endswith("/bnbench/api.py")]
    assert inside == [] and e.__suppress_context__, frames


@pytest.mark.parametrize("settings, argv", [
    ({"lr": "fast"}, ["--lr", "fast"]),
    ({"speed": 3}, ["--speed", "3"]),
    ({"seeds": "0-x"}, ["--seeds", "0-x"]),
    ({"epochs": 0}, ["--epochs", "0"]),
    ({"variants": "bn,foo"}, ["--variants", "bn,foo"]),
    ({"hidden": [32, -1]}, ["--hidden", "32,-1"]),
    ({"optimizer": "lbfgs"}, ["--optimizer", "lbfgs"]),
])
def test_bad_settings_raise_the_command_lines_line(settings, argv, tmp_path, capsys):
    expected = _cli_error(["run", *argv, "--out", str(tmp_path / "cli")], capsys)
    with pytest.raises(ConfigError) as e:
        bnbench.run(out=tmp_path / "api", **settings)
    assert str(e.value) == expected and "\n" not in expected
    _raised_here(e.value)
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()  # refused before any folder


def test_python_values_and_names(tmp_path):
    # An abbreviation the command line would take is not a name here; a bool option wants a bool.
    with pytest.raises(ConfigError, match=r"^unrecognized arguments: --seed 3$"):
        bnbench.run(seed=3)
    with pytest.raises(ConfigError, match=r"^argument --cpu: expected True or False, got 'yes'$"):
        bnbench.run(cpu="yes")
    with pytest.raises(ConfigError, match=r"^unknown preset 'nope'"):
        bnbench.run("nope")
    with pytest.raises(ConfigError, match="is results.jsonl of the results folder"):
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "results.jsonl").write_text("")
        bnbench.run(out=tmp_path / "f" / "results.jsonl")


def _rows(run_id="r1", epochs=(1, 2)):
    return [dict(run_id=run_id, dataset="mnist", hidden="32,32", optimizer="adam", lr=1e-3, batch_size=100, variant=v,
                 seed=s, epoch=e, epochs=max(epochs), test_acc=a - (2 - e) / 100, test_loss=1 - a, train_acc=a,
                 train_loss=1 - a, diverged=False, train_seconds=1.0, world_size=1, device="cpu")
            for v, a in (("bn", 0.97), ("nobn", 0.96)) for s in range(3) for e in epochs]


def test_load_says_problems_as_the_command_line_does(tmp_path, capsys):
    with ResultsWriter(tmp_path) as w:
        w.append(_rows())
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write(json.dumps({"run_id": "r1", "variant": "bn", "seed": "x", "epoch": 1, "test_acc": 0.5, "diverged": False}) + "\n")
    with pytest.warns(bnbench.api.RowsWarning, match=r"^bnbench: warning: .*results.jsonl:13: seed is 'x'"):
        rows = bnbench.load(tmp_path)
    assert len(rows) == 12 and len(rows.attrs["problems"]) == 1
    assert len(bnbench.load(tmp_path / "results.jsonl")) == 12  # the file itself names its folder
    # Not a results folder: the line `bnbench report` prints, raised here.
    expected = _cli_error(["report", str(tmp_path / "nothing")], capsys)
    with pytest.raises(ConfigError) as e:
        bnbench.load(tmp_path / "nothing")
    assert str(e.value) == expected == f"no results.jsonl in {tmp_path / 'nothing'}"
    _raised_here(e.value)
    for call in (bnbench.report, bnbench.figures):
        with pytest.raises(ConfigError, match="^no results.jsonl in") as e:
            call(tmp_path / "nothing")
        _raised_here(e.value)


def test_report_and_figures_from_a_folder_and_from_rows(tmp_path):
    from matplotlib.figure import Figure

    with ResultsWriter(tmp_path) as w:
        w.append(_rows())
    page = bnbench.report(tmp_path)
    assert page == tmp_path / "report" / "report.html" and page.exists()
    for figs in (bnbench.figures(tmp_path), bnbench.figures(bnbench.load(tmp_path))):
        assert sorted(figs) == ["final_accuracy", "learning_curves"]
        for fig in figs.values():
            assert isinstance(fig, Figure) and fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match=r"^figures: a results folder or rows \(a DataFrame\), got list$"):
        bnbench.figures([1, 2])


def test_figures_leave_the_callers_backend_rcparams_and_theme_alone(tmp_path):
    """In a fresh interpreter with its own backend, seaborn theme and rcParams: bnbench.figures and bnbench.report
    change none of them, and put no figure in pyplot's list (a notebook would show it twice)."""
    with ResultsWriter(tmp_path) as w:
        w.append(_rows())
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt, seaborn as sns, bnbench
sns.set_theme(style="dark", context="talk", rc={{"axes.facecolor": "#123456"}})
plt.figure()
before = (matplotlib.get_backend(), {{k: str(v) for k, v in matplotlib.rcParams.items()}}, plt.get_fignums())
figs = bnbench.figures({str(tmp_path)!r})
bnbench.report({str(tmp_path)!r})
after = (matplotlib.get_backend(), {{k: str(v) for k, v in matplotlib.rcParams.items()}}, plt.get_fignums())
changed = sorted(k for k in before[1] if before[1][k] != after[1][k])
print(before[0], after[0], changed, before[2], after[2], sorted(figs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "svg svg [] [1] [1] ['final_accuracy', 'learning_curves']", out.stdout


def test_a_sweep_in_a_notebook_draws_bars(monkeypatch):
    """In a Jupyter kernel a sweep's progress is tqdm.auto's widgets, as on a terminal; in a log, lines."""
    import types

    from bnbench.sweeps.runner import Progress

    class ZMQInteractiveShell:  # what IPython's get_ipython() returns inside a Jupyter kernel
        pass

    assert Progress(2, quiet=False).mode == "lines"  # pytest's stderr is no terminal
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    bars = Progress(2, quiet=False)
    assert bars.mode == "bars"
    bars.units.close()
