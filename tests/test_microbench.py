"""launch/microbench.py: the A/B order, the chunk budget put back, another version's LRN loaded,
bad counts and reference files refused, the ratio line named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _helpers import REPO

from alexnet import layers

sys.path.insert(0, str(REPO / "launch"))
import microbench  # noqa: E402

MICROBENCH = REPO / "launch" / "microbench.py"
DEFAULT_ROUNDS = {"lrn-chunks": 13, "lrn-step": 9, "sgd-step": 9, "lrn-floor": 9}  # --rounds when not given


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
    other = microbench.load_layers(copy, "LocalResponseNorm")
    assert other.LocalResponseNorm is not layers.LocalResponseNorm
    x = torch.rand(2, 8, 3, 3) * 40
    ours = layers.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    theirs = other.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    assert torch.equal(ours(x, 2), theirs(x, 2))
    with pytest.raises(microbench.ReferenceLayersError, match="missing.py: no such Python file"):
        microbench.load_layers(tmp_path / "missing.py", "LocalResponseNorm")


def test_a_reference_file_without_the_lrn_is_refused_in_one_line(tmp_path):
    other = tmp_path / "notlayers.py"
    other.write_text("x = 1\n")
    args = ["lrn-step", "--batch", "1", "--rounds", "1", "--reference-layers", str(other)]
    proc = subprocess.run([sys.executable, str(MICROBENCH), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr == f"error: --reference-layers {other}: defines no LocalResponseNorm (not an alexnet/layers.py?)\n"
    )
    assert proc.stdout == ""  # refused before any model was built or timed


def test_a_bad_count_is_refused_by_the_script_in_one_line():
    cmd = [sys.executable, str(MICROBENCH), "sgd-step", "--batch", "0", "--rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""  # it timed empty batches and printed their ratio
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["microbench.py sgd-step: error: argument --batch: must be >= 1, got 0"]


@pytest.mark.parametrize("command", list(DEFAULT_ROUNDS))
@pytest.mark.parametrize("option", ["--batch", "--rounds"])
@pytest.mark.parametrize(("value", "why"), [("0", "must be >= 1, got 0"), ("-1", "must be >= 1, got -1"),
                                            ("2.5", "must be a whole number >= 1, got '2.5'")])  # fmt: skip
def test_every_count_must_be_a_positive_whole_number(command, option, value, why, tmp_path, capsys):
    # 0 rounds ended in a StatisticsError, a batch of -1 in a torch RuntimeError, 0 timed nothing
    args = [command, "--batch", "1", "--rounds", "1", option, value]
    if command == "lrn-step":
        args += ["--reference-layers", str(tmp_path / "layers.py")]
    with pytest.raises(SystemExit) as exit_info:
        microbench.main(args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1  # in-process, argparse names the program after sys.argv[0]
    assert errors[0].endswith(f" {command}: error: argument {option}: {why}")


@pytest.mark.parametrize("command", list(DEFAULT_ROUNDS))
def test_every_option_says_what_it_does_and_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        microbench.main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    rounds = DEFAULT_ROUNDS[command]
    assert "--batch BATCH images per batch, >= 1 (default 32)" in help_text
    assert (
        f"--rounds ROUNDS timed rounds, >= 1; the order of the contenders alternates every round (default {rounds})"
        in help_text
    )
    if command == "lrn-step":
        assert "--reference-layers FILE another version's alexnet/layers.py" in help_text


def test_the_ratio_line_names_the_median_of_the_per_round_ratios():
    # made up so that the two figures disagree: medians 1.400 vs 1.425 s (1.018x), while b took
    # 1.2x a's time in two of the three rounds
    times = {"fused": [1.0, 1.5, 1.4], "default": [1.2, 1.425, 1.68]}
    line = microbench.format_ratio(times, "fused", "default")
    assert line == "  fused is 1.200x as fast as default (median of the per-round ratios; per round 0.950-1.200)"
    one_round = microbench.format_ratio({"a": [2.0], "b": [3.0]}, "a", "b")
    assert one_round == "  a is 1.500x as fast as b (median of the per-round ratios; a single round)"


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


def test_budgets_that_chunk_alike_are_one_row_named_with_their_chunks():
    """512 KiB and 1 MiB both chunk conv1's LRN input (1.16 MB a sample) one sample at a time:
    two rows timed the same thing, and at batch 1 all six did, without a word."""

    def inputs(batch):
        return [torch.zeros(batch, c, side, side) for c, side in microbench.LRN_SHAPES]

    assert list(microbench.chunk_budgets(inputs(1))) == [
        "512 KiB = 1024 KiB = 2048 KiB = 4096 KiB = 8192 KiB = whole batch (1/1)"
    ]
    rows = microbench.chunk_budgets(inputs(32))
    # conv2's input is 256 x 27 x 27 x 4 bytes = 746,496 a sample
    assert rows == {"512 KiB = 1024 KiB (1/1)": 1 << 19, "2048 KiB (1/2)": 2 << 20, "4096 KiB (3/5)": 4 << 20,
                    "8192 KiB (7/11)": 8 << 20, "whole batch (32/32)": 1 << 62}  # fmt: skip
    assert layers.CPU_CHUNK_BYTES == 2 << 20  # put back


@pytest.mark.parametrize("text, said", [("def (\n", "SyntaxError: invalid syntax"), ("import sys\nsys.exit(3)\n",
                                                                                    "SystemExit: 3")])  # fmt: skip
def test_a_reference_file_that_does_not_load_is_refused_in_one_line(tmp_path, text, said):
    """A syntax error, or a script that exits or fails at its top level, ended in a traceback."""
    other = tmp_path / "script.py"
    other.write_text(text)
    with pytest.raises(microbench.ReferenceLayersError, match=f"script.py: cannot be loaded as a module \\({said}"):
        microbench.load_layers(other, "LocalResponseNorm")
