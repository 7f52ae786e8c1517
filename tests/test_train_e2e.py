"""launch/train.py end to end: a 2-rank run's records and checkpoints, exact resumes (mid-epoch,
after a stop request, with the plateau schedule), reruns and the run folder's rules."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _helpers import DEMO_CONFIG, REPO, TINY_FC_WIDTH, TINY_TRAIN, TRAIN, check, launch, one_process, tiny_run_config
from _helpers import train_tiny as train

from alexnet.checkpoint import CheckpointError
from alexnet.config import load_config
from alexnet.metrics import read_metrics
from alexnet.run import run_training
from alexnet.runlock import lock_run_folder
from pipelines.demo import DemoSpec, write_demo_dataset

pytestmark = [pytest.mark.slow, pytest.mark.dali]  # every run here trains with the default data.pipeline=dali

# A launch (every process importing torch, torchrun's agent, the process group) costs several
# times the training of a tiny run: the uninterrupted runs that several tests read or continue are
# made once per module (pytest-xdist's --dist loadfile keeps the module on one worker).

# The 2-rank reference run: 2 epochs of 7 steps (120 train images over 2 ranks at batch 8).
TWO_EPOCHS = ("train.epochs=2", "checkpoint.every_steps=3", "run.plot=true")
# The interrupted runs compared with it: the curves are drawn after training, not compared.
TWO_EPOCHS_UNPLOTTED = (*TWO_EPOCHS, "run.plot=false")


@pytest.fixture(scope="module")
def two_epochs(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """The 2-rank run of TWO_EPOCHS, uninterrupted, in `root`/e2e: its records are checked by
    test_two_rank_run_writes_metrics_config_and_checkpoint, its weights are the ones the resumed
    runs must reach, and two tests rerun it (nothing to train: only summary.json is rewritten,
    whose first version `summary` keeps)."""
    root = tmp_path_factory.mktemp("two_epochs")
    proc = check(train(tiny_data, root, "e2e", *TWO_EPOCHS))
    run = root / "e2e"
    return SimpleNamespace(root=root, run=run, proc=proc, summary_text=(run / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_epoch(tiny_data, tmp_path_factory) -> Path:
    """A finished 1-process run of 1 epoch (15 steps), `run.root`/base. The tests of commands it
    refuses use it as it is (and check that they left it so); those that continue or change it
    take a copy (copy_run)."""
    root = tmp_path_factory.mktemp("one_epoch")
    check(train(tiny_data, root, "base", "train.epochs=1", nproc=1))
    return root / "base"


def copy_run(run: Path, name: str) -> Path:
    """A copy of the run folder `run` beside it, as run `name`: in the same run.root, a command that
    continues it differs from the run's own in run.name alone, which names the folder and is no
    setting of the run (a resume does not list it as changed). Without the lock file, which the
    kernel's lock, not the file, makes held."""
    copy = run.parent / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """10 classes x (3 train + 1 val) JPEGs: 3 steps of batch 8 per epoch on 1 process, for a
    claim about epochs, not about what is learned in them."""
    root = tmp_path_factory.mktemp("small_data")
    write_demo_dataset(root, DemoSpec(train_per_class=3, val_per_class=1, min_side=72, max_side=100, seed=7))
    return root


def test_two_rank_run_writes_metrics_config_and_checkpoint(tiny_data, two_epochs):
    run, root = two_epochs.run, two_epochs.root
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
        DEMO_CONFIG, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={root}", "run.name=e2e", *TWO_EPOCHS]
    )
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert payload["progress"]["epoch"] == 2 and payload["progress"]["step"] == 14
    assert "conv1.0.weight" in payload["model"] and not any(k.startswith("module.") for k in payload["model"])
    assert set(payload["loaders"]["train"]) == {"0", "1"}
    # every_steps=3 and the epoch ends (7, 14) write at 3, 6, 7, 9, 12, 14: the one before the last is 12
    assert torch.load(run / "checkpoints" / "previous.pt", weights_only=True)["progress"]["step"] == 12
    summary = json.loads(two_epochs.summary_text)
    assert summary["completed"] and summary["steps"] == 14 and summary["world_size"] == 2
    assert summary["gpu_hours"] == 0.0 and not summary["paper"]["comparable"]  # CPU; 10 classes, not ImageNet
    assert (run / "training_curves.png").stat().st_size > 10_000
    assert "best val top-1" in two_epochs.proc.stderr + two_epochs.proc.stdout
    # The same command again (a Slurm requeue that missed the .completed marker) finds nothing to
    # train and rewrites the same summary: the figures are the run's, not this empty session's.
    assert summary["comm_sent_mb_per_step"]["grad_allreduce"] > 0
    again = check(train(tiny_data, root, "e2e", *TWO_EPOCHS))
    assert "nothing to train" in again.stderr
    rewritten = json.loads((run / "summary.json").read_text())
    assert rewritten.pop("session_seconds") < summary.pop("session_seconds")  # only this one is the session's
    assert rewritten == summary


def test_resume_mid_epoch_gives_identical_weights(tiny_data, tmp_path, two_epochs):
    """The 14 steps of the 2-rank run straight vs 5 steps, stop, resume, 9 more: bitwise equal
    weights. Step 5 is in the middle of epoch 1 (7 steps per epoch), so the resume restores the
    loaders' positions, the dropout counter and the momentum, and crosses an epoch boundary and a
    validation."""
    first = check(train(tiny_data, tmp_path, "resumed", *TWO_EPOCHS_UNPLOTTED, "train.max_steps=5"))
    assert "stopped" in first.stderr + first.stdout
    half = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert half["progress"]["step"] == 5 and half["loaders"]["train"]["0"]["pos"] == 5
    second = check(train(tiny_data, tmp_path, "resumed", *TWO_EPOCHS_UNPLOTTED))
    assert "resumed from" in second.stderr + second.stdout

    a = torch.load(two_epochs.run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 14
    assert not torch.equal(a["model"]["fc8.0.weight"], half["model"]["fc8.0.weight"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert set(a["optimizer"]["momentum"]) == set(a["model"])
    for name, buffer in a["optimizer"]["momentum"].items():
        assert torch.equal(buffer, b["optimizer"]["momentum"][name]), name
    straight_val = [r for r in read_metrics(two_epochs.run / "metrics.jsonl") if r["split"] == "val"]
    resumed_val = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["split"] == "val"]
    assert straight_val[0]["top1"] == resumed_val[0]["top1"] and straight_val[0]["loss"] == resumed_val[0]["loss"]


def test_fresh_start_refuses_to_overwrite_a_run(tiny_data, one_epoch):
    before = (one_epoch / "checkpoints" / "last.pt").read_bytes()
    proc = train(tiny_data, one_epoch.parent, one_epoch.name, "checkpoint.resume=none", "train.epochs=1", nproc=1)
    assert proc.returncode == 2  # the command's settings disagree with the folder: a configuration error
    assert "already holds checkpoints" in proc.stderr
    assert (one_epoch / "checkpoints" / "last.pt").read_bytes() == before


def test_stop_request_checkpoints_on_all_ranks_and_resumes_exactly(tiny_data, tmp_path, two_epochs):
    """A stop file (what the Slurm script writes on SIGUSR1) present from the start: both ranks
    agree to stop after their first step, write one checkpoint, exit 0, and rank 0 removes the
    file (left in place, it stopped every rerun after one step); the rerun finishes, across an
    epoch's end and its validation, with the weights of the uninterrupted 2-rank run, and only it
    marks the run completed (the Slurm script's sign not to requeue)."""
    common = TWO_EPOCHS_UNPLOTTED
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
    assert (tmp_path / "STOP.completed").read_text() == "completed at step 14\n"  # and not this one
    a = torch.load(tmp_path / "pre" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(two_epochs.run / "checkpoints" / "last.pt", weights_only=True)["model"]
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
        # Both ranks refuse; the slower may be stopped by torchrun's SIGTERM (-15) once the first has
        # exited with it, before its own line (one fresh-clone run under load).
        said = second.stderr.count(refusal)
        assert second.returncode != 0 and said in (1, 2) and set(second.statuses) <= {1, -15}, second.stderr[-4000:]
        assert said == 2 or -15 in second.statuses, second.stderr[-4000:]  # a rank silent only where killed
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


def test_a_session_that_takes_no_step_leaves_the_checkpoint_as_it_was(tiny_data, tmp_path, caplog):
    """A rerun past train.max_steps with another learning rate rewrote last.pt with its settings:
    the next resume said the checkpoint's optim.lr was 0.1 and its peak learning rate 10x the one
    every step was taken at. In this process: three sessions, each seconds shorter than a launch."""

    def session(*extra):
        caplog.clear()
        with caplog.at_level("INFO", logger="alexnet"):
            run_training(tiny_run_config(tiny_data, tmp_path, "idle", *extra), str(DEMO_CONFIG))
        return caplog.text

    session("train.max_steps=2")
    checkpoints = tmp_path / "idle" / "checkpoints"
    before = (checkpoints / "last.pt").read_bytes()
    idle = session("train.max_steps=2", "optim.lr=0.1")
    assert "optim.lr: 0.01 -> 0.1" in idle  # the change is said, and nothing is trained with it
    assert (checkpoints / "last.pt").read_bytes() == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]  # nothing rotated
    resumed = session("train.max_steps=3")
    assert "resumed from" in resumed and "optim.lr" not in resumed  # the settings its steps were taken with
    assert torch.load(checkpoints / "last.pt", weights_only=True)["progress"]["step"] == 3


def test_resuming_a_finished_run_with_other_settings_says_so_and_keeps_both_configs(tiny_data, tmp_path, one_epoch):
    """A finished run (a copy of the shared one) rerun with a changed setting: the log names the
    change and that nothing is left to train, config.yaml is this session's and the earlier one
    stays as config.1.yaml; a checkpoint of another run is refused in a folder that has
    checkpoints of its own."""
    run = copy_run(one_epoch, "done")
    first_config = (run / "config.yaml").read_text()
    lr = load_config(run / "config.yaml").optim.lr
    again = check(train(tiny_data, run.parent, "done", "train.epochs=1", f"optim.lr={lr * 5}", nproc=1))
    assert f"optim.lr: {lr!r} -> {lr * 5!r}" in again.stderr
    assert "has already trained its 1 epochs: nothing to train" in again.stderr
    assert (run / "config.1.yaml").read_text() == first_config
    assert load_config(run / "config.yaml").optim.lr == lr * 5
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    refused = train(tiny_data, run.parent, "done", "train.epochs=2", f"checkpoint.resume={elsewhere}", nproc=1)
    assert refused.returncode == 2 and "already holds checkpoints of its own" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == kept
    configs = {p.name: p.read_text() for p in run.glob("config*.yaml")}
    unfit = train(tiny_data, run.parent, "done", "train.epochs=2", "model.num_classes=12", nproc=1)
    assert unfit.returncode == 2 and "does not fit this model" in unfit.stderr  # the command must change
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
    # A session resuming with the default (auto) keeps the start file in config.yaml and its
    # checkpoint: the start command given again (a requeue) was refused as another run's start.
    check(train(tiny_data, tmp_path, "tuned", "train.epochs=2", "train.max_steps=18", nproc=1))
    assert load_config(tmp_path / "tuned" / "config.yaml").checkpoint.resume == str(elsewhere)
    requeued = check(train(tiny_data, tmp_path, "tuned", *tuned[:1], "train.max_steps=18", tuned[2], nproc=1))
    assert "continuing from its own checkpoints" in requeued.stderr


def test_the_best_validation_keeps_its_kind_when_a_resume_changes_data_val_ten_crop(tiny_data, one_epoch):
    """An epoch validated on the centre crop, then one on ten crops after a resume with
    data.val_ten_crop=true and a learning rate too small to move the weights: each record says
    which it was and counts every image once, and the best (the first: after one epoch the
    centre crop scores this model higher) keeps its kind; the summary used to take the last
    session's setting. The first epoch is the shared finished run's (a copy)."""
    run = copy_run(one_epoch, "tc")
    check(train(tiny_data, run.parent, "tc", "train.epochs=2", "optim.lr=1e-9", "data.val_ten_crop=true", nproc=1))
    vals = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"]
    assert [(r["epoch"], r["ten_crop"], r["count"]) for r in vals] == [(1, False, 50), (2, True, 50)]
    assert (vals[0]["top1"], vals[0]["top5"]) > (vals[1]["top1"], vals[1]["top5"]), vals
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_top1"], summary["best_top5"], summary["best_ten_crop"]) == (
        vals[0]["top1"],
        vals[0]["top5"],
        False,
    )


def test_a_rerun_with_nothing_to_train_keeps_the_summary_of_the_steps_taken(tiny_data, two_epochs):
    """A finished 2-process run (the shared one) rerun on 1 process: nothing is left to train, and
    summary.json said world_size 1, global batch 8 and no bytes sent, about steps 2 processes had
    taken."""
    summary_path = two_epochs.run / "summary.json"
    first = json.loads(two_epochs.summary_text)
    assert (first["world_size"], first["global_batch"], first["parallel_mode"]) == (2, 16, "dp")
    assert first["comm_sent_mb_per_step"]
    again = check(train(tiny_data, two_epochs.root, "e2e", *TWO_EPOCHS, nproc=1))
    assert "nothing to train" in again.stderr
    assert " on 2 process(es), " in again.stderr and " on 1 process(es)" not in again.stderr  # the summary line
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


def test_a_run_s_config_yaml_names_its_folder_and_resumes_it(tiny_data, tmp_path):
    """README: config.yaml "loads back to the same configuration". With run.name left empty (the
    config file's name), it held name: '' and `--config runs/demo/config.yaml` started a new run
    in runs/config from step 0; it now names the folder, and the same run resumes."""
    first = check(one_process([TRAIN, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "train.epochs=1",
                               "train.max_steps=2"]))  # fmt: skip
    assert f"run {tmp_path / 'demo'}:" in first.stderr
    saved = tmp_path / "demo" / "config.yaml"
    assert load_config(str(saved), []).run.name == "demo"
    again = check(one_process([TRAIN, "--config", saved, "train.max_steps=4"]))
    assert "resum" in again.stderr and not (tmp_path / "config").exists()
    records = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert "run.name" not in again.stderr  # not a change of the run's settings


def test_a_resume_on_other_class_folders_is_refused_naming_them(tiny_data, tmp_path, one_epoch):
    """A class folder renamed since the checkpoint shifted the labels after it: the resumed run
    trained on swapped labels without a word and wrote the new names into its checkpoint. One
    added named only fc8's shapes, after falling back to previous.pt. Both now stop at once
    with the folders that differ, and the checkpoint (the shared finished run's) stays as it was."""
    last = one_epoch / "checkpoints" / "last.pt"
    before = last.read_bytes()
    renamed, added = tmp_path / "renamed", tmp_path / "added"
    for root in (renamed, added):
        shutil.copytree(tiny_data, root)
    for split in ("train", "val"):
        (renamed / split / "circle").rename(renamed / split / "aaa")
        shutil.copytree(added / split / "circle", added / split / "zebra")
    for root, found, differences in ((renamed, 10, "new: aaa; missing: circle"), (added, 11, "new: zebra")):
        proc = train(root, one_epoch.parent, one_epoch.name, "train.epochs=2", nproc=1)  # an epoch to train
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        said = f"error: the training data's {found} class folders are not the 10 that checkpoint {last} was trained on"
        assert f"{said} ({differences}): " in proc.stderr
        assert "falling back" not in proc.stderr
    assert last.read_bytes() == before and not (one_epoch / "config.1.yaml").exists()
    assert torch.load(last, weights_only=True)["classes"][1] == "circle"


def test_the_plateau_schedule_divides_the_rate_and_resumes_with_its_state(small_data, tmp_path):
    """The ImageNet recipes' schedule (section 5: divide by 10 when validation stops improving),
    in the trainer: with min_delta out of reach every validation after the first is a plateau
    (patience 1), so the rate is divided after epochs 2 and 3 and epoch 3 trains at 1/10 of it
    (3 steps per epoch, small_data: the schedule reads validations, not what they score).
    Stopped in epoch 3 and resumed, the run keeps its plateau state: the same rates and, bit for
    bit, the same weights."""
    common = ("train.epochs=3", "schedule.name=plateau", "schedule.min_delta=99.9", "train.log_every=1")
    straight = check(train(small_data, tmp_path, "straight", *common, nproc=1))
    assert straight.stderr.count("learning rate divided (reduction") == 2
    rates = {}
    for r in read_metrics(tmp_path / "straight" / "metrics.jsonl"):
        if r["split"] == "train":
            rates.setdefault(r["epoch"], set()).add(r["lr"])
    peak = next(iter(rates[1]))
    assert [sorted(rates[e]) for e in (1, 2, 3)] == [[peak], [peak], [pytest.approx(peak / 10)]]
    check(train(small_data, tmp_path, "resumed", *common, "train.max_steps=8", nproc=1))  # 3 steps per epoch
    check(train(small_data, tmp_path, "resumed", *common, nproc=1))
    lr = {name: [r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]
          for name in ("straight", "resumed")}  # fmt: skip
    assert lr["straight"] == lr["resumed"] and len(lr["straight"]) == 9
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True)["model"] for n in lr)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_quick_start_generates_the_demo_data_once_under_two_ranks(tmp_path):
    """The README's first command on a fresh machine: launch/train.py with no arguments reads
    data.root="" as the demo dataset and both ranks ask for it at once; one generates it (under
    the cache's lock, renamed into place), the other waits and reads the same files. The model,
    batch and plot of the tests' tiny recipe (not its data settings): the 2 steps are not the claim."""
    demo, runs = tmp_path / "cache" / "demo", tmp_path / "runs"
    smaller = (f"model.fc_width={TINY_FC_WIDTH}", "data.batch_size=8", "run.plot=false")
    check(launch([TRAIN, f"run.root={runs}", "train.max_steps=2", *smaller], env={"ALEXNET_DEMO_DIR": str(demo)}))
    assert (len(list(demo.glob("train/*/*.jpg"))), len(list(demo.glob("val/*/*.jpg")))) == (2600, 500)
    assert sorted(p.name for p in demo.parent.iterdir()) == [".demo.lock", "demo"]  # no leftover copy
    summary = json.loads((runs / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["stop_reason"] == "max_steps"
