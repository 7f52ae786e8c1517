"""parallel.comm_hook=powersgd under torchrun with 2 gloo ranks: the compressed steps finish, send
less, and change the trajectory only from the first compressed step on."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import REPO, TINY_TRAIN, TRAIN, check, launch

from alexnet.metrics import read_metrics
from alexnet.powersgd_checkpoint import remove_stale_powersgd_state

pytestmark = pytest.mark.slow
STEPS = 6  # PowerSGD starts compressing at step 3 (start_powerSGD_iter=2)
RESUMED_STEPS = 9  # the resume's runs: 4 steps, a stop, 5 more (across the epoch's end at step 7)


def launch_or_fail(args, timeout=90):
    """`launch` that fails on a hang (its timeout kills the ranks, blocked in a collective)."""
    try:
        return launch(args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no result within {timeout} s: a hung collective")


# The settings of every training run below: 1 MB buckets make 8 buckets per step, so several
# compressed chains would be in flight at once without the fix (on gloo that aborted on mismatched
# all-reduces, or hung for good); every step logged, for the per-step records; 2 epochs of 7 steps.
COMMON = ["train.epochs=2", "train.log_every=1", "checkpoint.every_steps=0", "parallel.bucket_cap_mb=1",
          "parallel.timeout_s=30"]  # fmt: skip


def train_run(tiny_data, run_root, name, steps, *extra):
    run = [f"data.root={tiny_data}", f"run.root={run_root}", f"run.name={name}", f"train.max_steps={steps}"]
    return check(launch_or_fail([TRAIN, *TINY_TRAIN, *COMMON, *run, *extra]))


def train_records(run_root, name, steps):
    records = [r for r in read_metrics(run_root / name / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    return records


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    """The run root of PowerSGD's uninterrupted run of RESUMED_STEPS steps ("straight"): the
    compressed steps of the first test and the reference of the resume's (one launch, not two)."""
    root = tmp_path_factory.mktemp("powersgd_straight")
    train_run(tiny_data, root, "straight", RESUMED_STEPS, "parallel.comm_hook=powersgd")
    return root


@pytest.mark.dali
def test_powersgd_compresses_from_step_3_and_finishes(tiny_data, tmp_path, straight):
    train_run(tiny_data, tmp_path, "plain", STEPS, "parallel.comm_hook=none")
    plain = train_records(tmp_path, "plain", STEPS)
    psgd = train_records(straight, "straight", RESUMED_STEPS)
    assert all(math.isfinite(r["loss"]) for r in psgd)

    sent = [r["comm_sent_mb"]["grad_allreduce"] for r in psgd]
    full = plain[0]["comm_sent_mb"]["grad_allreduce"]
    assert sent[0] == sent[1] == pytest.approx(full)  # two warm-up steps of plain all-reduce
    assert all(0 < s < full / 20 for s in sent[2:]), sent  # rank-4 factors: about 3% of the gradients

    # Steps 1-2 all-reduce exactly as the plain hook does, so the losses up to step 3 (computed
    # before its update) are bitwise those of the plain run; step 3's compressed gradient then
    # moves the weights elsewhere, which shows the compressed path really ran (steps 4-6).
    losses = [r["loss"] for r in psgd]
    assert losses[:3] == [r["loss"] for r in plain[:3]]
    assert all(a != b for a, b in zip(losses[3:STEPS], (r["loss"] for r in plain[3:]))), losses


def test_a_skipped_step_does_not_poison_powersgd(tmp_path):
    """A non-finite loss on one rank, two steps into compression: PowerSGD's residual and factors
    have taken the NaN gradients in. Dropped after the skip (what the trainer does), the next
    steps apply with finite weights; kept, the next step's gradients are NaN (applied: without a
    loss scaler or clipping nothing checks gradients), the weights turn NaN, and every later
    loss is non-finite until max_nonfinite ends the run."""
    check(launch([REPO / "tests" / "dist" / "powersgd_skip.py", tmp_path], nproc=2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["forget"]["compressed"]
        assert r["forget"]["applied"] == [True] * 4 + [False] + [True] * 3
        assert r["forget"]["finite"]
        assert not r["keep"]["finite"] and r["keep"]["applied"][6:] == [False, False]  # the hazard


@pytest.mark.dali
def test_a_resume_with_powersgd_carries_its_state_and_equals_the_straight_run(tiny_data, tmp_path, straight):
    """9 steps straight (the module's run) against 4, a stop, and 5 more, two steps into
    compression at the cut: each rank's error-feedback residual and factors go into its own file
    beside the checkpoint and come back, so the weights are bitwise those of the straight run.
    Without one rank's file every rank starts PowerSGD afresh, says so, and trains elsewhere."""

    def train(name, steps, *extra):
        return train_run(tiny_data, tmp_path, name, steps, "parallel.comm_hook=powersgd", *extra)

    def weights(name, root=tmp_path):
        return torch.load(root / name / "checkpoints" / "last.pt", weights_only=True)["model"]

    train("resumed", 4)
    for rank in (0, 1):
        saved = torch.load(tmp_path / "resumed" / "checkpoints" / "powersgd" / f"rank{rank}" / "last.pt",
                           weights_only=True)  # fmt: skip
        assert saved["step"] == 4 and saved["state"]["iter"] == 4
        assert set(saved["state"]["error"]) == set(weights("resumed"))  # every parameter's residual
        assert saved["state"]["q"]  # and the warm-start factors of the compressed ones
    shutil.copytree(tmp_path / "resumed", tmp_path / "lost")
    (tmp_path / "lost" / "checkpoints" / "powersgd" / "rank1" / "last.pt").unlink()
    # A rank of an earlier, larger world: no resume of this 2-rank run can take its state any more.
    shutil.copytree(tmp_path / "lost" / "checkpoints" / "powersgd" / "rank0", tmp_path / "lost" / "checkpoints"
                    / "powersgd" / "rank3")  # fmt: skip
    shutil.copytree(tmp_path / "resumed", tmp_path / "flipped")

    resumed = train("resumed", RESUMED_STEPS)
    assert "PowerSGD starts afresh" not in resumed.stderr
    reference = weights("straight", straight)
    assert all(torch.equal(reference[k], v) for k, v in weights("resumed").items())

    lost = train("lost", RESUMED_STEPS)
    assert "PowerSGD starts afresh" in lost.stderr and "rank 1: " in lost.stderr and "does not exist" in lost.stderr
    assert not torch.equal(reference["fc6.0.weight"], weights("lost")["fc6.0.weight"])
    assert sorted(p.name for p in (tmp_path / "lost" / "checkpoints" / "powersgd").iterdir()) == ["rank0", "rank1"]

    # The residual is in the gradients' memory order (NHWC under channels_last): another memory
    # format would add each conv's residual to the wrong elements, so it starts afresh instead;
    # so does another precision (under fp16 the residual is loss-scaled), said once for both ranks.
    flipped = train("flipped", 5, "train.channels_last=false", "train.amp=bf16")
    assert "PowerSGD starts afresh" in flipped.stderr
    assert ("every rank: its state was written under channels_last True and amp 'off'; this run has False and "
            "'bf16'") in flipped.stderr  # fmt: skip


def test_state_files_no_resume_can_take_are_removed_after_a_checkpoint(tmp_path):
    """A run shrunk from 4 ranks to 2 kept ranks 2 and 3's files, one turned to comm_hook=none
    all four: as large as the gradients each (244 MB per rank at ImageNet shapes), never read."""
    for rank in range(4):
        (tmp_path / "powersgd" / f"rank{rank}").mkdir(parents=True)
        (tmp_path / "powersgd" / f"rank{rank}" / "last.pt").write_bytes(b"state")
    (tmp_path / "powersgd" / "notes.txt").write_text("a user's")
    (tmp_path / "powersgd" / "12").mkdir()  # not a rank's
    remove_stale_powersgd_state(tmp_path, world_size=2, in_use=True)
    assert sorted(p.name for p in (tmp_path / "powersgd").iterdir()) == ["12", "notes.txt", "rank0", "rank1"]
    remove_stale_powersgd_state(tmp_path, world_size=2, in_use=False)
    assert sorted(p.name for p in (tmp_path / "powersgd").iterdir()) == ["12", "notes.txt"]
    (tmp_path / "powersgd" / "notes.txt").unlink()
    (tmp_path / "powersgd" / "12").rmdir()
    remove_stale_powersgd_state(tmp_path, world_size=2, in_use=False)
    assert not (tmp_path / "powersgd").exists()
    remove_stale_powersgd_state(tmp_path, world_size=2, in_use=False)  # none there: nothing to do


def test_a_resumed_session_all_reduces_as_the_straight_run_on_4_ranks(tmp_path):
    """DDP's first step in one bucket rounds otherwise on more than two ranks: a resumed session
    settles its buckets first (the trainer does; twice under parallel.static_graph), and equals
    the straight run bitwise with a plain all-reduce and with PowerSGD's state carried over (dp
    and hybrid)."""
    check(launch([REPO / "tests" / "dist" / "resume_buckets.py", tmp_path], nproc=4, timeout=240))
    for rank in range(4):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in ("plain_static_graph", "powersgd", "hybrid_powersgd"):
            assert result[case] == {"equal": True, "max_diff": 0.0}, (rank, case, result)


@pytest.mark.dali
def test_a_powersgd_state_that_one_rank_cannot_write_stops_every_rank_with_its_reason(tiny_data, tmp_path):
    """Rank 1's folder for its state cannot be made (a file stands in its place): rank 1 failed
    alone, with its own error, while rank 0 waited in the checkpoint's gather (until torchrun
    killed it, or the collective timeout). Every rank now stops at that checkpoint with rank 1's
    reason, and no last.pt goes ahead of the states."""
    blocked = tmp_path / "blocked" / "checkpoints" / "powersgd" / "rank1"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    args = [TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=blocked",
            "train.epochs=1", "train.max_steps=3", "checkpoint.every_steps=2", "parallel.comm_hook=powersgd",
            "parallel.timeout_s=30"]  # fmt: skip
    proc = launch_or_fail(args)
    assert proc.returncode != 0
    assert "PowerSGD's state could not be written (rank 1: cannot write" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "blocked" / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "blocked" / "checkpoints" / "powersgd" / "rank0" / "last.pt").is_file()


def test_a_saved_powersgd_state_is_checked_before_any_rank_loads_it():
    """What `problem` refuses (so that no rank fails alone after the others went on), and the
    round trip of a good state: iteration, generator and pieces come back as saved."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from alexnet.parallel.powersgd_state import PowerSGDCarry

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ps = PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    carry = PowerSGDCarry.for_module(model)
    ps.iter, _ = 7, ps.rng.randint(10, size=3)  # a generator moved on from its seed
    carry.error = {"0.weight": torch.arange(2048.0), "0.bias": torch.ones(32)}
    carry.q = {"0.weight": torch.full((128,), 0.5)}  # 64 columns x rank 2
    good = carry.state_dict(ps)
    assert carry.problem(ps, good) == ""

    fresh_ps, fresh = (
        PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2),
        PowerSGDCarry.for_module(model),
    )
    fresh.load_state_dict(fresh_ps, good, torch.device("cpu"))
    assert fresh_ps.iter == 7 and fresh_ps.rng.randint(1 << 30) == ps.rng.randint(1 << 30)
    assert torch.equal(fresh.error["0.weight"], torch.arange(2048.0))
    assert torch.equal(fresh.q["0.weight"], torch.full((128,), 0.5))

    def broken(change):
        state = {**good, "error": dict(good["error"]), "q": dict(good["q"]), "rng": dict(good["rng"])}
        change(state)
        return carry.problem(ps, state)

    assert (
        broken(lambda s: s["error"].update({"0.weight": torch.zeros(5)})) == "residual of 0.weight: 5 values, not 2048"
    )
    assert broken(lambda s: s["q"].update({"0.weight": torch.zeros(64)})) == "Q factor of 0.weight: 64 values, not 128"
    assert (
        broken(lambda s: s["q"].update({"0.bias": torch.zeros(2)}))
        == "a Q factor of 0.bias, which PowerSGD does not compress"
    )
    assert "does not have" in broken(lambda s: s["error"].update({"fc9.weight": torch.zeros(1)}))
    assert broken(lambda s: s.pop("rng")).startswith("no 'rng'")
    assert broken(lambda s: s["rng"].update(keys=torch.zeros(3, dtype=torch.int64))).startswith("a malformed state")


@pytest.mark.usefixtures("gloo_world_of_one")
def test_a_rank_too_high_to_compress_anything_is_named_once(caplog):
    """parallel.powersgd_rank=1000000 ran without a word while PowerSGD sent every gradient whole
    (a matrix's factors must be 2x smaller than it). The hook now says so; a rank that compresses
    one matrix (fc 64 x 32 at rank 4: 384 values against 2048) says nothing."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from alexnet.config import ParallelConfig
    from alexnet.parallel.comm import CommCounter
    from alexnet.parallel.data_parallel import apply_comm_hook
    from alexnet.parallel.powersgd_state import compression_problem

    shapes = [torch.Size([32, 64]), torch.Size([32]), torch.Size([4, 32])]
    assert compression_problem(PowerSGDState(None, matrix_approximation_rank=4), shapes) == ""
    assert compression_problem(PowerSGDState(None, matrix_approximation_rank=10), shapes) == ""  # 960 < 2048 / 2
    said = compression_problem(PowerSGDState(None, matrix_approximation_rank=11), shapes)  # 1056 values: not 2x
    assert said.startswith("parallel.powersgd_rank=11 compresses none of the gradients: PowerSGD sends a matrix whole")
    assert compression_problem(PowerSGDState(None, matrix_approximation_rank=1), shapes[1:2]) == ""  # nothing to say

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for rank in (4, 1_000_000):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with caplog.at_level("WARNING", logger="alexnet"):
            apply_comm_hook(ddp, ParallelConfig(comm_hook="powersgd", powersgd_rank=rank), CommCounter(), None, 1)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "parallel.powersgd_rank=1000000 compresses none of the gradients"
    ]


@pytest.mark.usefixtures("gloo_world_of_one")
def test_a_checkpoint_leaves_powersgds_generator_where_an_uninterrupted_run_has_it():
    """Cutting the state into pieces for a checkpoint dropped the empty factor memory of a bucket
    with nothing to compress (biases alone): the hook took the bucket for a new one and drew from
    PowerSGD's generator, so after a later skipped step (new factors drawn) the run went elsewhere."""
    from alexnet.config import ParallelConfig
    from alexnet.parallel.comm import CommCounter
    from alexnet.parallel.data_parallel import apply_comm_hook, settle_buckets

    def run(save_at):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001)  # a bucket per tensor
        x = torch.randn(8, 64)
        settle_buckets(ddp, x[:1])
        hook = apply_comm_hook(ddp, ParallelConfig(comm_hook="powersgd", powersgd_rank=2), CommCounter(), None, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(8):
            opt.zero_grad()
            ddp(x + 0.1 * step).pow(2).mean().backward()
            opt.step()
            if step == save_at:
                hook.carry.state_dict(hook.powersgd)
            if step == 5:  # a skipped step: new factors are drawn from PowerSGD's generator
                hook.forget_skipped_step()
        return hook.powersgd.rng.get_state()[2], [p.detach().clone() for p in model.parameters()]

    (straight_pos, straight), (saved_pos, saved) = run(None), run(3)
    assert saved_pos == straight_pos
    assert all(torch.equal(a, b) for a, b in zip(straight, saved))


def test_a_state_of_another_setup_is_named_by_what_changed_and_an_older_one_lacks_the_precision(tmp_path):
    """The warning printed both whole setups once per rank (two dicts x 64 lines at 64 ranks).
    States written before the precision and the resolved FC group were kept are of the precision
    the checkpoint's steps were taken in, and their configured fc_group 0 is the resolved group
    (read as written, every hybrid run's first resume after the upgrade started afresh)."""
    from types import SimpleNamespace

    from alexnet.powersgd_checkpoint import _by_reason, _read

    setup = {"world_size": 2, "mode": "hybrid", "fc_group": 2, "powersgd_rank": 4, "channels_last": True,
             "amp": "off"}  # fmt: skip
    hook = SimpleNamespace(powersgd=object(), carry=SimpleNamespace(problem=lambda powersgd, state: ""))
    path = tmp_path / "last.pt"
    # Written before: the configured fc_group (0: a node's processes, resolved to 2 here), no precision.
    older = {**{k: v for k, v in setup.items() if k != "amp"}, "fc_group": 0}
    torch.save({"format": 1, "step": 4, "setup": older, "state": {"iter": 4}}, path)
    assert _read(hook, path, 4, setup) == ({"iter": 4}, "")  # the checkpoint's precision unknown: this one
    assert _read(hook, path, 4, setup, older_amp="off") == ({"iter": 4}, "")
    assert _read(hook, path, 4, setup, older_amp="fp16") == (  # loss-scaled: not taken into amp off
        None,
        "its state was written under amp 'fp16'; this run has 'off'",
    )
    dp = {**setup, "mode": "dp", "fc_group": 0}  # outside the hybrid the configured fc_group meant nothing
    torch.save({"format": 1, "step": 4, "setup": {**older, "mode": "dp", "fc_group": 4}, "state": {"iter": 4}}, path)
    assert _read(hook, path, 4, dp) == ({"iter": 4}, "")
    torch.save({"format": 1, "step": 4, "setup": {**setup, "amp": "fp16", "fc_group": 0}, "state": {}}, path)
    state, why = _read(hook, path, 4, setup)
    assert state is None and why == "its state was written under fc_group 0 and amp 'fp16'; this run has 2 and 'off'"
    assert _by_reason([why, why, why]) == f"every rank: {why}"
    assert _by_reason(["", "gone", "gone", "x"]) == "ranks 1, 2: gone; rank 3: x"
