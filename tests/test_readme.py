"""The README's figures against the committed files they describe (reports/readme.py)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_module():
    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "reports" / "readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_figures_block_equals_what_the_committed_files_give():
    mod = _readme_module()
    text = mod.README.read_text()
    _, problems = mod.render(text)
    assert problems == [], "\n".join(problems) + "\n(python reports/readme.py rewrites the blocks)"


def test_a_changed_figure_or_a_lost_block_is_caught():
    mod = _readme_module()
    text = mod.README.read_text()
    figure = re.search(r"\| with BN \| (\d\.\d{4}) ±", text)  # the lab block's BN mean, whatever it is
    assert figure, "the lab block's table is not where the test looks"
    changed = f"{float(figure.group(1)) + 0.0002:.4f}"
    _, problems = mod.render(text[:figure.start(1)] + changed + text[figure.end(1):])
    assert len(problems) == 1 and "block 'lab' differs" in problems[0]
    start = text.index("<!-- figures: memory")
    end = text.index("<!-- /figures -->", start) + len("<!-- /figures -->")
    _, problems = mod.render(text[:start] + text[end:])
    assert problems == ["README.md: no figures block 'memory'"]
    _, problems = mod.render(text + "\n<!-- figures: made_up (reports/readme.py) -->\nx\n<!-- /figures -->\n")
    assert len(problems) == 1 and "unknown figures block 'made_up'" in problems[0]
