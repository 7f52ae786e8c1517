"""One training session per run folder at a time.

Two sessions in one folder (the same command started twice, a job resubmitted while the first is
still running) would write the same checkpoints, metrics and summary and each resume from the
other's files. The main rank holds an exclusive POSIX record lock (`lockf`) on
`<run folder>/.lock` for the session. The kernel drops it when the process ends, however it ends,
so a crash or SIGKILL leaves no stale lock; and unlike `flock` it is not inherited by forked
children, so DataLoader workers that outlive a killed rank 0 for a few seconds do not keep a
restarted session out. POSIX locks also reach across NFS clients. A file system without locks
gets a warning, not a refusal; one that keeps locks per node (Lustre's `localflock`) cannot stop
a second session on another node.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
import weakref
from pathlib import Path

from alexnet.checkpoint import CheckpointError

log = logging.getLogger("alexnet")
LOCK_FILE = ".lock"
_HELD = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunFolderLock:
    """The held lock; `release`, the object's collection or the process's end frees the folder."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        # Closing the descriptor drops the lock: also when a failed setup drops the object.
        self._finalizer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def lock_run_folder(run_dir: Path) -> RunFolderLock:
    """Take the folder for this session, or raise CheckpointError naming the session that has it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() if exc.errno in _HELD else ""
        os.close(fd)
        if exc.errno in _HELD:
            who = holder or "it has not said who it is"
            raise CheckpointError(
                f"run folder {run_dir} is in use by another training session ({who}); wait for it to end, "
                "or set run.name=<new name> for another run (nothing was written)"
            ) from None
        if exc.errno not in _NO_LOCKS:
            raise
        log.warning("the file system of %s has no file locks: nothing stops a second session from "
                    "writing into this run folder at the same time", run_dir)  # fmt: skip
        return RunFolderLock(None)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
    return RunFolderLock(fd)
