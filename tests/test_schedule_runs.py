"""The learning-rate schedules inside training runs: which validations the plateau counts, what a
resume that changes the schedule says, and where summary.json puts the best validation."""

from __future__ import annotations

import pytest
import torch
from _helpers import SYNTHETIC_TRAIN

from alexnet.config import load_config
from alexnet.metrics import read_metrics
from alexnet.run import run_training


def run(tmp_path, name: str, *overrides: str) -> dict:
    cfg = load_config(None, [*SYNTHETIC_TRAIN, f"run.root={tmp_path}", f"run.name={name}", *overrides])
    return run_training(cfg, None)


def saved_schedule(tmp_path, name: str) -> dict:
    return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["schedule"]


# min_delta 99.9: no validation after the first can count as an improvement, so each one the
# plateau counts (patience 1) divides the rate.
NEVER_IMPROVES = ["schedule.name=plateau", "schedule.patience=1", "schedule.min_delta=99.9"]


def test_the_plateau_counts_only_the_validations_of_its_cadence(tmp_path, capfd):
    """The last epoch is validated also off the cadence of train.eval_every: a 4-epoch run at
    eval_every=3 validates epochs 3 and 4. The plateau counted epoch 4's, one epoch after epoch
    3's, so that the run extended to 6 epochs trained its last two at a tenth of the rate of a
    6-epoch run, which validates epochs 3 and 6 only."""
    summary = run(tmp_path, "cadence", *NEVER_IMPROVES, "train.epochs=4", "train.eval_every=3")
    val = [r["epoch"] for r in read_metrics(tmp_path / "cadence" / "metrics.jsonl") if r["split"] == "val"]
    assert val == [3, 4]
    assert saved_schedule(tmp_path, "cadence")["reductions"] == 0
    assert "learning rate divided" not in capfd.readouterr().err
    assert summary["best_epoch"] in (3, 4) and summary["best_top1"] is not None


def test_a_validation_on_the_cadence_is_counted_also_at_the_run_s_end(tmp_path, capfd):
    """The last epoch's validation on the cadence counts, as it would in a longer run (which an
    extension of this one must equal); the log says that no epoch of this run is left for it."""
    run(tmp_path, "end", *NEVER_IMPROVES, "train.epochs=2")
    assert saved_schedule(tmp_path, "end")["reductions"] == 1
    err = capfd.readouterr().err
    assert "learning rate divided (reduction 1 of 3), for the epochs of a longer run" in err


def test_a_resume_that_moves_the_rate_says_by_how_much(tmp_path, capfd):
    """A finished 2-epoch cosine run (4 steps) extended to 4 epochs: step 5 trains at half the
    peak (0.01 x 4 / 128 = 3.125e-4), where the 2-epoch schedule had reached 0; only the key's
    change was said."""
    run(tmp_path, "cos", "schedule.name=cosine", "train.epochs=2")
    capfd.readouterr()
    run(tmp_path, "cos", "schedule.name=cosine", "train.epochs=4")
    err = capfd.readouterr().err
    assert "train.epochs: 2 -> 4" in err
    assert "the learning rate of step 5 is 0.0001563 under these settings, 0 under the checkpoint's (a cosine " \
           "spreads over train.epochs)" in err  # fmt: skip
    lrs = [r["lr"] for r in read_metrics(tmp_path / "cos" / "metrics.jsonl") if r["split"] == "train"]
    assert lrs[-1] < 0.00015625  # the rate decays again from there (the records' rate: each window's last step)
    capfd.readouterr()
    run(tmp_path, "cos", "schedule.name=cosine", "train.epochs=4", "train.log_every=1")  # nothing changes it
    assert "the learning rate of step" not in capfd.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_summary_names_the_epoch_of_the_best_validation(tmp_path, schedule):
    summary = run(tmp_path, schedule, f"schedule.name={schedule}", "train.epochs=3")
    val = [r for r in read_metrics(tmp_path / schedule / "metrics.jsonl") if r["split"] == "val"]
    best = max(val, key=lambda r: (r["top1"], r["top5"], -r["epoch"]))  # a tie: the first
    assert summary["best_epoch"] == best["epoch"] and summary["best_top1"] == best["top1"]


def test_a_checkpoint_from_before_the_multiplier_keeps_its_rate_under_a_changed_factor(tmp_path, capfd):
    """A checkpoint written before the plateau's multiplier was kept, resumed with another
    schedule.factor: the multiplier was rebuilt from this run's factor (0.5 ** 1 for a reduction
    made at 0.1), so the rate went up fivefold, and the rate-change check, given the same state
    for both schedules, said nothing."""
    run(tmp_path, "old", *NEVER_IMPROVES, "train.epochs=2")  # one reduction, at the end of epoch 2
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["schedule"]["reductions"] == 1 and payload["schedule"].pop("multiplier") == pytest.approx(0.1)
    torch.save(payload, path)
    run(tmp_path, "old", *NEVER_IMPROVES, "train.epochs=3", "schedule.factor=0.5", "train.log_every=1")
    epoch_3 = [r["lr"] for r in read_metrics(tmp_path / "old" / "metrics.jsonl") if r["split"] == "train"][-2:]
    assert epoch_3 == pytest.approx([0.01 * 4 / 128 * 0.1] * 2)  # the rate reached, not 0.5 of the peak
    assert "schedule.factor: 0.1 -> 0.5" in capfd.readouterr().err


def test_run_plot_false_leaves_the_curves_to_plot_run(tmp_path):
    """run.plot=false: summary.json and the closing lines, no training_curves.png (a sweep of
    short runs saves the plot's 1-2 s per session); the default draws it."""
    from alexnet.report import PLOT_FILE

    run(tmp_path, "quiet", "train.epochs=1")
    assert (tmp_path / "quiet" / "summary.json").is_file() and not (tmp_path / "quiet" / PLOT_FILE).exists()
    run(tmp_path, "drawn", "train.epochs=1", "run.plot=true")
    assert (tmp_path / "drawn" / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
