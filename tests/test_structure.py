"""The code's shape: one declaration per setting feeds every consumer, and no import cycle."""
from __future__ import annotations

import ast
import dataclasses

from bnbench import cli
from bnbench.config import Config, make_config, row_settings, row_values, run_argv, setting, settings, sweep_kinds
from bnbench.reporting.report import config_keys
from bnbench.store.results import SCHEMA

from conftest import REPO

PACKAGE = REPO / "src" / "bnbench"


def _extended():
    # A newcomer's new hyperparameter: one line, as it would be added to Config.
    return dataclasses.make_dataclass("Extended", [
        ("label_smoothing", float, setting(0.0, "cross-entropy label smoothing", "float", column=True, later=True)),
    ], bases=(Config,), frozen=True)


def test_a_new_setting_flows_to_every_consumer():
    Extended = _extended()
    cfg = make_config(cls=Extended, label_smoothing=0.1, lr=2e-3)
    # The command line: an option with its help, parsed back into the same config.
    parser = cli.build_parser(Extended)
    assert "--label-smoothing" in parser._subparsers._group_actions[0].choices["run"].format_help()
    assert "--label-smoothing" in run_argv(cfg)
    args = parser.parse_args(["run", *run_argv(cfg)])
    again = make_config(args.preset, cls=Extended, **{f.name: getattr(args, f.name) for f in settings(Extended)
                                                      if f.name != "preset"})
    assert again == cfg and again.label_smoothing == 0.1
    # Sweep files may set it, with its kind; rows carry it; the report tells configurations apart by it.
    assert sweep_kinds(Extended)["label_smoothing"] == "float"
    assert row_settings(Extended)["label_smoothing"] == "cross-entropy label smoothing"
    assert row_values(cfg)["label_smoothing"] == 0.1
    assert "label_smoothing" in config_keys(Extended)
    # Its id: a later field at its default leaves every existing unit's id alone; set, it changes it.
    base = make_config(lr=2e-3)
    assert make_config(cls=Extended, lr=2e-3).unit_id(1, "cpu", "2.14.1") == base.unit_id(1, "cpu", "2.14.1")
    assert cfg.unit_id(1, "cpu", "2.14.1") != base.unit_id(1, "cpu", "2.14.1")


def test_every_setting_reaches_cli_sweep_rows_and_report():
    # Today's settings: each is an option, each row column is in the schema and the report's key
    # (compile and tf32 once were not, and a sweep over them reported one configuration).
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    readme = (REPO / "docs" / "usage.md").read_text()  # the run options table
    for f in settings():
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}" in readme, f"README's run options lack {flag}"
    for name in row_settings():
        assert name in SCHEMA
        assert name == "repeat" or name in config_keys()
    assert {"compile", "tf32"} <= set(config_keys())
    assert set(sweep_kinds()) == {f.name for f in settings()} - {"cpu", "repeat"}


def _module_name(path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path) -> set[str]:
    """bnbench modules a module imports (dotted, e.g. bnbench.train.models), at top level or inside functions."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "bnbench":
                continue
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from .sweeps import runner` imports a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "bnbench")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert graph["bnbench.reporting.report"] >= {"bnbench.reporting.figures", "bnbench.reporting.instruments"}
    assert "bnbench.sweeps.runner" in graph["bnbench.cli"]  # `from .sweeps import runner` is seen
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


# What each subpackage may not import, directly or through another bnbench module: data flows one way.
FORBIDDEN = {
    "bnbench.reporting": ("bnbench.train", "bnbench.dist", "bnbench.sweeps", "bnbench.training"),
    "bnbench.train": ("bnbench.store", "bnbench.sweeps", "bnbench.reporting", "bnbench.training", "bnbench.cli"),
    "bnbench.dist": ("bnbench.train", "bnbench.store", "bnbench.sweeps", "bnbench.reporting", "bnbench.training",
                     "bnbench.cli"),
    "bnbench.store": ("bnbench.train", "bnbench.dist", "bnbench.sweeps", "bnbench.reporting", "bnbench.training",
                      "bnbench.cli"),
    "bnbench.sweeps": ("bnbench.reporting",),
}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(graph: dict[str, set[str]]) -> tuple[list[str], int]:
    """(each module that reaches a module its layer may not import, how many modules were checked)."""
    found, checked = [], 0
    for name in sorted(graph):
        for package, banned in FORBIDDEN.items():
            if not _within(name, package):
                continue
            checked += 1
            reach, todo = set(), list(graph[name])
            while todo:  # everything it imports, transitively
                m = todo.pop()
                if m not in reach:
                    reach.add(m)
                    todo.extend(graph.get(m, ()))
            found += [f"{name} reaches {m}: {package} may not import it"
                      for m in sorted(reach) if any(_within(m, b) for b in banned)]
    return found, checked


def test_each_layer_imports_only_the_layers_below_it():
    found, checked = _violations(_graph())
    assert found == []
    assert checked >= 20  # the walk found the subpackages' modules


def test_the_layering_check_catches_a_wrong_import():
    # A report module that imported the engine, or a model that wrote rows, would be caught.
    graph = _graph()
    graph["bnbench.reporting.report"] = graph["bnbench.reporting.report"] | {"bnbench.train.engine"}
    graph["bnbench.train.models"] = graph["bnbench.train.models"] | {"bnbench.store.results"}
    found, _ = _violations(graph)
    assert any(v.startswith("bnbench.reporting.report reaches bnbench.train.engine") for v in found)
    assert any(v.startswith("bnbench.train.models reaches bnbench.store.results") for v in found)


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{init} needs a docstring saying what it owns"


def test_no_module_is_too_long_to_read_at_a_sitting():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concern"


def test_stated_versions_are_enforced_and_agree_with_pyproject():
    import re
    import tomllib

    from bnbench import versions
    from bnbench.config import ConfigError

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, least in versions.MINIMUM.items():
        (spec,) = [d for d in deps if re.match(rf"{name}\b", d)]
        assert spec.startswith(f"{name}>={least[0]}.{least[1]}"), (spec, least)
    versions.check()  # the installed ones pass
    versions.check({"torch": "2.11.0+cu130", "accelerate": "1.15.0"})  # the GPU machine's
    try:
        versions.check({"torch": "2.10.2", "accelerate": "1.16.0"})
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError("torch 2.10 was accepted")
    assert "torch >= 2.11, found 2.10.2" in message and "\n" not in message and "pip install 'torch>=2.11'" in message


def test_an_old_torch_stops_a_run_with_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert cli.main(["run", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnbench: error: bnbench needs torch >= 2.11, found 2.10.0")
    assert not (tmp_path / "r").exists()
