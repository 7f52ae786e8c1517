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

A holder on another host is waited for (up to HOLDER_ELSEWHERE_WAIT_S) before the folder is
refused: when a node dies, an NFS server keeps its locks until the client's lease runs out (90 s
by default in NFSv4), and a Slurm job requeued onto another node at once would otherwise stop.
A live holder on this host is refused at once (the kernel would have dropped a dead one's lock;
a dead pid under this host's name is another node that shares the name, and is waited for).

The lock is per process, as POSIX locks are: one process is one session (launch/train.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import time
import weakref
from pathlib import Path

from alexnet.checkpoint import CheckpointError
from pipelines.outputs import process_runs

log = logging.getLogger("alexnet")
LOCK_FILE = ".lock"
HOLDER_ELSEWHERE_WAIT_S = 150.0
_RETRY_S = 5.0
_HOLDER = re.compile(r"pid (\d+) on (\S+), since ")
_HELD = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunFolderLock:
    """The outcome of taking a folder: held (`fd`), or `checked` on a file system without locks.
    `release`, the object's collection or the process's end frees the folder."""

    def __init__(self, fd: int | None = None, checked: bool = False) -> None:
        self.checked = checked or fd is not None  # lock_run_folder has run: do not try (and warn) again
        # Closing the descriptor drops the lock: also when a failed setup drops the object.
        self._finalizer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def holder_is_alive_here(holder: str) -> bool:
    """Whether a holder line 'pid N on HOST, since ...' names a live process of this host. A
    holder elsewhere (or on a node that shares this one's host name, as containers may) is not:
    here, the kernel would have dropped a dead process's lock."""
    match = _HOLDER.match(holder)
    if match is None:
        return True  # it has not said who it is: take it for a live session
    pid, host = int(match.group(1)), match.group(2)
    return host == socket.gethostname() and process_runs(pid)


def lock_run_folder(run_dir: Path, wait_elsewhere_s: float = HOLDER_ELSEWHERE_WAIT_S) -> RunFolderLock:
    """Take the folder for this session, or raise CheckpointError naming the session that has it."""
    deadline = time.monotonic() + wait_elsewhere_s
    warned = False
    while True:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() if exc.errno in _HELD else ""
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                log.warning("the file system of %s has no file locks: nothing stops a second session from "
                            "writing into this run folder at the same time", run_dir)  # fmt: skip
                return RunFolderLock(checked=True)
            if exc.errno not in _HELD:
                raise
            if holder_is_alive_here(holder) or time.monotonic() >= deadline:
                who = holder or "it has not said who it is"
                raise CheckpointError(
                    f"run folder {run_dir} is in use by another training session ({who}); wait for it to end, "
                    "or set run.name=<new name> for another run (nothing was written)"
                ) from None
            if not warned:
                log.warning("run folder %s is held by a session on another node (%s): waiting up to %.0f s in "
                            "case that node is gone and its lock not yet released",
                            run_dir, holder, wait_elsewhere_s)  # fmt: skip
                warned = True
            time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
    return RunFolderLock(fd)
