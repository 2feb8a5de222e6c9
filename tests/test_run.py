"""A run end to end: the results schema, durability per epoch, divergence, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from bnbench.train import data
from bnbench.config import ConfigError, make_config
from bnbench.train.engine import Trainer
from bnbench.training import training_function
from bnbench.store.results import SCHEMA, read_results

from conftest import REPO, make_setup, subset


def _run(cfg, out, splits, accelerator, on_trainer=None):
    return training_function(cfg, out, make_setup(accelerator, splits, on_trainer=on_trainer), quiet=True)


def test_results_schema_and_meta(tmp_path, accelerator, mnist_cpu):
    splits = subset(mnist_cpu["float32"], 2000, 700)
    cfg = make_config(seeds=(0, 1, 2), epochs=2)
    run_id = _run(cfg, tmp_path, splits, accelerator)
    # What a pandas user does; precise_float keeps every float exactly as written.
    df = pd.read_json(tmp_path / "results.jsonl", lines=True, precise_float=True)
    assert len(df) == 3 * 2 * 2
    assert set(SCHEMA) <= set(df.columns), set(SCHEMA) - set(df.columns)
    assert (df["run_id"] == run_id).all()
    assert sorted(df[["variant", "seed", "epoch"]].itertuples(index=False)) == sorted(
        (v, s, e) for v in ("bn", "nobn") for s in (0, 1, 2) for e in (1, 2)
    )
    assert (df["test_total"] == 700).all() and (df["train_total"] == 2000).all()
    assert (df["test_acc"] == df["test_correct"] / df["test_total"]).all()
    assert (df["step"] == df["epoch"] * 20).all()
    assert df["train_seconds"].gt(0).all() and df["samples_per_s"].gt(0).all()
    assert (df[["batch_size", "lr", "engine", "device", "world_size", "sync_bn"]].iloc[0].tolist() == [100, 1e-3, "stacked", "cpu", 1, False])
    meta = json.loads((tmp_path / "meta.json").read_text())["runs"][run_id]
    assert meta["status"] == "complete" and meta["config"] == cfg.to_dict()
    for key in ("versions", "hostname", "git_commit", "device", "device_name", "cpu", "data_sources"):
        assert meta[key], key
    assert meta["versions"]["torch"] == torch.__version__


def test_rows_are_on_disk_as_each_epoch_completes(tmp_path, accelerator, mnist_cpu, monkeypatch):
    splits = subset(mnist_cpu["float32"], 1000, 100)
    original = Trainer.train_steps

    def crash_in_epoch_3(self, stop, on_step=None):
        if self.steps_done == 2 * self.steps_per_epoch():
            # Rows of epochs 1-2 must already be durable when epoch 3 dies.
            assert len(read_results(tmp_path)[0]) == 2 * 2 * 2
            raise KeyboardInterrupt
        return original(self, stop, on_step)

    monkeypatch.setattr(Trainer, "train_steps", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(make_config(seeds=(0, 1), epochs=5), tmp_path, splits, accelerator)
    df, problems = read_results(tmp_path)
    assert problems == [] and sorted(df["epoch"].unique()) == [1, 2]
    (meta,) = json.loads((tmp_path / "meta.json").read_text())["runs"].values()
    assert meta["status"] == "interrupted"
    from bnbench.reporting.report import build_report

    build_report(tmp_path)  # the report says what is missing and why
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 of 5 epochs recorded" in md and "status interrupted (KeyboardInterrupt" in md


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_diverged_member_marked_others_untouched(tmp_path, accelerator, mnist_cpu, engine):
    splits = subset(mnist_cpu["float32"], 2000, 500)
    cfg = make_config(seeds=(0, 1, 2), epochs=2, engine=engine)

    def poison(trainer):
        # Make nobn/seed1 blow up as a diverging member would: NaN in one weight (through the
        # member's own view, wherever the engine keeps it).
        state = trainer.member_state("nobn", 1)
        state["0.weight"][0, 0] = float("nan")
        trainer.load_member_state("nobn", 1, state)

    _run(cfg, tmp_path / "clean", splits, accelerator)
    _run(cfg, tmp_path / "bad", splits, accelerator, on_trainer=poison)
    clean, _ = read_results(tmp_path / "clean")
    bad, _ = read_results(tmp_path / "bad")
    sick = (bad["variant"] == "nobn") & (bad["seed"] == 1)
    assert bad.loc[sick, "diverged"].all() and bad.loc[sick, "test_acc"].isna().all()
    assert not bad.loc[~sick, "diverged"].any()
    cols = ["train_loss", "train_acc", "test_loss", "test_acc", "train_loss_running"]
    # The others trained exactly as without the sick member: bitwise equal metrics.
    pd.testing.assert_frame_equal(
        bad.loc[~sick, cols].reset_index(drop=True), clean.loc[~((clean["variant"] == "nobn") & (clean["seed"] == 1)), cols].reset_index(drop=True), check_exact=True
    )


def test_unwritable_output_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded before the output was checked"))
    with pytest.raises(ConfigError, match="cannot be written"):
        training_function(make_config(epochs=1), blocker / "out", quiet=True)


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bnbench", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--preset", "lab"], "unknown preset 'lab'; valid: seed"),
        (["--variants", "bn,lnorm"], "unknown variant 'lnorm'; valid: bn, nobn, ln, gn, rms, brn"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'; valid: mnist, fashion-mnist"),
        (["--engine", "fast"], "unknown engine 'fast'; valid: stacked, reference"),
        (["--activation", "elu"], "unknown activation 'elu'"),
        (["--seeds", "0-"], "malformed --seeds '0-'"),
        (["--seeds", "3-1"], "runs backwards"),
        (["--seeds", "a,b"], "malformed --seeds 'a,b'"),
        (["--seeds", "1,1"], "listed twice"),
        (["--seeds", ""], "malformed --seeds"),
        (["--batch-size", "0"], "--batch-size: must be positive, got 0"),
        (["--batch-size=-5"], "--batch-size: must be positive"),
        (["--epochs", "0"], "--epochs: must be positive"),
        (["--epochs", "two"], "--epochs: expected a positive integer"),
        (["--lr", "0"], "--lr: must be a positive finite number"),
        (["--lr=-1e-3"], "--lr: must be a positive finite number"),
        (["--lr", "nan"], "--lr: must be a positive finite number"),
        (["--hidden", "32,x"], "malformed --hidden"),
        (["--hidden", "32,0"], "hidden must be one or more positive layer widths"),
        (["--batch-size", "70000"], "exceeds the 60000 training samples"),
        (["--momentum", "0.9"], "momentum applies to --optimizer sgd only"),
        (["--optimizer", "sgd", "--momentum", "1.5"], "momentum must be in [0, 1)"),
    ],
)
def test_bad_input_clear_error(tmp_path, data_root, args, expect, capsys, monkeypatch):
    """`bnbench run` in this process (cli.main, as the console script calls it): each case would
    otherwise pay a torch import (~3.5 s, 80 s for the list); the two cases below run the real
    console command."""
    import signal

    from bnbench import cli

    out = tmp_path / "out"
    monkeypatch.setenv("BNBENCH_DATA_ROOT", str(data_root))
    handler = signal.getsignal(signal.SIGTERM)  # cli.main installs its own
    try:
        rc = cli.main(["run", "--out", str(out), *args])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and "Traceback" not in err, err
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").stat().st_size == 0


@pytest.mark.parametrize("args, expect", [(["--seeds", "3-1"], "runs backwards"),
                                          (["--batch-size", "70000"], "exceeds the 60000 training samples")])
def test_bad_input_clear_error_from_the_console_command(tmp_path, data_root, args, expect):
    out = tmp_path / "out"
    p = _cli("run", "--out", str(out), *args, env={"BNBENCH_DATA_ROOT": str(data_root)}, timeout=180)
    assert p.returncode == 2, p.stdout + p.stderr
    assert expect in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").stat().st_size == 0


def test_config_validation_direct():
    for bad in (dict(batch_size=0), dict(epochs=-1), dict(lr=0.0), dict(lr=float("inf")), dict(seeds=()), dict(variants=("bn", "bn"))):
        with pytest.raises(ConfigError):
            make_config(**bad)


def test_help_lists_every_command():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("run", "sweep", "status", "export", "report", "data", "list"):
        assert cmd in p.stdout
    p = _cli("run", "--help")
    assert p.returncode == 0 and "--seeds" in p.stdout and "--data-root" in p.stdout


def test_cli_run_and_report_on_full_mnist(tmp_path, data_root):
    out = tmp_path / "r"
    p = _cli("run", "--epochs", "1", "--seeds", "0,1", "--out", str(out), "--report", env={"BNBENCH_DATA_ROOT": str(data_root)})
    assert p.returncode == 0, p.stderr
    df = pd.read_json(out / "results.jsonl", lines=True)
    assert len(df) == 4 and (df["test_total"] == 10000).all() and (df["train_total"] == 60000).all()
    assert (df.loc[df.variant == "bn", "test_acc"] > 0.9).all()
    assert (out / "report" / "report.html").exists()
    assert "report" in p.stdout


def test_refuses_the_silent_multiprocess_mode(tmp_path, data_root, monkeypatch, accelerator):
    # A launcher's rank handed a one-process Accelerator (as torchrun + Accelerator() gives
    # without a GPU): it would train alone on all the data.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("trained in the silent mode"))
    with pytest.raises(ConfigError, match="launcher started 2 processes but Accelerate sees 1"):
        training_function(make_config(epochs=1), tmp_path, make_setup(accelerator), quiet=True)


def test_readme_documents_every_column_and_command():
    readme = "".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    from bnbench.train.instruments import MEASURES
    from bnbench.store.results import INSTRUMENT_SCHEMA

    for col in [*SCHEMA, *INSTRUMENT_SCHEMA, *MEASURES]:
        assert f"`{col}`" in readme, f"README lacks the results column or measure {col}"
    for preset in ("ioffe2015", "deep"):
        assert f"`{preset}`" in readme, preset
    for cmd in ("bnbench run", "bnbench sweep", "bnbench status", "bnbench export", "bnbench report", "bnbench data",
                "bnbench list", "./launch.sh test", "./launch.sh sweep"):
        assert cmd in readme, cmd


def test_a_sigterm_while_the_failure_is_recorded_still_records_it(tmp_path, accelerator, mnist_cpu, monkeypatch):
    # A launcher that loses one rank SIGTERMs the others, often while they record their own failure
    # (seen in CI: the run stayed `running`). The status write finishes; the signal comes after it.
    import signal

    from bnbench import cli
    from bnbench.store import record

    def peer_gone(self, stop, on_step=None):
        raise RuntimeError("Connection closed by peer")

    real = record.update_meta

    def sigterm_mid_write(out_dir, run_id, meta, **kw):
        if meta.get("status") == "failed":
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's SIGTERM, arriving now
        real(out_dir, run_id, meta, **kw)

    monkeypatch.setattr(Trainer, "train_steps", peer_gone)
    monkeypatch.setattr(record, "update_meta", sigterm_mid_write)
    old = signal.signal(signal.SIGTERM, cli._on_sigterm)
    try:
        with pytest.raises(cli.Terminated):  # delivered once the write is done
            _run(make_config(seeds=(0,), epochs=1), tmp_path, subset(mnist_cpu["float32"], 600, 100), accelerator)
    finally:
        signal.signal(signal.SIGTERM, old)
    (meta,) = json.loads((tmp_path / "meta.json").read_text())["runs"].values()
    # Issue 29: the reason in plain words, gloo's own beside it.
    assert meta["status"] == "failed" and meta["error"] == "a peer process or machine was lost (the connection closed)"
    assert meta["detail"] == "RuntimeError: Connection closed by peer"
