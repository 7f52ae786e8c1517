"""One training session per run folder at a time.

Two sessions in one folder (the same command started twice, a job resubmitted while the first is
still running) would write the same checkpoints, metrics and summary and each resume from the
other's files. The main rank holds an exclusive `flock` on `<run folder>/.lock` for the session;
the kernel drops it when the process ends, however it ends, so a crash or SIGKILL leaves no stale
lock behind. A file system without locks (some network mounts) gets a warning, not a refusal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from alexnet.checkpoint import CheckpointError

log = logging.getLogger("alexnet")
LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunFolderLock:
    """The held lock; `release` (or the process's end) frees the folder."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops its flock
            self._fd = None


def lock_run_folder(run_dir: Path) -> RunFolderLock:
    """Take the folder for this session, or raise CheckpointError naming the session that has it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise CheckpointError(
            f"run folder {run_dir} is in use by another training session ({holder}); wait for it to end, "
            "or set run.name=<new name> for another run (nothing was written)"
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _NO_LOCKS:
            raise
        log.warning("the file system of %s has no file locks: nothing stops a second session from "
                    "writing into this run folder at the same time", run_dir)  # fmt: skip
        return RunFolderLock(None)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
    return RunFolderLock(fd)
