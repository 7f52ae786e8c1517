"""launch/train.py under torchrun with 2 gloo ranks, end to end, and exact mid-epoch resume."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from _helpers import REPO, TINY_TRAIN, TRAIN, check, loader_failing_on_rank_1, torchrun

import alexnet.trainer
from alexnet.checkpoint import CheckpointError
from alexnet.config import load_config
from alexnet.engine import train_step
from alexnet.metrics import read_metrics
from alexnet.run import run_training
from alexnet.runlock import lock_run_folder
from alexnet.trainer import NonFiniteLossError

pytestmark = pytest.mark.slow
DEMO_CONFIG = REPO / "launch" / "configs" / "demo.yaml"  # train.py's default


def train(tiny_data, tmp_path, name, *extra, nproc=2, env=None):
    args = [TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", f"run.name={name}", *extra]
    return torchrun(args, nproc=nproc, env=env)


def test_two_rank_run_writes_metrics_config_and_checkpoint(tiny_data, tmp_path):
    proc = check(train(tiny_data, tmp_path, "e2e", "train.epochs=2", "checkpoint.every_steps=3"))
    run = tmp_path / "e2e"
    # 120 train images over 2 ranks at batch 8: 7 steps per epoch
    records = read_metrics(run / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    val_records = [r for r in records if r["split"] == "val"]
    # every 2 steps, at each checkpoint (every 3) and at each epoch's end (7): each step in one record
    assert [(r["step"], r["steps"]) for r in train_records] == [(2, 2), (3, 1), (4, 1), (6, 2), (7, 1), (8, 1),
                                                                 (9, 1), (10, 1), (12, 2), (14, 2)]  # fmt: skip
    assert sum(r["count"] for r in train_records) == 14 * 16  # every step once, 2 ranks x batch 8
    assert [r["epoch"] for r in val_records] == [1, 2]
    for r in records:
        assert {"split", "epoch", "step", "loss", "top1", "top5", "images_per_sec", "lr"} <= set(r)
        assert r["images_per_sec"] > 0 and 0 <= r["top1"] <= r["top5"] <= 100
    assert all(r["count"] == 50 for r in val_records)  # every val image exactly once
    assert load_config(run / "config.yaml") == load_config(
        DEMO_CONFIG,
        [
            *TINY_TRAIN,
            f"data.root={tiny_data}",
            f"run.root={tmp_path}",
            "run.name=e2e",
            "train.epochs=2",
            "checkpoint.every_steps=3",
        ],
    )
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert payload["progress"]["epoch"] == 2 and payload["progress"]["step"] == 14
    assert "conv1.0.weight" in payload["model"] and not any(k.startswith("module.") for k in payload["model"])
    assert set(payload["loaders"]["train"]) == {"0", "1"}
    # every_steps=3 and the epoch ends (7, 14) write at 3, 6, 7, 9, 12, 14: the one before the last is 12
    assert torch.load(run / "checkpoints" / "previous.pt", weights_only=True)["progress"]["step"] == 12
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 14 and summary["world_size"] == 2
    assert summary["gpu_hours"] == 0.0 and not summary["paper"]["comparable"]  # CPU; 10 classes, not ImageNet
    assert (run / "training_curves.png").stat().st_size > 10_000
    assert "best val top-1" in proc.stderr + proc.stdout
    # The same command again (a Slurm requeue that missed the .completed marker) finds nothing to
    # train and rewrites the same summary: the figures are the run's, not this empty session's.
    assert summary["comm_sent_mb_per_step"]["grad_allreduce"] > 0
    again = check(train(tiny_data, tmp_path, "e2e", "train.epochs=2", "checkpoint.every_steps=3"))
    assert "nothing to train" in again.stderr
    rewritten = json.loads((run / "summary.json").read_text())
    assert rewritten.pop("session_seconds") < summary.pop("session_seconds")  # only this one is the session's
    assert rewritten == summary


def test_resume_mid_epoch_gives_identical_weights(tiny_data, tmp_path):
    """10 steps straight vs 5 steps, stop, resume, 5 more: bitwise equal weights. Step 5 is in
    the middle of epoch 1 (7 steps per epoch), so the resume restores the loaders' positions,
    the dropout counter and the momentum, and crosses an epoch boundary and a validation."""
    common = ("train.epochs=3", "schedule.name=cosine", "checkpoint.every_steps=0")
    check(train(tiny_data, tmp_path, "straight", *common, "train.max_steps=10"))
    first = check(train(tiny_data, tmp_path, "resumed", *common, "train.max_steps=5"))
    assert "stopped" in first.stderr + first.stdout
    half = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert half["progress"]["step"] == 5 and half["loaders"]["train"]["0"]["pos"] == 5
    second = check(train(tiny_data, tmp_path, "resumed", *common, "train.max_steps=10"))
    assert "resumed from" in second.stderr + second.stdout

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 10
    assert not torch.equal(a["model"]["fc8.0.weight"], half["model"]["fc8.0.weight"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert set(a["optimizer"]["momentum"]) == set(a["model"])
    for name, buffer in a["optimizer"]["momentum"].items():
        assert torch.equal(buffer, b["optimizer"]["momentum"][name]), name
    straight_val = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["split"] == "val"]
    resumed_val = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["split"] == "val"]
    assert straight_val[0]["top1"] == resumed_val[0]["top1"] and straight_val[0]["loss"] == resumed_val[0]["loss"]


def test_fresh_start_refuses_to_overwrite_a_run(tiny_data, tmp_path):
    check(train(tiny_data, tmp_path, "keep", "train.max_steps=2", "train.epochs=1", nproc=1))
    before = (tmp_path / "keep" / "checkpoints" / "last.pt").read_bytes()
    proc = train(tiny_data, tmp_path, "keep", "checkpoint.resume=none", "train.epochs=1", nproc=1)
    assert proc.returncode != 0
    assert "already holds checkpoints" in proc.stderr
    assert (tmp_path / "keep" / "checkpoints" / "last.pt").read_bytes() == before


def test_stop_request_checkpoints_on_all_ranks_and_resumes_exactly(tiny_data, tmp_path):
    """A stop file (what the Slurm script writes on SIGUSR1) present from the start: both ranks
    agree to stop after their first step, write one checkpoint, exit 0, and rank 0 removes the
    file (left in place, it stopped every rerun after one step); the rerun finishes with the
    weights of an uninterrupted run, and only it marks the run completed (the Slurm script's sign
    not to requeue)."""
    common = ("train.epochs=1", "checkpoint.every_steps=0")
    stop = tmp_path / "STOP"
    stop.write_text("")
    slurm_like = {"ALEXNET_STOP_FILE": str(stop)}
    first = check(train(tiny_data, tmp_path, "pre", *common, env=slurm_like))
    assert "stopping at step 1 on stop file" in first.stderr
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert summary["stop_reason"] == "preempted" and summary["steps"] == 1
    assert not (tmp_path / "STOP.completed").exists()  # a Slurm job requeues this one
    last = tmp_path / "pre" / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["progress"]["step"] == 1 and set(payload["loaders"]["train"]) == {"0", "1"}
    assert not stop.exists()  # served: rank 0 removed it after the checkpoint, so the same command resumes
    rerun = check(train(tiny_data, tmp_path, "pre", *common, env=slurm_like))
    assert f"resumed from {last} after step 1 (0 epochs completed)" in rerun.stderr  # not a fresh start to the same end
    assert (tmp_path / "STOP.completed").read_text() == "completed at step 7\n"  # and not this one
    check(train(tiny_data, tmp_path, "whole", *common))
    a = torch.load(tmp_path / "pre" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_folder_takes_one_session_at_a_time(tiny_data, tmp_path):
    """While a session trains, its run folder is refused to a second session (each of whose ranks
    stops with the error naming the first's pid, and which writes nothing there); once the first
    has stopped, the folder is free."""
    run, stop = tmp_path / "busy", tmp_path / "STOP"
    args = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=busy", "train.epochs=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALEXNET_STOP_FILE": str(stop)}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first session wrote no metrics in 120 s"
            time.sleep(0.1)
        config_before = (run / "config.yaml").read_bytes()
        with pytest.raises(CheckpointError, match=f"in use by another training session \\(pid {first.pid} on "):
            lock_run_folder(run)
        second = train(tiny_data, tmp_path, "busy", "train.epochs=51")
        refusal = f"error: run folder {run} is in use by another training session (pid {first.pid} on "
        assert second.returncode != 0 and second.stderr.count(refusal) == 2, second.stderr[-4000:]  # both ranks
        assert (run / "config.yaml").read_bytes() == config_before and not (run / "config.1.yaml").exists()
        stop.write_text("")
        first.wait(timeout=120)
    finally:
        first.kill()
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-4000:]
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "preempted"
    assert not (tmp_path / "STOP.completed").exists()  # stopped, not completed: a Slurm job requeues
    lock_run_folder(run).release()  # free again


def test_a_diverging_run_stops_with_one_line_and_checkpoints_from_before(tiny_data, tmp_path):
    """optim.lr=100 sends the loss to inf/nan within a few steps; after train.max_nonfinite skipped
    steps in a row the run stops with a one-line error, and checkpoint.every_steps=1 wrote no
    checkpoint during the streak: last.pt is from the last applied step."""
    proc = train(tiny_data, tmp_path, "nan", "optim.lr=100", "checkpoint.every_steps=1",
                 "train.max_nonfinite=3", "train.log_every=1", nproc=1)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NonFiniteLossError" not in out  # said, not a traceback
    stopped = int(out.split(" consecutive steps with a non-finite loss at step ")[1].split()[0])
    assert "error: 3 consecutive steps" in out and "hold weights from before these steps" in out
    assert out.count("no checkpoint during") == 2  # the streak's first two steps
    progress = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["step"] == stopped - 3 and progress["nonfinite_streak"] == 0
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())  # a failed session says so
    assert (summary["completed"], summary["stop_reason"], summary["steps"]) == (False, "error", stopped)
    assert summary["error"].startswith("NonFiniteLossError: 3 consecutive steps with a non-finite loss")


def test_a_run_whose_epochs_end_inside_a_streak_is_not_completed(tiny_data, tmp_path):
    """train.max_nonfinite above the steps left: the run "finished" with exit 0 and summary.json
    said completed, with no checkpoint of its last steps and a NaN-loss validation's top-1 (the
    class NaN logits pick) as its best."""
    proc = train(tiny_data, tmp_path, "late", "optim.lr=100", "train.max_nonfinite=1000", "train.epochs=1",
                 "checkpoint.every_steps=0", nproc=1)  # fmt: skip
    assert proc.returncode == 1 and "error: the run's epochs ended inside " in proc.stderr
    assert "consecutive steps with a non-finite loss at step 15" in proc.stderr
    summary = json.loads((tmp_path / "late" / "summary.json").read_text())
    assert (summary["completed"], summary["stop_reason"], summary["steps"]) == (False, "error", 15)
    (val,) = [r for r in read_metrics(tmp_path / "late" / "metrics.jsonl") if r["split"] == "val"]
    assert val["loss"] is None and summary["final_top1"] == val["top1"] and summary["best_top1"] is None


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
            return train_step(model, *args, **kwargs)

        def to_inf(param):
            param.grad.view(-1)[0] = float("inf")

        weight = next(p for p in model.parameters() if p.ndim == 2)
        handle = weight.register_post_accumulate_grad_hook(to_inf)
        try:
            return train_step(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(alexnet.trainer, "train_step", poison_one_gradient)
    cfg = load_config(DEMO_CONFIG, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=inf",
                                    "train.amp=off", "checkpoint.every_steps=2", "train.max_nonfinite=5"])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="^the weights are not finite at step 4: a step applied") as err:
        run_training(cfg, str(DEMO_CONFIG))
    assert "hold weights from before these steps (non-finite weights are never written)" in str(err.value)
    last = torch.load(tmp_path / "inf" / "checkpoints" / "last.pt", weights_only=True)
    assert last["progress"]["step"] == 2 and all(torch.isfinite(w).all() for w in last["model"].values())


def test_a_streak_across_an_epoch_end_writes_no_checkpoint(tiny_data, tmp_path):
    """The epoch-end checkpoint is held back during a streak as the periodic ones are: last.pt is
    the last applied step and previous.pt the one before (15 steps per epoch, 1 process)."""
    proc = train(tiny_data, tmp_path, "streak", "optim.lr=100", "checkpoint.every_steps=1", "train.epochs=4",
                 "train.max_nonfinite=20", "train.log_every=1", nproc=1)  # fmt: skip
    out = proc.stdout + proc.stderr
    stopped = int(out.split(" consecutive steps with a non-finite loss at step ")[1].split()[0])
    assert stopped - 20 < 15 < stopped, "the streak should cross the first epoch's end"
    ckpt = tmp_path / "streak" / "checkpoints"
    last, previous = (torch.load(ckpt / f, weights_only=True)["progress"] for f in ("last.pt", "previous.pt"))
    assert (last["step"], last["nonfinite_streak"], last["epoch"]) == (stopped - 20, 0, 0)
    assert previous["step"] == last["step"] - 1


def test_max_steps_at_an_epoch_end_ends_the_epoch_and_previous_pt_keeps_an_earlier_step(tiny_data, tmp_path):
    """train.max_steps on the first epoch's last step (15): the epoch is validated and counted
    before the run stops; the periodic checkpoint at 15, the epoch's and the stop's are one step,
    so previous.pt stays the step-10 checkpoint instead of a copy of last.pt."""
    check(train(tiny_data, tmp_path, "max", "train.epochs=2", "train.max_steps=15", "checkpoint.every_steps=5",
                nproc=1))  # fmt: skip
    summary = json.loads((tmp_path / "max" / "summary.json").read_text())
    assert (summary["stop_reason"], summary["epochs"], summary["steps"]) == ("max_steps", 1, 15)
    val = [r for r in read_metrics(tmp_path / "max" / "metrics.jsonl") if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1] and summary["best_top1"] == val[0]["top1"]  # the epoch's validation
    ckpt = tmp_path / "max" / "checkpoints"
    last, previous = (torch.load(ckpt / f, weights_only=True)["progress"] for f in ("last.pt", "previous.pt"))
    assert (last["step"], last["epoch"], previous["step"]) == (15, 1, 10)
    check(train(tiny_data, tmp_path, "max", "train.epochs=1", "train.max_steps=15", nproc=1))  # nothing left
    assert json.loads((tmp_path / "max" / "summary.json").read_text())["completed"] is True


def test_a_run_that_diverges_before_any_checkpoint_says_there_is_none(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "early", "optim.lr=1e30", "checkpoint.every_steps=0",
                 "train.max_nonfinite=2", nproc=1)  # fmt: skip
    assert proc.returncode == 1 and "No checkpoint was written before these steps." in proc.stderr
    assert "hold weights from before" not in proc.stderr
    assert not (tmp_path / "early" / "checkpoints" / "last.pt").exists()


def test_resuming_a_finished_run_with_other_settings_says_so_and_keeps_both_configs(tiny_data, tmp_path):
    """A finished run rerun with a changed setting: the log names the change and that nothing is
    left to train, config.yaml is this session's and the earlier one stays as config.1.yaml; a
    checkpoint of another run is refused in a folder that has checkpoints of its own."""
    check(train(tiny_data, tmp_path, "done", "train.epochs=1", nproc=1))
    run = tmp_path / "done"
    first_config = (run / "config.yaml").read_text()
    lr = load_config(run / "config.yaml").optim.lr
    again = check(train(tiny_data, tmp_path, "done", "train.epochs=1", f"optim.lr={lr * 5}", nproc=1))
    assert f"optim.lr: {lr!r} -> {lr * 5!r}" in again.stderr
    assert "has already trained its 1 epochs: nothing to train" in again.stderr
    assert (run / "config.1.yaml").read_text() == first_config
    assert load_config(run / "config.yaml").optim.lr == lr * 5
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    refused = train(tiny_data, tmp_path, "done", "train.epochs=2", f"checkpoint.resume={elsewhere}", nproc=1)
    assert refused.returncode != 0 and "already holds checkpoints of its own" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == kept
    configs = {p.name: p.read_text() for p in run.glob("config*.yaml")}
    unfit = train(tiny_data, tmp_path, "done", "train.epochs=2", "model.num_classes=12", nproc=1)
    assert unfit.returncode != 0 and "does not fit this model" in unfit.stderr
    assert {p.name: p.read_text() for p in run.glob("config*.yaml")} == configs  # a failed start changes nothing
    # A run started from another run's checkpoint, restarted with the same arguments (a Slurm
    # requeue, a torchrun restart), continues from its own checkpoints.
    # An earlier attempt in its folder that crashed before a checkpoint left a record of step 1:
    # it does not lead to the other run's checkpoint, and went in front of the run's own steps.
    tuned = ("train.epochs=2", "train.max_steps=17", f"checkpoint.resume={elsewhere}")
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "metrics.jsonl").write_text('{"split": "train", "epoch": 1, "step": 1, "loss": 7e14}\n')
    started = check(train(tiny_data, tmp_path, "tuned", *tuned, nproc=1))
    assert "dropped its 1 record(s): none led to the checkpoint of another run" in started.stderr
    first_steps = [r["step"] for r in read_metrics(tmp_path / "tuned" / "metrics.jsonl")]
    assert first_steps and min(first_steps) > 1 and max(first_steps) == 17
    again = check(train(tiny_data, tmp_path, "tuned", *tuned, nproc=1))
    assert "continuing from its own checkpoints" in again.stderr
    assert (
        f"resumed from {tmp_path / 'tuned' / 'checkpoints' / 'last.pt'} after step 17 (1 epoch completed)"
        in again.stderr
    )
    assert [r["step"] for r in read_metrics(tmp_path / "tuned" / "metrics.jsonl")] == first_steps  # its own, kept


def test_a_rerun_with_nothing_to_train_keeps_the_summary_of_the_steps_taken(tiny_data, tmp_path):
    """A finished 2-process run rerun on 1 process: nothing is left to train, and summary.json
    said world_size 1, global batch 8 and no bytes sent, about steps 2 processes had taken."""
    check(train(tiny_data, tmp_path, "ws", "train.epochs=1"))
    summary_path = tmp_path / "ws" / "summary.json"
    first = json.loads(summary_path.read_text())
    assert (first["world_size"], first["global_batch"], first["parallel_mode"]) == (2, 16, "dp")
    assert first["comm_sent_mb_per_step"]
    again = check(train(tiny_data, tmp_path, "ws", "train.epochs=1", nproc=1))
    assert "nothing to train" in again.stderr
    rerun = json.loads(summary_path.read_text())
    kept = ("world_size", "batch_size", "global_batch", "parallel_mode", "comm_sent_mb_per_step", "images_per_sec")
    assert {k: rerun[k] for k in kept} == {k: first[k] for k in kept}


def test_after_falling_back_from_a_torn_last_pt_previous_pt_stays_good(tiny_data, tmp_path):
    """Checkpoints at steps 2 (previous.pt) and 3 (last.pt), last.pt torn: the run resumes from
    step 2 and its next write replaces the torn file instead of rotating it over previous.pt."""
    check(train(tiny_data, tmp_path, "torn", "train.epochs=1", "train.max_steps=3", "checkpoint.every_steps=2",
                nproc=1))  # fmt: skip
    ckpts = tmp_path / "torn" / "checkpoints"
    ckpts.joinpath("last.pt").write_bytes(ckpts.joinpath("last.pt").read_bytes()[:100_000])
    resumed = check(train(tiny_data, tmp_path, "torn", "train.epochs=1", "train.max_steps=4",
                          "checkpoint.every_steps=0", nproc=1))  # fmt: skip
    assert "falling back to" in resumed.stderr and "after step 2 (0 epochs completed)" in resumed.stderr
    assert torch.load(ckpts / "previous.pt", weights_only=True)["progress"]["step"] == 2
    assert torch.load(ckpts / "last.pt", weights_only=True)["progress"]["step"] == 4
    # the same when previous.pt is named explicitly, spelled another way
    ckpts.joinpath("last.pt").write_bytes(ckpts.joinpath("last.pt").read_bytes()[:100_000])
    check(train(tiny_data, tmp_path, "torn", "train.epochs=1", "train.max_steps=5", "checkpoint.every_steps=0",
                f"checkpoint.resume={ckpts}/../checkpoints/previous.pt", nproc=1))  # fmt: skip
    assert torch.load(ckpts / "previous.pt", weights_only=True)["progress"]["step"] == 2
    assert torch.load(ckpts / "last.pt", weights_only=True)["progress"]["step"] == 5


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


def full_disk_run(tiny_data, tmp_path, epochs, full_from):
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_FROM)
    args = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=full", f"train.epochs={epochs}",
            "parallel.timeout_s=30"]  # fmt: skip
    return torchrun([wrapper, *args], env={**os.environ, "FULL_FROM": str(full_from)}), args


def test_a_metrics_file_rank_0_cannot_write_stops_every_rank_with_a_checkpoint(tiny_data, tmp_path):
    """Rank 0 alone writes metrics.jsonl. A record it could not write (a full disk) ended rank 0
    with the error and rank 1 with a gloo traceback, and lost the steps since the last checkpoint.
    Every rank now stops after the next step with a checkpoint, which keeps the records not
    written, and rank 0's reason; the same command resumes and writes them."""
    run = tmp_path / "full"
    proc, args = full_disk_run(tiny_data, tmp_path, epochs=2, full_from=3)
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

    check(torchrun([TRAIN, *args]))  # room on the disk again
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("train", 6), ("train", 7),
                                                          ("val", 7), ("train", 8), ("train", 10), ("train", 12),
                                                          ("train", 14), ("val", 14)]  # fmt: skip
    assert sum(r["count"] for r in records if r["split"] == "train") == 14 * 16  # each step in one record

    # A metrics file rank 0 cannot even open stops every rank before training, naming it.
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    proc = torchrun([TRAIN, *args, "train.epochs=3"])
    assert proc.returncode != 0
    reason = f"error: config key 'run.root': cannot write the run folder {run} ({run}/metrics.jsonl: Is a directory)"
    assert proc.stderr.count(reason) == 2, proc.stderr[-4000:]
    assert "[rank1]: Traceback" not in proc.stderr
    assert proc.stderr.count("train.epochs: 2 -> 3") == 1  # the resume's warnings come from rank 0 alone


def test_a_last_validation_record_rank_0_cannot_write_is_written_by_the_rerun(tiny_data, tmp_path):
    """The run's very last record (its final validation) not written: the run has trained all its
    epochs and still stops with the error; the rerun trains nothing, writes the record and ends
    the run as completed."""
    run = tmp_path / "full"
    proc, args = full_disk_run(tiny_data, tmp_path, epochs=1, full_from=5)  # train 2, 4, 6, 7, then val 7
    assert proc.returncode != 0
    assert proc.stderr.count("training stopped at step 7 with a checkpoint") == 2, proc.stderr[-4000:]
    written = [(r["split"], r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    assert written == [("train", 2), ("train", 4), ("train", 6), ("train", 7)]
    failed = json.loads((run / "summary.json").read_text())  # the session that failed says so
    assert (failed["completed"], failed["stop_reason"], failed["steps"]) == (False, "error", 7)
    assert failed["error"].startswith("MetricsWriteError: ")
    check(torchrun([TRAIN, *args]))
    assert [(r["split"], r["step"]) for r in read_metrics(run / "metrics.jsonl")][-1] == ("val", 7)
    assert json.loads((run / "summary.json").read_text())["completed"]


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


def test_an_unforeseen_failure_of_rank_0_s_share_of_the_work_stops_every_rank(tiny_data, tmp_path):
    """What rank 0 does alone while the others wait for its result (the run folder, checkpoints,
    records) shared only the failures it knew of: any other exception left the other ranks
    waiting in the broadcast until torchrun killed them (or, without an agent, the timeout). It
    is now shared as well, with its type, and rank 0 logs its traceback."""
    wrapper = tmp_path / "unforeseen.py"
    wrapper.write_text(RANK_0_FAILS_UNFORESEEN)
    proc = torchrun([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=x",
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
    proc = torchrun([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=lf",
                     "train.epochs=1", "checkpoint.every_steps=0"])  # fmt: skip
    one_line_per_rank(proc, f"error: {LOADER_FAILED} {stopped}")
    assert proc.stderr.count("rank 1: its loader failed; every rank stops") == 1
    assert "\nRuntimeError: Critical error in pipeline: injected\n" in proc.stderr  # the end of its traceback
    assert not (tmp_path / "lf" / "checkpoints" / "last.pt").exists()


def test_a_run_s_config_yaml_names_its_folder_and_resumes_it(tiny_data, tmp_path):
    """README: config.yaml "loads back to the same configuration". With run.name left empty (the
    config file's name), it held name: '' and `--config runs/demo/config.yaml` started a new run
    in runs/config from step 0; it now names the folder, and the same run resumes."""
    first = check(torchrun([TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "train.epochs=1",
                            "train.max_steps=2"], nproc=1))  # fmt: skip
    assert f"run {tmp_path / 'demo'}:" in first.stderr
    saved = tmp_path / "demo" / "config.yaml"
    assert load_config(str(saved), []).run.name == "demo"
    again = check(torchrun([TRAIN, "--config", saved, "train.max_steps=4"], nproc=1))
    assert "resum" in again.stderr and not (tmp_path / "config").exists()
    records = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert "run.name" not in again.stderr  # not a change of the run's settings


def test_a_resume_on_other_class_folders_is_refused_naming_them(tiny_data, tmp_path):
    """A class folder renamed since the checkpoint shifted the labels after it: the resumed run
    trained on swapped labels without a word and wrote the new names into its checkpoint. One
    added named only fc8's shapes, after falling back to previous.pt. Both now stop at once
    with the folders that differ, and the checkpoint stays as it was."""
    check(train(tiny_data, tmp_path, "cls", "train.epochs=1", "train.max_steps=2", nproc=1))
    last = tmp_path / "cls" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    renamed, added = tmp_path / "renamed", tmp_path / "added"
    for root in (renamed, added):
        shutil.copytree(tiny_data, root)
    for split in ("train", "val"):
        (renamed / split / "circle").rename(renamed / split / "aaa")
        shutil.copytree(added / split / "circle", added / split / "zebra")
    for root, found, differences in ((renamed, 10, "new: aaa; missing: circle"), (added, 11, "new: zebra")):
        proc = train(root, tmp_path, "cls", "train.epochs=1", nproc=1)
        assert proc.returncode != 0 and "[rank0]: Traceback" not in proc.stderr, proc.stderr[-3000:]
        said = f"error: the training data's {found} class folders are not the 10 that checkpoint {last} was trained on"
        assert f"{said} ({differences}): " in proc.stderr
        assert "falling back" not in proc.stderr
    assert last.read_bytes() == before and not (tmp_path / "cls" / "config.1.yaml").exists()
    assert torch.load(last, weights_only=True)["classes"][1] == "circle"


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


def test_ranks_that_see_different_checkpoints_stop_before_training(tiny_data, tmp_path):
    """run.root on node-local disks: rank 0 finds a checkpoint, rank 1 none. Both stop at once
    with a one-line error instead of training from different steps."""
    check(train(tiny_data, tmp_path / "home0" / "runs", "local", "train.epochs=1", "train.max_steps=2", nproc=1))
    (tmp_path / "home1").mkdir()
    proc = torchrun([per_rank_home(tmp_path), *TINY_TRAIN, f"data.root={tiny_data}", "run.root=~/runs",
                     "run.name=local", "train.epochs=1"])  # fmt: skip
    assert proc.returncode != 0
    assert "the ranks found different checkpoints to resume from (rank 0: " in proc.stderr
    assert "(step 2); rank 1: none); run.root (~/runs) must be a folder that every rank sees" in proc.stderr
    assert proc.stderr.count("error: the ranks found different checkpoints") == 2  # said by both, no traceback
    assert "CheckpointError" not in proc.stderr


def test_a_data_folder_one_rank_lacks_stops_every_rank_naming_that_rank(tiny_data, tmp_path):
    """data.root on node-local disks, missing on rank 1's: rank 1 stopped with its error, and rank
    0 waited for it in the next collective (killed by torchrun's agent on one node; on another
    node, until the timeout). Both now stop with rank 1's error, which names the rank."""
    (tmp_path / "home0").mkdir()
    (tmp_path / "home0" / "data").symlink_to(tiny_data)
    (tmp_path / "home1").mkdir()
    proc = torchrun([per_rank_home(tmp_path), *TINY_TRAIN, "data.root=~/data", f"run.root={tmp_path}", "run.name=x",
                     "parallel.timeout_s=30"])  # fmt: skip
    assert proc.returncode != 0
    missing = f"error: rank 1 (of 2): data folder {tmp_path / 'home1' / 'data'} (config key 'data.root') does not exist"
    assert proc.stderr.count(missing) == 2, proc.stderr[-4000:]
    assert not (tmp_path / "x").exists()  # a run that cannot start leaves no trace


def test_an_unusable_run_root_is_named(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = train(tiny_data, blocker, "x", nproc=1)
    assert proc.returncode != 0 and f"error: config key 'run.root': cannot write the run folder {blocker / 'x'}" in (
        proc.stderr
    )
    # a file where the run's checkpoints go: named at the start, not at the first checkpoint
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "checkpoints").write_text("")
    proc = train(tiny_data, tmp_path, "y", nproc=1)
    assert (
        f"cannot write the run folder {tmp_path / 'y'} ({tmp_path / 'y' / 'checkpoints'}: File exists)" in proc.stderr
    )
    assert proc.returncode != 0 and "step 1" not in proc.stderr and not (tmp_path / "y" / "config.yaml").exists()


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    """Only rank 1 gets SIGUSR1; the step's all-reduce of the flag makes rank 0 stop too, and
    each rank says why: its own signal, or another rank's request. A failure on rank 0 stops
    rank 1 as well, and rank 1 tells it from a request."""
    check(torchrun([REPO / "tests" / "dist" / "stop_agree.py", tmp_path], nproc=2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    flags = [(r["before"], r["failed"], r["after"], r["here"]) for r in ranks]
    assert flags == [(False, True, True, False), (False, True, True, True)]
    assert ranks[1]["failed_reason"] == "a failure on another rank"
    assert [r["reason"] for r in ranks] == ["another rank was asked to stop", "signal SIGUSR1"]


def test_the_plateau_schedule_divides_the_rate_and_resumes_with_its_state(tiny_data, tmp_path):
    """The ImageNet recipes' schedule (section 5: divide by 10 when validation stops improving),
    in the trainer: with min_delta out of reach every validation after the first is a plateau
    (patience 1), so the rate is divided after epochs 2 and 3 and epoch 3 trains at 1/10 of it.
    Stopped in epoch 3 and resumed, the run keeps its plateau state: the same rates and, bit for
    bit, the same weights."""
    common = ("train.epochs=3", "schedule.name=plateau", "schedule.min_delta=99.9", "train.log_every=1")
    straight = check(train(tiny_data, tmp_path, "straight", *common, nproc=1))
    assert straight.stderr.count("learning rate divided (reduction") == 2
    rates = {}
    for r in read_metrics(tmp_path / "straight" / "metrics.jsonl"):
        if r["split"] == "train":
            rates.setdefault(r["epoch"], set()).add(r["lr"])
    peak = next(iter(rates[1]))
    assert [sorted(rates[e]) for e in (1, 2, 3)] == [[peak], [peak], [pytest.approx(peak / 10)]]
    check(train(tiny_data, tmp_path, "resumed", *common, "train.max_steps=35", nproc=1))  # 15 steps per epoch
    check(train(tiny_data, tmp_path, "resumed", *common, nproc=1))
    lr = {name: [r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]
          for name in ("straight", "resumed")}  # fmt: skip
    assert lr["straight"] == lr["resumed"] and len(lr["straight"]) == 45
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True)["model"] for n in lr)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_quick_start_generates_the_demo_data_once_under_two_ranks(tmp_path):
    """The README's first command on a fresh machine: launch/train.py with no arguments reads
    data.root="" as the demo dataset and both ranks ask for it at once; one generates it (under
    the cache's lock, renamed into place), the other waits and reads the same files."""
    demo, runs = tmp_path / "cache" / "demo", tmp_path / "runs"
    check(torchrun([TRAIN, f"run.root={runs}", "train.max_steps=2"], env={"ALEXNET_DEMO_DIR": str(demo)}))
    assert (len(list(demo.glob("train/*/*.jpg"))), len(list(demo.glob("val/*/*.jpg")))) == (2600, 500)
    assert sorted(p.name for p in demo.parent.iterdir()) == [".demo.lock", "demo"]  # no leftover copy
    summary = json.loads((runs / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["stop_reason"] == "max_steps"
