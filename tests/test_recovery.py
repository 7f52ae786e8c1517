"""Crash recovery without Slurm: SIGKILL of a worker under torchrun --max-restarts, and a kill at
every point of a checkpoint write."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import REPO, TINY_TRAIN, TRAIN, child_pids, running, torchrun
from dist.reference import RECIPE, TOTAL_STEPS, assert_same_weights, reference_run, reference_weights

from alexnet import trainer as trainer_module
from alexnet.checkpoint import atomic_save, load_checkpoint
from alexnet.config import load_config
from alexnet.metrics import read_metrics
from alexnet.run import run_training
from alexnet.trainer import Trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    return reference_weights(tmp_path_factory.getbasetemp(), tiny_data)


def worker_pids(agent_pid: int) -> list[int]:
    """The torchrun agent's children that run train.py, by local rank order of their start."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent_pid and str(TRAIN).encode() in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Poll rank 0's metrics until a training record reaches `step`; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before step {step}")
        try:
            steps = [r["step"] for r in read_metrics(metrics) if r.get("split") == "train"]
        except (OSError, ValueError):  # not written yet, or a line being written
            steps = []
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no training record reached step {step} in {timeout} s")


@pytest.mark.dali
@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_the_group_and_ends_bitwise_equal(tiny_data, tmp_path, reference):
    """A worker SIGKILLed at a random step (and rank): torchrun restarts the group, the run
    resumes from its last checkpoint (every 2 steps) and finishes with the weights of the
    uninterrupted run, bit for bit. ALEXNET_TEST_SEED replays a given draw."""
    seed = int(os.environ.get("ALEXNET_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # From step 3 on a checkpoint exists (written at step 2 before step 3 ran); up to 10 leaves
    # the run several steps to go when the kill lands.
    kill_step, kill_rank = rng.randint(3, 10), rng.randint(0, 1)
    print(f"ALEXNET_TEST_SEED={seed}: SIGKILL local rank {kill_rank} at step {kill_step}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
        TRAIN, *RECIPE, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=killed",
        "checkpoint.every_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "torchrun.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_for_step(tmp_path / "killed" / "metrics.jsonl", kill_step, proc)
            # What a SIGKILL leaves for a scheduler to read: a session that was running (a
            # finished run's summary stayed "completed" through the next session before).
            running_summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
            pids = worker_pids(proc.pid)
            assert len(pids) == 2, f"expected 2 workers under torchrun, found {pids}"
            os.kill(pids[kill_rank], signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert "exitcode: -9" in text, text[-6000:]  # torchrun saw the SIGKILL and restarted the group
    # The restarted group resumed from the latest checkpoint: one of the checkpoint steps (every
    # 2 steps, and the end of epoch 1 at step 7), written before step kill_step's record at the
    # latest (the kill lands at kill_step or a little later).
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    resumed = [int(m) for m in re.findall(rf"resumed from {re.escape(str(last))} after step (\d+) ", text)]
    checkpoint_steps = {s for s in range(1, TOTAL_STEPS) if s % 2 == 0 or s == TOTAL_STEPS // 2}
    assert len(resumed) == 1 and resumed[0] in checkpoint_steps, (resumed, text[-6000:])
    assert kill_step - 2 <= resumed[0] < TOTAL_STEPS, (kill_step, resumed)
    said = (running_summary["stop_reason"], running_summary["completed"], running_summary["steps"])
    assert said == ("running", False, 0)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == TOTAL_STEPS
    # Rank 0 appends a record every step: the second session carried on from a checkpoint, and
    # the records the first wrote after that checkpoint were dropped, so each step is there once.
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps
    assert_same_weights(tmp_path / "killed" / "checkpoints" / "last.pt", reference)


@pytest.mark.dali
@pytest.mark.slow
def test_sigkill_of_torchrun_stops_its_workers_with_a_checkpoint(tiny_data, tmp_path):
    """torchrun starts its workers in sessions of their own: SIGKILLed (kill -9, the OOM killer),
    it signalled none of them, and they trained on to the run's end, holding the run folder's
    lock, so the same command was refused. They now stop after the next step, with a checkpoint,
    as for any stop request."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        TRAIN, *RECIPE, "train.epochs=40", f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=orphaned",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "workers.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        pids = []
        try:
            wait_for_step(tmp_path / "orphaned" / "metrics.jsonl", 2, proc)
            pids = worker_pids(proc.pid)
            assert len(pids) == 2, f"expected 2 workers under torchrun, found {pids}"
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 120
            while any(map(running, pids)) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [pid for pid in pids if running(pid)]
        finally:
            for pid in pids:
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
    text = out.read_text()
    assert not left, f"workers {left} outlived torchrun by 120 s\n{text[-4000:]}"
    why = rf"stopping at step (\d+) on the end of torchrun \(pid {proc.pid}\), which left its workers running"
    said = re.findall(why, text)
    assert len(said) == 2 and len(set(said)) == 1, text[-4000:]  # each rank, at the same step
    step = int(said[0])
    assert 2 <= step < 40 * TOTAL_STEPS // 2, step
    assert load_checkpoint(tmp_path / "orphaned" / "checkpoints" / "last.pt")["progress"]["step"] == step
    summary = json.loads((tmp_path / "orphaned" / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"], summary["completed"]) == ("preempted", step, False)


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_a_torchvision_pipeline_run_with_a_checkpoint(tiny_data, tmp_path):
    """torchrun passes SIGTERM on to each worker's process group, and Slurm to every process of a
    step: the DataLoader workers got it too, died of it, and the run failed ("DataLoader worker
    ... is killed by signal: Terminated") before its stop's checkpoint. The workers now leave it
    to the training process, which stops as on any SIGTERM."""
    cmd = [sys.executable, TRAIN, *RECIPE, "train.epochs=40", "data.pipeline=torchvision", "data.num_threads=2",
           f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=tv"]  # fmt: skip
    out = tmp_path / "train.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)  # fmt: skip
        try:
            wait_for_step(tmp_path / "tv" / "metrics.jsonl", 2, proc)
            workers = [pid for pid in child_pids(proc.pid) if running(pid)]
            assert len(workers) >= 2, workers  # the persistent training workers at least
            os.killpg(proc.pid, signal.SIGTERM)  # the group: the training process and its workers
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:]
    said = re.findall(r"stopping at step (\d+) on signal SIGTERM: writing a checkpoint", text)
    assert len(said) == 1 and "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    assert load_checkpoint(tmp_path / "tv" / "checkpoints" / "last.pt")["progress"]["step"] == int(said[0])
    assert json.loads((tmp_path / "tv" / "summary.json").read_text())["stop_reason"] == "preempted"
    assert not [pid for pid in workers if running(pid)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.dali
@pytest.mark.slow
def test_sigkill_of_a_worker_on_one_of_two_nodes_restarts_the_group_across_nodes(tiny_data, tmp_path, reference):
    """Two torchrun agents (two "nodes" on this machine, one worker each) under --max-restarts,
    with torch's fresh store per round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as slurm/alexnet.sh
    sets it): a worker SIGKILLed on either node is restarted with the other, and the run ends
    with the uninterrupted run's weights. With the store shared among the rounds, the agents'
    restart counts differed (0 on the node without a crash), the workers' per-restart prefixes
    with them, and the group never met again."""
    seed = int(os.environ.get("ALEXNET_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kill_step, kill_node = rng.randint(3, 10), rng.randint(0, 1)
    print(f"ALEXNET_TEST_SEED={seed}: SIGKILL the worker of node {kill_node} at step {kill_step}")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents, logs = [], []
    try:
        for node in (0, 1):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-conf=is_host={int(node == 0)}", "--rdzv-id=two-nodes",
                TRAIN, *RECIPE, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=nodes",
                "checkpoint.every_steps=2", "parallel.timeout_s=60",
            ]  # fmt: skip
            logs.append(open(tmp_path / f"node{node}.log", "w"))  # noqa: SIM115 - closed below
            agents.append(
                subprocess.Popen(list(map(str, cmd)), stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=REPO)
            )
        wait_for_step(tmp_path / "nodes" / "metrics.jsonl", kill_step, agents[0])
        (pid,) = worker_pids(agents[kill_node].pid)
        os.kill(pid, signal.SIGKILL)
        for agent in agents:
            agent.wait(timeout=300)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(t[-4000:] for t in texts)
    assert "exitcode: -9" in texts[kill_node], texts[kill_node][-4000:]
    last = tmp_path / "nodes" / "checkpoints" / "last.pt"
    resumed = re.findall(rf"resumed from {re.escape(str(last))} after step \d+ ", "".join(texts))  # by rank 0
    assert len(resumed) == 1, "\n".join(t[-4000:] for t in texts)
    steps = [r["step"] for r in read_metrics(tmp_path / "nodes" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps
    assert_same_weights(last, reference)


def test_a_kill_at_any_point_of_a_checkpoint_write_leaves_loadable_checkpoints(tmp_path):
    """For every file-system operation of a write (the data in quarters, the fsyncs, the link
    that keeps previous.pt, the renames), a writer SIGKILLed just before it leaves a last.pt
    that loads and holds either the old or the new checkpoint; previous.pt loads too and is of an
    earlier step (killed between the renames it was last.pt's second name, (1, 1), before the
    replaced last.pt became previous.pt only once the new one was in place); the next write
    succeeds and removes the dead writer's temporary files."""
    helper = REPO / "tests" / "dist" / "ckpt_crash.py"
    proc = subprocess.run(
        [sys.executable, str(helper), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    points = json.loads((tmp_path / "points.json").read_text())
    operations, killed = points["operations"], points["killed"]
    assert sum(op.startswith("write") for op in operations) == 4 and "replace" in operations
    assert killed == [True] * len(operations) + [False]
    held = []
    for k in range(len(operations) + 1):
        folder = tmp_path / f"point-{k}"
        last = load_checkpoint(folder / "last.pt")["progress"]["step"]
        previous = load_checkpoint(folder / "previous.pt")["progress"]["step"]
        assert (last, previous) in {(1, 0), (2, 0), (2, 1)}, (k, operations[k : k + 1], last, previous)
        held.append(last)
        atomic_save({"format": 1, "model": {"w": torch.zeros(1)}, "progress": {"step": 3}}, folder)
        assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]
        assert load_checkpoint(folder / "previous.pt")["progress"]["step"] == last
    # the old checkpoint until the rename of the new one, the new one after it
    switch = held.index(2)
    assert held == [1] * switch + [2] * (len(held) - switch) and 0 < switch < len(held)
    assert operations[switch - 1] == "replace"


@pytest.mark.dali
@pytest.mark.slow
def test_auto_resume_falls_back_to_previous_when_last_is_truncated(tiny_data, tmp_path, tmp_path_factory, reference):
    """The uninterrupted run's folder, rewound: last.pt (step 14) cut in half as a crash of the
    disk might leave it, previous.pt (step 7, the end of epoch 1) intact. auto resume names the
    broken file, falls back to previous.pt, trains epoch 2 again and ends bit for bit where the
    uninterrupted run ended."""
    run = tmp_path / "fallback"
    shutil.copytree(reference_run(tmp_path_factory.getbasetemp(), tiny_data), run)
    last, previous = run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt"
    assert torch.load(previous, weights_only=True)["progress"]["step"] == TOTAL_STEPS // 2
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    (run / "summary.json").unlink()
    proc = torchrun([TRAIN, *RECIPE, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=fallback"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"checkpoint {last} cannot be loaded" in proc.stderr and f"falling back to {previous}" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == TOTAL_STEPS
    assert_same_weights(last, reference)


def tiny_run(tiny_data, tmp_path, *extra):
    """One process, 120 images at batch 8: 15 steps per epoch."""
    return load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=r", *extra])


def crash_back_to_previous(run: Path) -> None:
    """What a crash after the last checkpoint write and before the next leaves: a run folder whose
    newest checkpoint is the one before (the records written after it are still in the file)."""
    ckpts = run / "checkpoints"
    os.replace(ckpts / "previous.pt", ckpts / "last.pt")


@pytest.mark.dali
def test_a_crash_between_a_checkpoint_and_the_next_record_loses_no_step_from_the_records(tiny_data, tmp_path):
    """Logged every 3 steps, checkpointed every 4: the checkpoint at step 4 fell inside the window
    of steps 4-6. Resumed from it, the run dropped that window's record (written after the
    checkpoint) and began a new one at step 5: step 4 was in no record. The window is closed at
    each checkpoint now, so every step is in exactly one record."""
    common = ("train.epochs=1", "train.log_every=3", "checkpoint.every_steps=4")
    run_training(tiny_run(tiny_data, tmp_path, *common, "train.max_steps=6"), None)
    crash_back_to_previous(tmp_path / "r")  # last.pt at step 4, records up to step 6
    summary = run_training(tiny_run(tiny_data, tmp_path, *common, "train.max_steps=9"), None)
    train = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["steps"]) for r in train] == [(3, 3), (4, 1), (6, 2), (8, 2), (9, 1)]
    assert sum(r["count"] for r in train) == summary["train_images"] == 9 * 8


@pytest.mark.dali
def test_a_run_stopped_at_an_epochs_last_step_validates_that_epoch_when_resumed(tiny_data, tmp_path, monkeypatch):
    """train.max_steps = one epoch, with a checkpoint at that step written before the epoch's
    validation, and a crash during the validation: the resumed run validated nothing and ended
    at 0 epochs (it stopped on max_steps before looking whether the epoch was done)."""
    common = ("train.epochs=2", "train.max_steps=15", "checkpoint.every_steps=15")

    def crash(self, epoch):
        raise RuntimeError("the node died during validation")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_validate", crash)
        with pytest.raises(RuntimeError, match="node died"):
            run_training(tiny_run(tiny_data, tmp_path, *common), None)
    summary = run_training(tiny_run(tiny_data, tmp_path, *common), None)
    val = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "val"]
    assert [(r["epoch"], r["step"]) for r in val] == [(1, 15)]
    assert (summary["epochs"], summary["steps"], summary["stop_reason"]) == (1, 15, "max_steps")
    assert summary["final_top1"] == val[0]["top1"]


@pytest.mark.dali
def test_a_stop_request_during_a_step_takes_effect_after_the_next_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """The ranks agree on each batch before its step, so a request that comes during step 3 is
    seen with batch 4, which is trained before the stop: the checkpoint (step 4) holds each
    loader's position after the batches it trained, and the resumed run ends with the weights of
    an uninterrupted one."""
    stop = tmp_path / "STOP"
    monkeypatch.setenv("ALEXNET_STOP_FILE", str(stop))
    accumulated_step, steps = trainer_module.accumulated_step, []

    def asked_during_step_3(*args):
        steps.append(1)
        if len(steps) == 3:
            stop.write_text("")
        return accumulated_step(*args)

    common = ("train.epochs=1", "checkpoint.every_steps=0")
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "accumulated_step", asked_during_step_3)
        summary = run_training(tiny_run(tiny_data, tmp_path, *common), None)
    assert (summary["stop_reason"], summary["steps"]) == ("preempted", 4)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["progress"]["step"] == 4
    assert not stop.exists()  # served: rank 0 removed it after the checkpoint, so the same command resumes
    assert run_training(tiny_run(tiny_data, tmp_path, *common), None)["steps"] == 15
    run_training(tiny_run(tiny_data, tmp_path, *common, "run.name=straight"), None)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())


@pytest.mark.dali
def test_a_stop_during_a_validation_checkpoints_there_and_the_resume_validates_without_training(
    tiny_data, tmp_path, monkeypatch
):
    """A stop file that appears as epoch 1's validation starts: the run stopped only after the
    whole validation, which can outlast torchrun's --shutdown-timeout. It now checkpoints within
    the validation, the epoch's 15 steps taken and the epoch not counted; the resumed run
    validates epoch 1 without training it again, and ends with the weights and records of an
    uninterrupted run."""
    stop = tmp_path / "STOP"
    monkeypatch.setenv("ALEXNET_STOP_FILE", str(stop))
    validate, eval_batch, batches = Trainer._validate, trainer_module.eval_batch, []

    def stop_then_validate(self, epoch):
        if epoch == 0:
            stop.write_text("")
        return validate(self, epoch)

    def counted_eval_batch(*args):
        batches.append(1)
        return eval_batch(*args)

    common = ("train.epochs=2", "checkpoint.every_steps=0")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_validate", stop_then_validate)
        patch.setattr(trainer_module, "eval_batch", counted_eval_batch)
        summary = run_training(tiny_run(tiny_data, tmp_path, *common), None)
    assert (summary["stop_reason"], summary["steps"], summary["epochs"]) == ("preempted", 15, 0)
    assert not batches  # of 7: stopped before the first
    progress = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["progress"]
    assert (progress["step"], progress["epoch"], progress["epoch_trained"]) == (15, 0, True)
    assert not [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "val"]
    shutil.copytree(tmp_path / "r", tmp_path / "halved")

    assert not stop.exists()  # served: rank 0 removed it after the checkpoint, so the same command resumes
    summary = run_training(tiny_run(tiny_data, tmp_path, *common), None)
    assert (summary["stop_reason"], summary["steps"], summary["epochs"]) == ("completed", 30, 2)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records if r["split"] == "val"] == [(1, 15), (2, 30)]
    assert sum(r["count"] for r in records if r["split"] == "train") == 30 * 8

    run_training(tiny_run(tiny_data, tmp_path, *common, "run.name=straight"), None)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())

    # Resumed at half the batch (30 steps per epoch): the schedule stands one epoch in (step 15
    # is position 30), not at the start (it followed the loader's position, which already
    # counts from epoch 2, and put every decay an epoch late), and train.max_steps at the end
    # of epoch 2 (15 + 30 steps) ends that epoch: validated and counted.
    halved = (*common, "run.name=halved", "data.batch_size=4", "train.max_steps=45")
    summary = run_training(tiny_run(tiny_data, tmp_path, *halved), None)
    assert (summary["stop_reason"], summary["steps"], summary["epochs"]) == ("completed", 45, 2)
    assert load_checkpoint(tmp_path / "halved" / "checkpoints" / "last.pt")["schedule"]["step_offset"] == 15
    records = read_metrics(tmp_path / "halved" / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records if r["split"] == "val"] == [(1, 15), (2, 45)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("checkpoint: {resume: /runs/a/last.pt}\n", "/runs/a/last.pt"),
        ("checkpoint: {resume: auto}\n", None),
        ("checkpoint: auto\n", None),  # AttributeError: 'str' object has no attribute 'get', on every rank
        ("checkpoint: [1, 2]\n", None),
        ("- a list\n", None),
        ("{unclosed\n", None),
    ],
)
def test_the_recorded_resume_of_a_hand_edited_config_yaml_is_read_or_left(tmp_path, text, expected):
    """A run's config.yaml, read when checkpoint.resume names a file and the run has a last.pt, may
    hold anything after a hand edit: what is not a recorded file is no record."""
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert trainer_module._recorded_resume(config) == expected
