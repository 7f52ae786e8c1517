"""Gradient clipping and fp16 loss scaling decide once for the whole model: a split model clips
by the single-device model's global norm, and one rank's overflow skips the step on every rank."""

import json

import pytest
from _helpers import REPO, launch_per_world

pytestmark = pytest.mark.slow

# (mode, world, fc_group): every layout on 2 ranks; on 4 ranks, the layouts whose replicas hold
# identical copies of a rank's unique parameters (a tower, an FC slice), which the global norm
# must count once.
RUNS = [("towers", 2, 0), ("hybrid", 2, 0), ("dp", 2, 0), ("towers", 4, 0), ("hybrid", 4, 2)]
SCALER_RUNS = ["scaler_clip0.0", "scaler_clip0.05"]
CLIP = 0.05


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The output folder of a world size's runs; the runs of a world size share one launch."""
    runs = {}
    for mode, world, fc_group in RUNS:
        runs.setdefault(world, []).append(f"{mode}:{fc_group}")
    return launch_per_world(tmp_path_factory, REPO / "tests" / "dist" / "clip_scaler_check.py", runs)


@pytest.fixture(scope="module", params=RUNS, ids=lambda r: f"{r[0]}-{r[1]}ranks")
def results(request, launches) -> tuple[str, list[dict]]:
    """One run per layout; every test below reads its per-rank results."""
    mode, world, fc_group = request.param
    out = launches(world) / f"{mode}:{fc_group}"
    return mode, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_clipped_steps_match_the_single_device_model(results):
    mode, ranks = results
    for r in ranks:
        clip = r["clip"]
        # The clip bit on every step (otherwise this compares unclipped steps).
        assert all(abs(n - CLIP) <= 1e-6 * CLIP for n in clip["clipped_norms"]), clip["clipped_norms"]
        assert clip["weights_moved"] > 1e-4
        # float64: summation orders only (per-rank clip coefficients left them ~5e-4 apart).
        assert clip["weights_after_steps"] <= 1e-10, (mode, r["rank"], clip["weights_after_steps"])


@pytest.mark.parametrize("run", SCALER_RUNS)
def test_one_ranks_overflow_or_nan_loss_skips_the_step_everywhere(results, run):
    mode, ranks = results
    records = [r[run] for r in ranks]
    # Steps: normal, overflow in one gradient on rank 1, NaN loss on rank 1, normal.
    for rec in records:
        assert rec["applied"] == [True, False, False, True], (mode, rec)
        assert rec["weights_changed"] == [True, False, False, True], (mode, rec)
        # The overflow is the scaler's back-off (scale above 1), not counted toward
        # train.max_nonfinite; the NaN loss is counted.
        assert rec["overflow"] == [False, True, False, False], (mode, rec)
        assert rec["streak"] == [0, 0, 1, 0], (mode, rec)
        # The overflow backs the scale off once; a non-finite loss leaves it alone.
        assert rec["scale"] == [65536.0, 32768.0, 32768.0, 32768.0], (mode, rec)
    assert all(rec == records[0] for rec in records)


def test_an_inf_gradient_under_clipping_skips_the_step_everywhere_without_a_scaler(results):
    """fp32 with train.grad_clip: the global norm sees one rank's inf gradient, and every rank
    skips the step (clipping by an inf norm would turn every weight into NaN)."""
    mode, ranks = results
    records = [r[f"fp32_clip{CLIP}"] for r in ranks]
    for rec in records:
        assert rec["applied"] == [True, False, False, True], (mode, rec)
        assert rec["weights_changed"] == [True, False, False, True], (mode, rec)
        assert rec["overflow"] == [False] * 4, (mode, rec)  # no scaler: an inf gradient is the run's own
        assert rec["streak"] == [0, 1, 2, 0], (mode, rec)
    assert all(rec == records[0] for rec in records)
