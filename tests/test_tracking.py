"""--log-with: live curves through Accelerate's trackers, read back from real TensorBoard event files."""
from __future__ import annotations

import pytest

from bnbench.config import ConfigError, make_config
from bnbench.store.results import read_results
from bnbench.training import training_function
from bnbench.store.tracking import check_trackers

from conftest import make_setup, subset


def test_tensorboard_scalars_equal_the_results_rows(tmp_path, mnist_cpu):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    accelerator = Accelerator(cpu=True, log_with=check_trackers(["tensorboard"]), project_dir=str(out))
    cfg = make_config(seeds=(0, 1), epochs=2, eval_every=5, batch_size=50)
    run_id = training_function(cfg, out, make_setup(accelerator, subset(mnist_cpu["float32"], 500, 200)), quiet=True)
    rows, problems = read_results(out)
    assert problems == [] and len(rows) == 2 * 2 * 4  # 4 windows of 5 steps
    events = EventAccumulator(str(out / run_id), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for r in rows.itertuples():
        for metric in ("test_acc", "test_loss", "train_acc", "train_loss"):
            logged = {e.step: e.value for e in events.Scalars(f"{r.variant}/seed{r.seed}/{metric}")}
            assert logged[r.step] == pytest.approx(getattr(r, metric), rel=1e-6)  # TensorBoard stores float32
    for (variant, step), g in rows.groupby(["variant", "step"]):
        logged = {e.step: e.value for e in events.Scalars(f"{variant}/mean/test_acc")}
        assert logged[step] == pytest.approx(g["test_acc"].mean(), rel=1e-6)
    assert {e.step for e in events.Scalars("throughput/member_samples_per_s")} == set(rows["step"])
    assert len(tags) == 2 * 2 * 4 + 2 * 4 + 1  # members x metrics, variant means, throughput: nothing else


def test_a_tracker_that_is_not_installed_or_unknown_is_an_error_before_training():
    with pytest.raises(ConfigError, match="unknown tracker tensorbored"):
        check_trackers(["tensorbored"])
    from accelerate.tracking import get_available_trackers

    have = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = next(n for n in ("clearml", "aim", "comet_ml", "dvclive", "swanlab") if n not in have)
    with pytest.raises(ConfigError, match=f"--log-with {missing}: not installed"):
        check_trackers([missing])
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
