"""notebooks/lab.ipynb (issue 31): executed through a real Jupyter kernel (nbclient + ipykernel) with its
parameters overridden as papermill does (a cell injected after the one tagged "parameters"): 2 seeds x 1
epoch in batches of 6000, seconds of training. Its outputs: the verdict, a PNG per figure cell, no error.
The committed notebook holds the outputs of a full run (5 seeds x 15 epochs)."""
from __future__ import annotations

import re

import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "lab.ipynb"


def _cell(nb, text: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    return cell


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _pngs(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def with_parameters(nb, **values):
    """papermill's convention: a cell tagged "injected-parameters" right after the one tagged "parameters"."""
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "# Parameters (injected)\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


@pytest.mark.slow
def test_the_lab_notebook_runs_in_a_jupyter_kernel(tmp_path, monkeypatch, data_root):
    from nbclient import NotebookClient

    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))  # the kernel inherits the environment
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), seeds="0-1", epochs=1, batch_size=6000,
                         out=str(tmp_path / "lab"))
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == [], [f"{e.ename}: {e.evalue}" for e in errors]
    assert f"4 rows in {tmp_path / 'lab'}/results.jsonl" in _text(_cell(nb, "bnbench.run("))  # 2 seeds x 2 variants x 1 epoch
    verdict = _text(_cell(nb, "bnbench.verdict("))
    assert re.search(r"BN - no-BN = [+-]\d+\.\d\d pp over 2 paired seeds: too few for an interval", verdict), verdict
    assert _pngs(_cell(nb, "bnbench.figures(")) >= 1
    paired = _cell(nb, 'tables["paired_difference"]').outputs
    assert any("BN - no-BN (pp)" in o.get("data", {}).get("text/html", "") for o in paired)
    assert (tmp_path / "lab" / "report" / "report.html").exists()


def test_the_committed_notebook_holds_a_full_runs_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'seeds = "0-4"' in params.source and "epochs = 15" in params.source and "batch_size = 100" in params.source
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code"), "committed unexecuted"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert "150 rows in " in _text(_cell(nb, "bnbench.run("))  # 5 seeds x 2 variants x 15 epochs
    verdict = _text(_cell(nb, "bnbench.verdict("))
    assert re.search(r"BN raises final test accuracy by \d\.\d\d pp \[95% CI .*\], p .*, 5 paired seeds; BN ahead on", verdict), verdict
    assert _pngs(_cell(nb, "bnbench.figures(")) >= 3  # final accuracy, learning curves, time to target
