"""launch/train.py when something fails: a diverging run, a checkpoint or a record rank 0 cannot
write, a bad file or a failing loader on one rank, ranks that see different folders, signals:
every rank stops with one line and what can be kept is kept."""

import json
import math
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from _helpers import DEMO_CONFIG, REPO, TINY_TRAIN, TRAIN, check, launch, loader_failing_on_rank_1, tiny_run_config
from _helpers import train_tiny as train

import alexnet.trainer
from alexnet.config import ConfigError, load_config
from alexnet.engine import accumulated_step
from alexnet.metrics import read_metrics
from alexnet.run import run_training
from alexnet.trainer import NonFiniteLossError

pytestmark = pytest.mark.slow


def diverge_here(tiny_data, tmp_path, name, *extra):
    """The 1-process run of `train(..., nproc=1)` in this process, stopped by NonFiniteLossError:
    its message (what launch/train.py prints after "error: "). A launch's start, importing torch
    and DALI, took longer than such a run; test_a_diverging_run_stops_with_one_line_and_checkpoints_
    from_before keeps the command's own one line and exit status."""
    cfg = tiny_run_config(tiny_data, tmp_path, name, *extra)
    with pytest.raises(NonFiniteLossError) as err:
        run_training(cfg, str(DEMO_CONFIG))
    return str(err.value)


@pytest.mark.dali
def test_a_diverging_run_stops_with_one_line_and_checkpoints_from_before(tiny_data, tmp_path):
    """optim.lr=100 sends the loss to inf/nan within a few steps; after train.max_nonfinite skipped
    steps in a row the run stops with a one-line error, and checkpoint.every_steps=1 wrote no
    checkpoint during the streak: last.pt is from the last applied step."""
    proc = train(tiny_data, tmp_path, "nan", "optim.lr=100", "checkpoint.every_steps=1",
                 "train.max_nonfinite=3", "train.log_every=1", "run.plot=true", nproc=1)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "NonFiniteLossError" not in out  # said, not a traceback
    stopped = int(out.split(" consecutive steps with a non-finite loss at step ")[1].split()[0])
    assert "error: 3 consecutive steps" in out and "hold weights from before these steps" in out
    assert out.count("no checkpoint during") == 2  # the streak's first two steps
    progress = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["step"] == stopped - 3 and progress["nonfinite_streak"] == 0
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())  # a failed session says so
    assert (summary["completed"], summary["stop_reason"], summary["steps"]) == (False, "error", stopped)
    assert summary["error"].startswith("NonFiniteLossError: 3 consecutive steps with a non-finite loss")
    # The plot that marks a diverging run's non-finite losses was drawn only for runs that ended well.
    assert (tmp_path / "nan" / "training_curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.dali
def test_steps_skipped_on_their_gradients_are_not_blamed_on_the_loss(tiny_data, tmp_path):
    """With train.grad_clip a step whose losses were finite is skipped when its gradients' norm is
    not (squared in float32 it overflows above about 1.8e19): the stop said "non-finite loss"
    beside the finite losses the log had just printed, and told to set train.grad_clip, set."""
    line = diverge_here(tiny_data, tmp_path, "grads", "optim.lr=1e7", "train.grad_clip=1",
                        "schedule.warmup_epochs=0", "train.max_nonfinite=3", "train.log_every=1")  # fmt: skip
    losses = [r["loss"] for r in read_metrics(tmp_path / "grads" / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) >= 3 and all(map(math.isfinite, losses[-3:]))  # the skipped steps' losses
    assert "\n" not in line  # the one line launch/train.py prints
    assert "3 consecutive steps with finite losses but non-finite gradients at step" in line
    assert "lower optim.lr." in line and "train.grad_clip" not in line and "non-finite loss" not in line


@pytest.mark.dali
def test_the_steps_of_a_run_stopped_by_non_finite_losses_are_all_in_its_records(tiny_data, tmp_path, capsys):
    """The error was raised before the open log window's record was written: the steps since the
    last record (the streak's among them) were in no record, though summary.json counted them.
    The run diverges inside its first epoch with checkpoint.every_steps=0, before any checkpoint
    (the first is the epoch's end, step 15): its error says there is none."""
    error = diverge_here(tiny_data, tmp_path, "window", "optim.lr=100", "train.max_nonfinite=3",
                         "train.log_every=3", "checkpoint.every_steps=0")  # fmt: skip
    log = capsys.readouterr().err  # the run's log lines
    assert "consecutive steps with a non-finite loss" in error
    summary = json.loads((tmp_path / "window" / "summary.json").read_text())
    # Before any checkpoint (merged from a test of its own, which took a launch of its own for it).
    assert summary["steps"] < 15, "the run should diverge before the first epoch's end"
    assert "No checkpoint was written before these steps." in error
    assert "hold weights from before" not in error
    assert not (tmp_path / "window" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "window" / "training_curves.png").exists()  # run.plot=false (TINY_TRAIN), also here
    records = [r for r in read_metrics(tmp_path / "window" / "metrics.jsonl") if r["split"] == "train"]
    assert summary["steps"] % 3, "the run should stop inside a log window"
    assert records[-1]["step"] == summary["steps"] and sum(r["steps"] for r in records) == summary["steps"]
    assert sum(r["count"] for r in records) == summary["train_images"]
    # The skipped steps were in no record nor in summary.json: counted as trained.
    assert summary["skipped_steps"] >= 3 and sum(r["skipped_steps"] for r in records) == summary["skipped_steps"]
    assert all(0 <= r["skipped_steps"] <= r["steps"] for r in records) and records[-1]["skipped_steps"] >= 1
    said = re.findall(r"step (\d+) .* (\d+) of (\d+) skipped", log)
    assert said and said[-1] == (str(summary["steps"]), str(records[-1]["skipped_steps"]), str(records[-1]["steps"]))


@pytest.mark.dali
def test_a_run_whose_epochs_end_inside_a_streak_is_not_completed(tiny_data, tmp_path):
    """train.max_nonfinite above the steps left: the run "finished" with exit 0 and summary.json
    said completed, with no checkpoint of its last steps and a NaN-loss validation's top-1 (the
    class NaN logits pick) as its best."""
    error = diverge_here(tiny_data, tmp_path, "late", "optim.lr=100", "train.max_nonfinite=1000", "train.epochs=1",
                         "checkpoint.every_steps=0")  # fmt: skip
    assert error.startswith("the run's epochs ended inside ")  # NonFiniteLossError: exit status 1, not 0
    assert "consecutive steps with a non-finite loss at step 15" in error
    summary = json.loads((tmp_path / "late" / "summary.json").read_text())
    assert (summary["completed"], summary["stop_reason"], summary["steps"]) == (False, "error", 15)
    (val,) = [r for r in read_metrics(tmp_path / "late" / "metrics.jsonl") if r["split"] == "val"]
    assert val["loss"] is None and summary["final_top1"] == val["top1"] and summary["best_top1"] is None


@pytest.mark.dali
@pytest.mark.parametrize("poisoned_step", [3, 4])
def test_an_applied_non_finite_gradient_never_reaches_a_checkpoint(tiny_data, tmp_path, monkeypatch, poisoned_step):
    """Without clipping or fp16's scaler the gradients are not checked, so an inf gradient whose
    loss is finite is applied and the weights turn non-finite. The run stops at step 4 either
    way: at step 4's checkpoint (poisoned at 4), or at step 4's non-finite loss (poisoned at 3),
    without waiting out train.max_nonfinite; last.pt stays step 2's finite weights. In process."""
    calls = []

    def poison_one_gradient(model, *args, **kwargs):
        calls.append(1)
        if len(calls) != poisoned_step:
            return accumulated_step(model, *args, **kwargs)

        def to_inf(param):
            param.grad.view(-1)[0] = float("inf")

        weight = next(p for p in model.parameters() if p.ndim == 2)
        handle = weight.register_post_accumulate_grad_hook(to_inf)
        try:
            return accumulated_step(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(alexnet.trainer, "accumulated_step", poison_one_gradient)
    cfg = tiny_run_config(
        tiny_data, tmp_path, "inf", "train.amp=off", "checkpoint.every_steps=2", "train.max_nonfinite=5"
    )
    with pytest.raises(NonFiniteLossError, match="^the weights are not finite at step 4: a step applied") as err:
        run_training(cfg, str(DEMO_CONFIG))
    assert "hold weights from before these steps (non-finite weights are never written)" in str(err.value)
    last = torch.load(tmp_path / "inf" / "checkpoints" / "last.pt", weights_only=True)
    assert last["progress"]["step"] == 2 and all(torch.isfinite(w).all() for w in last["model"].values())


@pytest.mark.dali
def test_a_streak_across_an_epoch_end_writes_no_checkpoint(tiny_data, tmp_path):
    """The epoch-end checkpoint is held back during a streak as the periodic ones are: last.pt is
    the last applied step and previous.pt the one before (15 steps per epoch, 1 process, run in
    this process)."""
    error = diverge_here(tiny_data, tmp_path, "streak", "optim.lr=100", "checkpoint.every_steps=1",
                         "train.epochs=4", "train.max_nonfinite=20", "train.log_every=1")  # fmt: skip
    stopped = int(error.split(" consecutive steps with a non-finite loss at step ")[1].split()[0])
    assert stopped - 20 < 15 < stopped, "the streak should cross the first epoch's end"
    ckpt = tmp_path / "streak" / "checkpoints"
    last, previous = (torch.load(ckpt / f, weights_only=True)["progress"] for f in ("last.pt", "previous.pt"))
    assert (last["step"], last["nonfinite_streak"], last["epoch"]) == (stopped - 20, 0, 0)
    assert previous["step"] == last["step"] - 1


@pytest.mark.dali
def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_its_reason(tiny_data, tmp_path):
    """Rank 0 writes last.pt; where it could not (here a folder stands where the write clears a
    temporary file, as a full disk would stop it), rank 0 printed its error and rank 1 crashed in
    the barrier after it with a traceback ("Connection closed by peer"). Both now stop at that
    checkpoint with rank 0's reason, and no partial file is left."""
    checkpoints = tmp_path / "blocked" / "checkpoints"
    (checkpoints / ".last.pt.tmp0" / "in-the-way").mkdir(parents=True)
    proc = train(tiny_data, tmp_path, "blocked", "train.epochs=1", "train.max_steps=5", "checkpoint.every_steps=2",
                 "parallel.timeout_s=30")  # fmt: skip
    assert proc.returncode != 0
    reason = f"error: cannot write checkpoint {checkpoints / 'last.pt'}: Is a directory"
    assert proc.stderr.count(reason) == 2, proc.stderr[-4000:]  # one line from each rank
    assert "[rank1]: Traceback" not in proc.stderr and "Connection closed" not in proc.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == [".last.pt.tmp0"]


# Rank 0's metrics records find the disk full from the FULL_FROM-th on (fault injection around
# launch/train.py).
FULL_DISK_FROM = f"""
import errno, os, runpy, sys
from alexnet import metrics

write, records = metrics.MetricsWriter.write, []

def full_from(self, record):
    records.append(record)
    if len(records) >= int(os.environ["FULL_FROM"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
    write(self, record)

metrics.MetricsWriter.write = full_from
sys.argv[0] = {str(TRAIN)!r}
runpy.run_path({str(TRAIN)!r}, run_name="__main__")
"""


def full_disk_run(tiny_data, tmp_path, full_from, *extra):
    """launch/train.py under FULL_DISK_FROM, 2 epochs; the command's arguments, without the wrapper."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_FROM)
    args = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=full", "train.epochs=2",
            "parallel.timeout_s=30", *extra]  # fmt: skip
    return launch([wrapper, *args], env={**os.environ, "FULL_FROM": str(full_from)}), args


@pytest.mark.dali
def test_a_metrics_file_rank_0_cannot_write_stops_every_rank_with_a_checkpoint(tiny_data, tmp_path):
    """Rank 0 alone writes metrics.jsonl. A record it could not write (a full disk) ended rank 0
    with the error and rank 1 with a gloo traceback, and lost the steps since the last checkpoint.
    Every rank now stops after the next step with a checkpoint, which keeps the records not
    written, and rank 0's reason; the same command resumes and writes them. The resumed session
    then finds the disk full again at the run's very last record (its final validation): it has
    trained all its epochs and still stops with the error; the next rerun trains nothing, writes
    the record and ends the run as completed (that case had a test and two launches of its own)."""
    run = tmp_path / "full"
    proc, args = full_disk_run(tiny_data, tmp_path, 3)
    assert proc.returncode != 0
    # 7 steps per epoch, a record every 2: the third is step 6's; the ranks agree on it with batch 7
    reason = (f"error: cannot write metrics file {run / 'metrics.jsonl'} (No space left on device; the record of "
              f"step 6 and later ones are kept in the checkpoint, for the resumed run to write); training stopped "
              f"at step 7 with a checkpoint in {run / 'checkpoints'}: the same command resumes from it")  # fmt: skip
    assert proc.stderr.count(reason) == 2, proc.stderr[-4000:]  # one line from each rank
    assert "[rank1]: Traceback" not in proc.stderr and "Connection closed" not in proc.stderr
    progress = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["step"] == 7 and [r["step"] for r in progress["unwritten_records"]] == [6, 7]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [2, 4]

    # Room on the disk again, up to the last record: train 6 and 7 (the kept ones), val 7, train
    # 8, 10, 12 and 14 are written, and the 8th, val 14, is not.
    proc, _ = full_disk_run(tiny_data, tmp_path, 8)
    assert proc.stderr.count("training stopped at step 14 with a checkpoint") == 2, proc.stderr[-4000:]
    assert proc.returncode != 0
    written = [(r["split"], r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    everything = [("train", 2), ("train", 4), ("train", 6), ("train", 7), ("val", 7), ("train", 8), ("train", 10),
                  ("train", 12), ("train", 14), ("val", 14)]  # fmt: skip
    assert written == everything[:-1]
    failed = json.loads((run / "summary.json").read_text())  # the session that failed says so
    assert (failed["completed"], failed["stop_reason"], failed["steps"]) == (False, "error", 14)
    assert failed["error"].startswith("MetricsWriteError: ")

    check(launch([TRAIN, *args]))  # room on the disk for good
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == everything  # nothing trained twice
    assert sum(r["count"] for r in records if r["split"] == "train") == 14 * 16  # each step in one record
    assert json.loads((run / "summary.json").read_text())["completed"]

    # A metrics file rank 0 cannot even open stops every rank before training, naming it.
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    proc = launch([TRAIN, *args, "train.epochs=3"])
    assert proc.returncode != 0
    reason = f"error: config key 'run.root': cannot write the run folder {run} ({run}/metrics.jsonl: Is a directory)"
    assert proc.stderr.count(reason) == 2, proc.stderr[-4000:]
    assert "[rank1]: Traceback" not in proc.stderr
    assert proc.stderr.count("train.epochs: 2 -> 3") == 1  # the resume's warnings come from rank 0 alone


# Rank 0 fails, writing config.yaml, in a way nothing foresees (fault injection around launch/train.py).
RANK_0_FAILS_UNFORESEEN = f"""
import os, runpy, sys
import alexnet.trainer

def unforeseen(cfg, path):
    raise ValueError("something nobody planned for")

if os.environ["RANK"] == "0":
    alexnet.trainer.write_config = unforeseen
sys.argv[0] = {str(TRAIN)!r}
runpy.run_path({str(TRAIN)!r}, run_name="__main__")
"""


@pytest.mark.dali
def test_an_unforeseen_failure_of_rank_0_s_share_of_the_work_stops_every_rank(tiny_data, tmp_path):
    """What rank 0 does alone while the others wait for its result (the run folder, checkpoints,
    records) shared only the failures it knew of: any other exception left the other ranks
    waiting in the broadcast until torchrun killed them (or, without an agent, the timeout). It
    is now shared as well, with its type, and rank 0 logs its traceback."""
    wrapper = tmp_path / "unforeseen.py"
    wrapper.write_text(RANK_0_FAILS_UNFORESEEN)
    proc = launch([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=x",
                   "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("RuntimeError: rank 0 failed: ValueError: something nobody planned for") == 2, proc.stderr[
        -4000:
    ]
    assert "Connection closed" not in proc.stderr


def cut_copy(tiny_data, root, relative):
    """A copy of the tiny dataset in which `relative` is cut to its first 300 bytes; its path."""
    shutil.copytree(tiny_data, root)
    bad = root / relative
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


def one_line_per_rank(proc, ending):
    """The run failed with `ending` said once by each of 2 ranks, and no rank's traceback."""
    assert proc.returncode != 0
    assert proc.stderr.count(ending) == 2, proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "Connection closed" not in proc.stderr


@pytest.mark.dali
def test_a_bad_file_in_one_rank_s_training_shard_stops_every_rank_with_its_name(tiny_data, tmp_path):
    """DALI cannot leave a bad file out of a batch. The rank whose shard held it stopped with its
    name; the other rank, holding its own batch, went on into the step's all-reduce and died there
    with a gloo traceback (NCCL: a hang until the timeout). The ranks now agree on each batch
    before its step, and both stop with the file's name."""
    bad = cut_copy(tiny_data, tmp_path / "data", "train/circle/circle_0003.jpg")
    proc = train(bad.parents[2], tmp_path, "cut", "train.epochs=1", "checkpoint.every_steps=0")
    one_line_per_rank(proc, "Training stopped; no checkpoint was written after this batch.")
    assert [line for line in proc.stderr.splitlines() if "Training stopped" in line and str(bad) in line]
    assert not (tmp_path / "cut" / "checkpoints" / "last.pt").exists()


@pytest.mark.dali
def test_a_bad_file_in_validation_stops_every_rank_after_a_checkpoint_of_the_epoch(tiny_data, tmp_path):
    """A bad file in one rank's validation shard: every rank stops with its name, after a
    checkpoint of the epoch's training (it was lost with the rest of the session); once the file
    is good again, the same command validates the epoch without training it again."""
    bad = cut_copy(tiny_data, tmp_path / "data", "val/circle/circle_0001.jpg")
    args = ("train.epochs=1", "checkpoint.every_steps=0")
    proc = train(bad.parents[2], tmp_path, "val", *args)
    checkpoints = tmp_path / "val" / "checkpoints"
    one_line_per_rank(proc, f"Validation stopped at step 7, with a checkpoint in {checkpoints}; the resumed run "
                            "validates the epoch again.")  # fmt: skip
    progress = torch.load(tmp_path / "val" / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (progress["step"], progress["epoch"], progress["epoch_trained"]) == (7, 0, True)
    shutil.copy(tiny_data / "val" / "circle" / "circle_0001.jpg", bad)
    check(train(bad.parents[2], tmp_path, "val", *args))
    records = read_metrics(tmp_path / "val" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records if r["split"] == "val"] == [("val", 7)]
    assert sum(r["count"] for r in records if r["split"] == "train") == 7 * 16  # each step trained once


LOADER_FAILED = "rank 1 (of 2) could not load its batch: RuntimeError: Critical error in pipeline: injected (rank 1 "


LOADER_FAILED += "logged its traceback)."


@pytest.mark.dali
@pytest.mark.parametrize(
    ("split", "stopped"),
    [
        ("train", "Training stopped; no checkpoint was written after this batch."),
        ("val", "Validation stopped at step 7, without a checkpoint of it (there is none yet)."),
    ],
)
def test_a_loader_failing_unforeseen_on_one_rank_stops_every_rank(tiny_data, tmp_path, split, stopped):
    """A DALI internal error (or memory running out) on rank 1 alone: rank 1 died with its
    traceback and rank 0 in the step's all-reduce with a gloo traceback (NCCL: a hang until the
    timeout). Both ranks now stop at the same batch with one line naming rank 1 and its error,
    rank 1 having logged its traceback first. No checkpoint follows: the failing rank may not
    be able to write one (in validation too, unlike after a bad file)."""
    wrapper = loader_failing_on_rank_1(tmp_path, TRAIN, split)
    proc = launch([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=lf",
                   "train.epochs=1", "checkpoint.every_steps=0"])  # fmt: skip
    one_line_per_rank(proc, f"error: {LOADER_FAILED} {stopped}")
    assert proc.stderr.count("rank 1: its loader failed; every rank stops") == 1
    assert "\nRuntimeError: Critical error in pipeline: injected\n" in proc.stderr  # the end of its traceback
    assert not (tmp_path / "lf" / "checkpoints" / "last.pt").exists()


def per_rank_home(tmp_path):
    """launch/train.py with HOME = tmp_path/home<LOCAL_RANK>: a disk of each rank's own (node-local
    storage), seen through paths that start with ~."""
    wrapper = tmp_path / "per_rank_home.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"os.environ['HOME'] = os.path.join({str(tmp_path)!r}, 'home' + os.environ['LOCAL_RANK'])\n"
        f"sys.argv[0] = {str(TRAIN)!r}\n"
        f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')\n"
    )
    return wrapper


def two_homes(root, tiny_data):
    """Two "nodes" with disks of their own under `root` (HOME per rank): identical copies of the
    data at other paths, rank 0's a link to tiny_data, rank 1's a copy."""
    (root / "home0").mkdir()
    (root / "home0" / "data").symlink_to(tiny_data)
    (root / "home1").mkdir()
    shutil.copytree(tiny_data, root / "home1" / "data")
    return root


@pytest.fixture(scope="module")
def node_local(tmp_path_factory, tiny_data):
    """Two nodes' own copies of the data (data.root=~/data) and a shared run.root, trained 1
    step: the homes' folder, the command and its process (made once for the tests that read it)."""
    root = two_homes(tmp_path_factory.mktemp("node_local"), tiny_data)
    command = [per_rank_home(root), *TINY_TRAIN, "data.root=~/data", f"run.root={root / 'runs'}", "run.name=local",
               "parallel.timeout_s=30", "train.max_steps=1"]  # fmt: skip
    return root, command, launch(command)


def probe_error(proc, folder, why):
    """The one line each rank stops with when rank 1 cannot see the file rank 0 made in `folder`
    (`why`: the reason rank 1 gives); no such file is left behind."""
    assert proc.returncode != 0 and set(proc.statuses) <= {2, -15}, (proc.statuses, proc.stderr[-4000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-4000:]
    said = re.fullmatch(
        r"error: config key 'run.root': rank 1 \(of 2; host (\S+)\) cannot see the file (\S+) that rank 0 "
        r"\(host (\S+)\) made \(rank 1: (.+)\); run.root must be a folder every rank sees \(a shared file "
        r"system\): rank 0 alone writes the checkpoints, and a resume on other nodes would not find them \(nothing "
        r"was trained\)",
        lines[0],
    )
    assert said is not None, lines[0]
    assert said.group(1) == said.group(3) == socket.gethostname()
    made = Path(said.group(2))
    assert made.parent == folder and made.name.startswith(".shared-check-")
    assert said.group(4) == why.format(made=made)
    assert not made.exists()
    assert "ConfigError" not in proc.stderr  # said, not a traceback


@pytest.mark.dali
def test_a_run_root_on_node_local_disks_stops_every_rank_before_training(tiny_data, tmp_path):
    """run.root=~/runs on each node's own disk: the run trained with its checkpoints on rank 0's
    node alone, and the loss showed at the resume, as different checkpoints found or none. It
    now stops at the start, naming the rank that cannot see rank 0's folder, trains nothing and
    makes no folder (the file goes into the deepest one that exists: the home)."""
    root = two_homes(tmp_path, tiny_data)
    proc = launch([per_rank_home(root), *TINY_TRAIN, "data.root=~/data", "run.root=~/runs", "run.name=local",
                   "parallel.timeout_s=30", "train.max_steps=1"])  # fmt: skip
    probe_error(proc, root / "home0", "no such file")
    assert sorted(p.name for p in root.iterdir()) == ["home0", "home1", "per_rank_home.py"]
    assert sorted(p.name for p in (root / "home0").iterdir()) == ["data"]
    assert sorted(p.name for p in (root / "home1").iterdir()) == ["data"]


@pytest.mark.dali
def test_a_resume_whose_run_folder_is_on_rank_0s_disk_alone_stops_naming_it(tiny_data, tmp_path):
    """The run folder rank 0's node has, with a checkpoint, and rank 1's lacks: the ranks said they
    found different checkpoints (rank 1: none). The file rank 0 makes in its run folder, which
    rank 1 cannot see, now says where the trouble is. The checkpoint is kept as it was."""
    root = two_homes(tmp_path, tiny_data)
    run_training(tiny_run_config(tiny_data, root / "home0" / "runs", "local", "train.max_steps=1"), str(DEMO_CONFIG))
    last = root / "home0" / "runs" / "local" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = launch([per_rank_home(root), *TINY_TRAIN, "data.root=~/data", "run.root=~/runs", "run.name=local",
                   "parallel.timeout_s=30", "train.max_steps=2"])  # fmt: skip
    missing = f"{root / 'home1' / 'runs' / 'local'}: No such file or directory"  # rank 1's listing of it
    probe_error(proc, root / "home0" / "runs" / "local", missing)
    assert last.read_bytes() == before


@pytest.mark.dali
def test_a_rank_that_cannot_look_for_the_file_stops_every_rank_with_its_reason(tiny_data, tmp_path):
    """Looking for the file can raise (EACCES on a folder of run.root's path a node's user may not
    enter, ESTALE): rank 1 exited with its traceback while rank 0 waited for it in the collective
    (a gloo traceback here; with NCCL, until the timeout). Every rank now stops with its reason."""
    wrapper = tmp_path / "no_access_on_rank_1.py"
    wrapper.write_text(
        "import os, pathlib, runpy, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    exists = pathlib.Path.exists\n"
        "    def denied(self, *args, **kwargs):\n"
        "        if self.name.startswith('.shared-check-'):\n"
        "            raise PermissionError(13, 'Permission denied', str(self))\n"
        "        return exists(self, *args, **kwargs)\n"
        "    pathlib.Path.exists = denied\n"
        f"sys.argv[0] = {str(TRAIN)!r}\n"
        f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')\n"
    )
    proc = launch([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path / 'runs'}", "run.name=x",
                   "parallel.timeout_s=30", "train.max_steps=1"])  # fmt: skip
    probe_error(proc, tmp_path, "{made}: Permission denied")
    assert not (tmp_path / "runs").exists()


@pytest.mark.dali
def test_ranks_that_resume_from_different_copies_of_a_checkpoint_stop_before_training(node_local, tmp_path):
    """checkpoint.resume=~/start.pt, each node's copy of another step: both stop at once with a
    one-line error instead of training from different steps."""
    root, command, first = node_local
    check(first)
    checkpoints = root / "runs" / "local" / "checkpoints"
    shutil.copy(checkpoints / "last.pt", root / "home0" / "start.pt")
    check(launch([*command, "train.max_steps=2", "run.name=two"]))  # step 2's checkpoint for rank 1's copy
    shutil.copy(root / "runs" / "two" / "checkpoints" / "last.pt", root / "home1" / "start.pt")
    proc = launch([*command, "run.name=from_copies", "checkpoint.resume=~/start.pt", "train.max_steps=3"])
    assert proc.returncode != 0
    said = (f"error: the ranks found different checkpoints to resume from (rank 0: {root / 'home0' / 'start.pt'} "
            f"(step 1); rank 1: {root / 'home1' / 'start.pt'} (step 2)); checkpoint.resume (~/start.pt) must lead "
            "every rank to the same checkpoint (each node's copy the same file)")  # fmt: skip
    assert proc.stderr.count(said + "\n") == 2, proc.stderr[-4000:]  # said by both, no traceback
    assert "CheckpointError" not in proc.stderr
    assert not (root / "runs" / "from_copies").exists()


@pytest.mark.dali
def test_a_data_folder_one_rank_lacks_stops_every_rank_naming_that_rank(tiny_data, tmp_path):
    """data.root on node-local disks, missing on rank 1's: rank 1 stopped with its error, and rank
    0 waited for it in the next collective (killed by torchrun's agent on one node; on another
    node, until the timeout). Both now stop with rank 1's error, which names the rank."""
    (tmp_path / "home0").mkdir()
    (tmp_path / "home0" / "data").symlink_to(tiny_data)
    (tmp_path / "home1").mkdir()
    proc = launch([per_rank_home(tmp_path), *TINY_TRAIN, "data.root=~/data", f"run.root={tmp_path}", "run.name=x",
                   "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    # The workers' own status: one node's storage, not the command (on every node it would be 2).
    # The slower rank may be stopped by torchrun's SIGTERM once the first has exited (-15).
    assert 1 in proc.statuses and set(proc.statuses) <= {1, -15}, (proc.statuses, proc.stderr[-4000:])
    missing = f"error: rank 1 (of 2): data folder {tmp_path / 'home1' / 'data'} (config key 'data.root') does not exist"
    assert proc.stderr.count(missing) == 2, proc.stderr[-4000:]
    assert not (tmp_path / "x").exists()  # a run that cannot start leaves no trace


@pytest.mark.dali
def test_nodes_whose_copies_of_the_data_differ_stop_naming_them(tiny_data, tmp_path, node_local):
    """data.root on node-local disks, one copy a file short: nothing compared the copies, so the
    ranks took different numbers of steps until a collective broke an epoch later (a class
    folder missing, with model.num_classes set, trained each rank's labels as other classes).
    Identical copies at other paths still train (node_local's run)."""
    check(node_local[2])
    two_homes(tmp_path, tiny_data)
    short = sorted((tmp_path / "home1" / "data" / "train" / "circle").iterdir())[0]
    short.unlink()
    proc = launch([per_rank_home(tmp_path), *TINY_TRAIN, "data.root=~/data", f"run.root={tmp_path}",
                   "parallel.timeout_s=30", "train.max_steps=1", "run.name=short"])  # fmt: skip
    assert proc.returncode != 0
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: the ranks read different data")]
    assert len(named) == 2 and named[0] == named[1], proc.stderr[-4000:]
    assert "(rank 0: ~/data (10 classes, 120 train / 50 val images, file lists " in named[0]
    assert "; rank 1: ~/data (10 classes, 119 train / 50 val images, file lists " in named[0]
    assert named[0].endswith("every node's copy of the data must hold the same class folders and files")
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not (tmp_path / "short").exists()


@pytest.mark.dali
def test_an_unusable_run_root_is_named(tiny_data, tmp_path, capsys):
    """In this process, where each launch of launch/train.py took longer than its failure: the
    command prints the error's message after "error: " (as test_a_metrics_file_rank_0_cannot_write_
    stops_every_rank_with_a_checkpoint sees of this same error)."""

    def run(root, name):
        cfg = tiny_run_config(tiny_data, root, name)
        with pytest.raises(ConfigError) as err:
            run_training(cfg, str(DEMO_CONFIG))
        return str(err.value)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run(blocker, "x").startswith(f"config key 'run.root': cannot write the run folder {blocker / 'x'}")
    # a file where the run's checkpoints go: named at the start, not at the first checkpoint
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "checkpoints").write_text("")
    capsys.readouterr()
    error = run(tmp_path, "y")
    assert f"cannot write the run folder {tmp_path / 'y'} ({tmp_path / 'y' / 'checkpoints'}: File exists)" in error
    assert "step 1" not in capsys.readouterr().err and not (tmp_path / "y" / "config.yaml").exists()


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    """Only rank 1 gets SIGUSR1; the step's all-reduce of the flag makes rank 0 stop too, and
    each rank says why: its own signal, or another rank's request. A failure on rank 0 stops
    rank 1 as well, and rank 1 tells it from a request."""
    check(launch([REPO / "tests" / "dist" / "stop_agree.py", tmp_path], nproc=2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    flags = [(r["before"], r["failed"], r["after"], r["here"]) for r in ranks]
    assert flags == [(False, True, True, False), (False, True, True, True)]
    assert ranks[1]["failed_reason"] == "a failure on another rank"
    assert [r["reason"] for r in ranks] == ["another rank was asked to stop", "signal SIGUSR1"]
    # Rank 0's .stopped marker had only its own reason: none, so a Slurm job whose step signal
    # reached rank 1 alone ended with exit 0, unfinished and not requeued.
    assert [r["requests"] for r in ranks] == ["signal SIGUSR1 on rank 1"] * 2
    assert [r["failed_requests"] for r in ranks] == ["", ""]


@pytest.mark.dali
def test_a_failed_run_in_a_process_that_goes_on_leaves_no_tensorboard_thread(tiny_data, tmp_path):
    """Only a run that ended well closed its TensorBoard writer: each failed one (a diverged loss,
    a bad image, Ctrl-C) left the writer's thread running for the life of a notebook's process."""
    import threading

    def writer_threads() -> int:
        return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())

    before = writer_threads()
    for name in ("a", "b"):
        cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", f"run.name={name}",
                                 "run.tensorboard=true", "optim.lr=1e12", "train.max_nonfinite=1"])  # fmt: skip
        with pytest.raises(alexnet.trainer.NonFiniteLossError):
            run_training(cfg, None)
    assert writer_threads() == before


@pytest.mark.dali
def test_a_second_ctrl_c_is_recorded_in_summary_json(tiny_data, tmp_path, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C twice) passed the failure's summary by: summary.json went on
    saying "running" for a session that had ended."""

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(alexnet.trainer.Trainer, "_run_epochs", interrupted)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=c"])
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, None)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert (summary["stop_reason"], summary["completed"], summary["error"]) == ("error", False, "KeyboardInterrupt")
