"""launch/train.py under towers, dp and hybrid: checkpoints move between layouts and resume exactly."""

import pytest
import torch
from _helpers import TINY_FC_WIDTH, TINY_TRAIN, TRAIN, check, launch

from alexnet.model import build_model

pytestmark = pytest.mark.slow
# NCHW: with channels_last, the fused single-device convolutions and the split towers' ones
# break exact ties of max-pooling (flat image regions) differently, a legitimate difference of
# subgradients that grows to a few percent of the weights' movement in 10 steps; in NCHW both
# layouts stay within 0.1% of it. (The layouts' arithmetic is checked to 1e-10 in float64 by
# tests/test_layouts.py, in both memory formats.)
# 7 steps, the first epoch (2 data shards of 60 images, batch 8): an uninterrupted run checkpoints
# at step CUT too, which its epoch-end checkpoint at step 7 rotates into previous.pt; a second run
# resumes from that file (checkpoint.resume=) mid-epoch and crosses the epoch's end. The
# uninterrupted run's first 4 steps are thereby also the resumed run's: a launch less per resume.
STEPS, CUT = 7, 4
COMMON = ("train.epochs=2", f"train.max_steps={STEPS}", f"checkpoint.every_steps={CUT}", "schedule.name=cosine",
          "train.channels_last=false")  # fmt: skip


def train(tiny_data, tmp_path, name, mode, nproc, *extra):
    args = [
        TRAIN,
        *TINY_TRAIN,
        f"data.root={tiny_data}",
        f"run.root={tmp_path}",
        f"run.name={name}",
        f"parallel.mode={mode}",
        *COMMON,
        *extra,
    ]
    return launch(args, nproc=nproc)


def resume_from_cut(tmp_path, name):
    """checkpoint.resume= the step-CUT checkpoint of run `name`."""
    return f"checkpoint.resume={tmp_path / name / 'checkpoints' / 'previous.pt'}"


def weights(tmp_path, name, file="last.pt"):
    return torch.load(tmp_path / name / "checkpoints" / file, weights_only=True)


def initial_weights():
    torch.manual_seed(0)  # train.seed's default, as the trainer seeds it
    return build_model("paper", 10, 0.5, 67, "kaiming", TINY_FC_WIDTH).state_dict()


def assert_same_trajectory(a, b, start):
    """float32 under two layouts: the same sums in other orders, so each tensor is compared with
    how far the training moved it; the bound is 1% (a restart from scratch or a lost momentum
    differs by tens of percent)."""
    assert set(a["model"]) == set(b["model"]) == set(start)
    for name, value in a["model"].items():
        moved = (value - start[name]).norm()
        assert moved > 0, name
        assert (value - b["model"][name]).norm() <= 0.01 * moved, name


@pytest.mark.dali
def test_towers_checkpoint_resumes_under_dp_and_back(tiny_data, tmp_path):
    """2 replicas either way: towers with 4 ranks (2 pairs) or dp with 2 ranks read the same data
    shards, so a checkpoint of one continues in the other. Each switching run is held against
    the run that stays in its first layout, from whose step-4 checkpoint it resumed: the first 4
    steps are the same computation, and the layouts' float32 roundoff (1e-8 a step) is left 3
    steps to grow. (Held against the other layout's run from step 0, the roundoff of 10 steps can
    cross a max-pooling or ReLU tie on the tiny images' flat regions and grow to a few percent
    for some data orders.)"""
    check(train(tiny_data, tmp_path, "dp", "dp", 2))
    check(train(tiny_data, tmp_path, "towers", "towers", 4))
    half = weights(tmp_path, "towers", "previous.pt")
    assert half["progress"]["step"] == CUT
    assert half["world"] == {"world_size": 4, "data_size": 2, "mode": "towers"}
    assert "fc6.1.weight" in half["model"] and "fc6.0.weight" in half["model"]  # the whole model, one file
    check(train(tiny_data, tmp_path, "t2d", "dp", 2, resume_from_cut(tmp_path, "towers")))
    assert weights(tmp_path, "dp", "previous.pt")["progress"]["step"] == CUT
    proc = check(train(tiny_data, tmp_path, "d2t", "towers", 4, resume_from_cut(tmp_path, "dp")))
    assert "resumed from" in proc.stderr
    start = initial_weights()
    for name, stayed in (("t2d", "towers"), ("d2t", "dp")):
        other = weights(tmp_path, name)
        assert other["progress"]["step"] == STEPS
        assert other["world"]["mode"] != weights(tmp_path, stayed)["world"]["mode"]
        assert_same_trajectory(weights(tmp_path, stayed), other, start)
    assert not torch.equal(weights(tmp_path, "dp")["model"]["fc8.0.weight"], half["model"]["fc8.0.weight"])


def test_a_world_the_layout_cannot_use_is_refused(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "odd", "towers", 3)
    assert proc.returncode != 0
    assert "3 ranks: 3 = 1 x 2 + 1" in proc.stderr


@pytest.mark.dali
def test_hybrid_resumes_its_fc_slices_exactly(tiny_data, tmp_path):
    """hybrid with 2 ranks (one FC group of 2): each rank trains half of fc6-fc8's neurons. The
    checkpoint holds the whole single-device model, and 4 steps + resume + 3 end bit for bit as
    7 straight steps: the FC slices, their momentum and the convolutions' go back where they were."""
    check(train(tiny_data, tmp_path, "straight", "hybrid", 2))
    half = weights(tmp_path, "straight", "previous.pt")
    assert half["progress"]["step"] == CUT
    assert half["world"] == {"world_size": 2, "data_size": 2, "mode": "hybrid"}
    assert half["progress"]["trained_under"]["fc_group"] == 2  # parallel.fc_group=0 resolved: a resume compares it
    assert half["model"]["fc6.0.weight"].shape[0] + half["model"]["fc6.1.weight"].shape[0] == TINY_FC_WIDTH
    proc = check(train(tiny_data, tmp_path, "split", "hybrid", 2, resume_from_cut(tmp_path, "straight")))
    assert f"after step {CUT} (0 epochs completed)" in proc.stderr
    a, b = weights(tmp_path, "straight"), weights(tmp_path, "split")
    assert a["progress"]["step"] == b["progress"]["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    momentum_a, momentum_b = a["optimizer"]["momentum"], b["optimizer"]["momentum"]
    assert set(momentum_a) == set(momentum_b) == set(a["model"])  # by name, in the single-device layout
    assert all(torch.equal(momentum_a[k], momentum_b[k]) for k in momentum_a)


def test_a_resume_under_another_resolved_fc_group_says_it_is_no_longer_exact(caplog):
    """parallel.fc_group=0 follows the processes per node: a requeue from 2 x 2 onto 1 x 4 split
    the FC layers over 4 ranks instead of 2, and the run went on to float32 rounding with no word
    (no key changed, the global batch neither)."""
    from types import SimpleNamespace

    from alexnet.trainer import Trainer

    def resumed(now: int, under: dict, changes: list[str]) -> str:
        caplog.clear()
        mesh = SimpleNamespace(mode="hybrid", shape=SimpleNamespace(model_size=now))
        with caplog.at_level("WARNING", logger="alexnet"):
            Trainer._log_fc_group_change(SimpleNamespace(mesh=mesh), under, changes)
        return caplog.text

    said = resumed(4, {"parallel_mode": "hybrid", "fc_group": 2}, [])
    assert "FC layers were split over 2 ranks, this session's over 4" in said and "parallel.fc_group=2" in said
    assert resumed(2, {"parallel_mode": "hybrid", "fc_group": 2}, []) == ""
    assert resumed(4, {"parallel_mode": "hybrid"}, []) == ""  # a checkpoint from before it was recorded
    assert resumed(4, {"parallel_mode": "hybrid", "fc_group": 2}, ["parallel.fc_group: 2 -> 4"]) == ""  # said
    assert resumed(4, {"parallel_mode": "towers", "fc_group": 2}, ["parallel.mode: 'towers' -> 'hybrid'"]) == ""
