"""The figures of README.md and docs/*.md against the committed files they describe (reports/readme.py)."""
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


def _holder(texts: dict, name: str) -> Path:
    """The file that holds block NAME."""
    found = [p for p, t in texts.items() if f"<!-- figures: {name} (" in t]
    assert len(found) == 1, f"block {name!r} is in {found}"
    return found[0]


def test_every_figures_block_equals_what_the_committed_files_give():
    mod = _readme_module()
    assert mod.README in mod.files() and mod.DOCS and all(p.parent == REPO / "docs" for p in mod.DOCS)
    _, problems = mod.render(mod.read_texts())
    assert problems == [], "\n".join(problems) + "\n(python reports/readme.py rewrites the blocks)"


def test_a_changed_figure_or_a_lost_block_is_caught():
    mod = _readme_module()
    texts = mod.read_texts()
    lab = _holder(texts, "lab")
    text = texts[lab]
    figure = re.search(r"\| with BN \| (\d\.\d{4}) ±", text)  # the lab block's BN mean, whatever it is
    assert figure, "the lab block's table is not where the test looks"
    changed = f"{float(figure.group(1)) + 0.0002:.4f}"
    _, problems = mod.render({**texts, lab: text[:figure.start(1)] + changed + text[figure.end(1):]})
    where = str(lab.relative_to(REPO))
    assert len(problems) == 1 and problems[0].startswith(f"{where}: block 'lab' differs"), problems

    memory = _holder(texts, "memory")
    text = texts[memory]
    start = text.index("<!-- figures: memory")
    end = text.index("<!-- /figures -->", start) + len("<!-- /figures -->")
    _, problems = mod.render({**texts, memory: text[:start] + text[end:]})
    assert len(problems) == 1 and problems[0].startswith("no figures block 'memory' in README.md, docs/"), problems

    made_up = "\n<!-- figures: made_up (reports/readme.py) -->\nx\n<!-- /figures -->\n"
    _, problems = mod.render({**texts, mod.README: texts[mod.README] + made_up})
    assert len(problems) == 1 and problems[0].startswith("README.md: unknown figures block 'made_up'"), problems

    # A block copied into a second file is caught, naming both files.
    block = re.search(r"<!-- figures: memory .*?<!-- /figures -->\n", texts[memory], re.S).group(0)
    other = next(p for p in mod.files() if p != memory)
    _, problems = mod.render({**texts, other: texts[other] + "\n" + block})
    assert len(problems) == 1 and "figures block 'memory' appears 2 times" in problems[0], problems
    assert str(memory.relative_to(REPO)) in problems[0] and str(other.relative_to(REPO)) in problems[0]


def test_a_block_in_docs_links_from_its_own_folder():
    # Blocks write links from the repository root; in docs/ they point one folder up.
    mod = _readme_module()
    image = "![a figure](reports/lab/report/final_accuracy.png) and [a page](docs/usage.md), [web](https://x.org)"
    assert mod.relative_links(image, mod.README) == image
    assert mod.relative_links(image, REPO / "docs" / "x.md") == (
        "![a figure](../reports/lab/report/final_accuracy.png) and [a page](../docs/usage.md), [web](https://x.org)")


def test_every_relative_link_and_image_resolves():
    mod = _readme_module()
    for path, text in mod.read_texts().items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:|#", target):
                continue
            assert (path.parent / target.split("#")[0]).exists(), f"{path.relative_to(REPO)}: {target} does not exist"
