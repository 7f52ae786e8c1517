"""One training session per run folder: the lock on <run>/.lock, held by real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import REPO, TINY_TRAIN, TRAIN

import alexnet.trainer
from alexnet.checkpoint import CheckpointError
from alexnet.config import load_config
from alexnet.run import run_training
from alexnet.runlock import lock_run_folder

# Takes the lock, forks a child that keeps running (as DataLoader workers do), says so, waits.
HOLDER = """
import os, sys, time
from pathlib import Path
from alexnet.runlock import lock_run_folder
lock = lock_run_folder(Path(sys.argv[1]))
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
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
