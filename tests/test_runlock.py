"""One training session per run folder: the lock on <run>/.lock, held by real processes."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import REPO, TINY_TRAIN, TRAIN, launch, rank_1_differs

import alexnet.trainer
from alexnet import runlock
from alexnet.checkpoint import CheckpointError
from alexnet.config import load_config
from alexnet.run import run_training
from alexnet.runlock import lock_run_folder

# Takes the lock, forks a child that keeps running (as DataLoader workers do), says so, waits
# (argv[2] seconds, 60 by default); argv[3] names the host it claims to be on.
HOLDER = """
import os, socket, sys, time
from pathlib import Path
from alexnet.runlock import lock_run_folder
if len(sys.argv) > 3:
    socket.gethostname = lambda: sys.argv[3]
lock = lock_run_folder(Path(sys.argv[1]))
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
"""
CAN_LOCK = "import sys, pathlib, alexnet.runlock as r; r.lock_run_folder(pathlib.Path(sys.argv[1]))"


def can_lock_elsewhere(folder: Path) -> bool:
    """Whether another process can take the folder (locks do not conflict within one process)."""
    return subprocess.run([sys.executable, "-c", CAN_LOCK, str(folder)], capture_output=True).returncode == 0


def test_a_killed_holder_frees_the_folder_though_its_forked_child_lives_on(tmp_path):
    """A rank 0 killed outright leaves DataLoader workers that live on for seconds; they hold no
    copy of the lock, so a restarted session gets the folder at once."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        folder = re.escape(str(tmp_path))
        refusal = rf"^run folder {folder} is in use by another training session \(pid {holder.pid} on "
        with pytest.raises(CheckpointError, match=refusal):
            lock_run_folder(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # still running
        lock_run_folder(tmp_path).release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


@pytest.mark.dali
def test_a_busy_folder_is_refused_before_its_checkpoints_are_read(tiny_data, tmp_path):
    """The second session takes the lock before it reads checkpoints (a session ending meanwhile
    would write a newer one): with an unreadable last.pt, the refusal is about the lock, and
    nothing is touched."""
    run = tmp_path / "busy"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        args = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=busy"]
        proc = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: run folder {run} is in use by another training session (pid {holder.pid}")
    assert "last.pt" not in proc.stderr and sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]


@pytest.mark.dali
def test_a_setup_that_fails_frees_the_folder(tiny_data, tmp_path, monkeypatch):
    """A session whose setup fails after it took the folder (here: building the optimizer)
    releases it, also for a caller that goes on in the same process."""

    def broken(*args, **kwargs):
        raise RuntimeError("no optimizer today")

    monkeypatch.setattr(alexnet.trainer, "build_optimizer", broken)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=failed"])
    with pytest.raises(RuntimeError, match="no optimizer today"):
        run_training(cfg, None)
    assert (tmp_path / "failed" / ".lock").exists() and can_lock_elsewhere(tmp_path / "failed")


def test_a_holder_on_another_host_is_waited_for_one_here_is_not(tmp_path, caplog):
    """A node that died keeps its NFS lock until its lease runs out, so a holder on another host
    is waited for (a requeued job on a new node then starts instead of stopping); a holder on
    this host is alive, since the kernel drops a dead process's lock, and is refused at once."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "3", "gone-node"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(CheckpointError, match=r"\(pid \d+ on gone-node, since "):
            lock_run_folder(tmp_path, wait_elsewhere_s=0)
        with caplog.at_level("WARNING", logger="alexnet"):
            lock = lock_run_folder(tmp_path, wait_elsewhere_s=120)  # the holder lets go after 3 s
        assert lock.held and caplog.text.count("is held by a session on another node (pid ") == 1
        assert " on gone-node, since " in caplog.text
        lock.release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


@pytest.mark.dali
def test_the_wait_for_a_holder_elsewhere_stays_inside_every_ranks_timeout(tiny_data, tmp_path):
    """Rank 0 waits for a holder on another host while the other ranks wait for it in a
    collective, each for its own parallel.timeout_s (a node's own tuning): the wait took rank 0's
    (600 s: 150 s of waiting), and rank 1, at 12 s, died of its collective's timeout. The wait now
    takes the shortest, and both stop with the holder named."""
    run = tmp_path / "held"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "60", "gone-node"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        wrapper = rank_1_differs(tmp_path, TRAIN, ("parallel.timeout_s=12",))
        proc = launch([wrapper, *TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=held"])
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)
    refusal = f"error: run folder {run} is in use by another training session (pid {holder.pid} on gone-node, since "
    assert [line.startswith(refusal) for line in proc.stderr.splitlines() if line.startswith("error: ")] == [True] * 2
    # Rank 0 may be stopped by the launcher's SIGTERM once rank 1 has exited, after its line (-15).
    assert 1 in proc.statuses and set(proc.statuses) <= {1, -15}, (proc.statuses, proc.stderr[-3000:])
    assert proc.stderr.count("is held by a session on another node") == 1  # rank 0 waited, and said so


@pytest.mark.dali
def test_a_new_folder_another_session_trained_in_meanwhile_is_refused(tiny_data, tmp_path, monkeypatch):
    """The folder did not exist when this session started (so there was nothing to lock yet),
    and another session created it and wrote checkpoints while this one loaded its data: this
    one stops instead of starting from scratch over them."""
    run = tmp_path / "raced"
    real = alexnet.trainer.build_splits

    def another_session_meanwhile(*args, **kwargs):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(alexnet.trainer, "build_splits", another_session_meanwhile)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=raced",
                             "checkpoint.resume=none"])  # fmt: skip
    with pytest.raises(CheckpointError, match="was started by another session while this one was setting up"):
        run_training(cfg, None)
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"theirs" and not (run / "config.yaml").exists()


@pytest.mark.dali
def test_a_file_system_without_locks_warns_once_and_trains(tiny_data, tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    (tmp_path / "nolocks").mkdir()  # an existing folder: tried before its checkpoints are read, once
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=nolocks",
                             "train.max_steps=1"])  # fmt: skip
    summary = run_training(cfg, None)  # its logging goes to stderr (run_training sets it up)
    assert summary["steps"] == 1 and capsys.readouterr().err.count("has no file locks") == 1


def test_which_holders_are_live_sessions_of_this_host():
    """Refused at once: a live process of this host, or a holder that has not said who it is.
    Waited for: another host, or a pid that is dead here (a node that shares this host's name)."""
    here, since = socket.gethostname(), ", since 2026-12-05 10:00:00"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    assert runlock.holder_is_alive_here(f"pid {os.getpid()} on {here}{since}")
    assert runlock.holder_is_alive_here("")
    assert not runlock.holder_is_alive_here(f"pid {os.getpid()} on elsewhere{since}")
    assert not runlock.holder_is_alive_here(f"pid {dead.pid} on {here}{since}")
    # A damaged .lock: "rank 0 failed: OverflowError" before
    assert not runlock.holder_is_alive_here(f"pid 99999999999999999999 on {here}{since}")
