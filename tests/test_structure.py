"""The code's shape: one declaration per setting feeds every consumer, and no import cycle."""
from __future__ import annotations

import ast
import dataclasses

from bnbench import cli
from bnbench.config import Config, make_config, row_settings, row_values, run_argv, setting, settings, sweep_kinds
from bnbench.report import config_keys
from bnbench.results import SCHEMA

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
    readme = (REPO / "README.md").read_text()
    for f in settings():
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}" in readme, f"README's run options lack {flag}"
    for name in row_settings():
        assert name in SCHEMA
        assert name == "repeat" or name in config_keys()
    assert {"compile", "tf32"} <= set(config_keys())
    assert set(sweep_kinds()) == {f.name for f in settings()} - {"cpu", "repeat"}


def _imports(path) -> set[str]:
    """bnbench modules a module imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnbench."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycle_in_the_package():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}
    assert graph["report"] >= {"figures", "report_instruments"}  # the walk sees real imports
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


def test_no_module_is_too_long_to_read_at_a_sitting():
    for path in PACKAGE.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{path.name} has {lines} lines: split it by concern"
