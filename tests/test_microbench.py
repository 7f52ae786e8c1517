"""launch/microbench.py: the A/B order, the chunk budget put back, another version's LRN loaded."""

from __future__ import annotations

import sys

import pytest
import torch
from _helpers import REPO

from alexnet import layers

sys.path.insert(0, str(REPO / "launch"))
import microbench  # noqa: E402


def test_interleave_alternates_the_order_and_times_every_round():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = microbench.interleave(contenders, rounds=3, repeats=2)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    untimed, rounds = calls[:3], calls[3:]
    assert untimed == ["a", "b", "c"]
    # each contender twice per round; every other round in reverse, so none always goes first
    assert rounds == ["a", "a", "b", "b", "c", "c"] + ["c", "c", "b", "b", "a", "a"] + ["a", "a", "b", "b", "c", "c"]


def test_swapped_sets_the_attribute_for_the_call_only_even_when_it_fails():
    class Owner:
        value = "kept"

    seen: list[str] = []
    microbench.swapped(Owner, "value", "during", lambda: seen.append(Owner.value))()
    assert seen == ["during"] and Owner.value == "kept"

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        microbench.swapped(Owner, "value", "during", fail)()
    assert Owner.value == "kept"


def test_lrn_chunks_leaves_the_chosen_budget(capsys):
    chosen = layers.CPU_CHUNK_BYTES
    microbench.main(["lrn-chunks", "--batch", "1", "--rounds", "1"])
    assert layers.CPU_CHUNK_BYTES == chosen
    out = capsys.readouterr().out
    assert f"chosen: {chosen >> 10} KiB" in out and "whole batch" in out


def test_reference_layers_come_from_the_given_file(tmp_path):
    copy = tmp_path / "layers_copy.py"
    copy.write_text((REPO / "alexnet" / "layers.py").read_text())
    other = microbench.load_layers(copy)
    assert other.LocalResponseNorm is not layers.LocalResponseNorm
    x = torch.rand(2, 8, 3, 3) * 40
    ours = layers.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    theirs = other.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    assert torch.equal(ours(x, 2), theirs(x, 2))
    with pytest.raises(SystemExit, match="missing.py: no such Python file"):
        microbench.load_layers(tmp_path / "missing.py")


def test_the_default_sgd_contender_differs_only_in_the_kernel():
    from alexnet.config import OptimConfig
    from alexnet.optim import build_optimizer

    model = torch.nn.Linear(3, 3)
    fused = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.01)
    default = microbench.default_sgd_like(fused)
    assert [g["fused"] for g in default.param_groups] == [None, None]
    keys = ("params", "lr", "momentum", "weight_decay", "dampening", "nesterov", "name")
    for a, b in zip(fused.param_groups, default.param_groups):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_lrn_floor_runs_the_paper_model_without_its_lrn_only_in_that_contender(monkeypatch, capsys):
    calls: list[int] = []
    real_forward = layers.LocalResponseNorm.forward

    def counting(self, x, groups=1):
        calls.append(groups)
        return real_forward(self, x, groups)

    monkeypatch.setattr(layers.LocalResponseNorm, "forward", counting)
    microbench.main(["lrn-floor", "--batch", "1", "--rounds", "1"])
    # one untimed and three timed steps of the real paper model, two LRN layers each; none from
    # the identity contender (with it not swapped in, there would be twice as many)
    assert calls == [2] * 2 * (1 + 3)
    out = capsys.readouterr().out
    assert "paper is " in out and "paper, LRN = identity is " in out
    assert out.count("as fast as torchvision.models.alexnet") == 2
    x = torch.rand(2, 4, 3, 3)
    assert microbench.IdentityLRN()(x, 2) is x
