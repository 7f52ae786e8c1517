"""launch/train.py under towers and dp: checkpoints move between layouts."""
import pytest
import torch

from _helpers import TINY_TRAIN, TRAIN, check, torchrun

pytestmark = pytest.mark.slow
COMMON = ("train.epochs=2", "checkpoint.every_steps=0", "schedule.name=cosine")


def train(tiny_data, tmp_path, name, mode, nproc, *extra):
    args = [TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", f"run.name={name}",
            f"parallel.mode={mode}", *COMMON, *extra]
    return torchrun(args, nproc=nproc)


def weights(tmp_path, name):
    return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)


def assert_same_trajectory(a, b):
    """float32 under two layouts: the same sums in other orders (measured: ~1e-7 after 10 steps)."""
    assert set(a["model"]) == set(b["model"])
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=2e-5, msg=name)
    for name in a["optimizer"]["momentum"]:
        torch.testing.assert_close(a["optimizer"]["momentum"][name], b["optimizer"]["momentum"][name],
                                   rtol=0, atol=2e-4, msg=name)


def test_towers_checkpoint_resumes_under_dp_and_back(tiny_data, tmp_path):
    """2 replicas either way: towers with 4 ranks (2 pairs) or dp with 2 ranks read the same data
    shards, so the runs are the same training run; a checkpoint of one continues in the other."""
    check(train(tiny_data, tmp_path, "dp", "dp", 2, "train.max_steps=10"))
    check(train(tiny_data, tmp_path, "t2d", "towers", 4, "train.max_steps=5"))
    half = weights(tmp_path, "t2d")
    assert half["world"] == {"world_size": 4, "data_size": 2, "mode": "towers"}
    assert "fc6.1.weight" in half["model"] and "fc6.0.weight" in half["model"]  # the whole model, one file
    check(train(tiny_data, tmp_path, "t2d", "dp", 2, "train.max_steps=10"))
    check(train(tiny_data, tmp_path, "d2t", "dp", 2, "train.max_steps=5"))
    proc = check(train(tiny_data, tmp_path, "d2t", "towers", 4, "train.max_steps=10"))
    assert "resumed from" in proc.stderr
    reference = weights(tmp_path, "dp")
    for name in ("t2d", "d2t"):
        other = weights(tmp_path, name)
        assert other["progress"]["step"] == 10
        assert_same_trajectory(reference, other)
    assert not torch.equal(reference["model"]["fc8.0.weight"], half["model"]["fc8.0.weight"])


def test_a_world_the_layout_cannot_use_is_refused(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "odd", "towers", 3)
    assert proc.returncode != 0
    assert "3 ranks: 3 = 1 x 2 + 1" in proc.stderr
