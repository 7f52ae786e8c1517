"""DataLoader worker processes that start safely in a process that also runs DALI pipelines.

A DALI pipeline that is unreachable but not yet collected (held by a reference cycle, such as the
traceback of a failed `pipe.run()`) when a DataLoader forks its workers is copied into every
worker. The worker's garbage collector then destroys it there, where the pipeline's threads do not
exist (fork copies only the calling thread): the destructor waits for them forever or aborts the
worker, and a hung worker leaves the main process waiting for its batch forever (DataLoader has no
timeout by default; pytorch/pytorch#21554). The benchmark runs DALI and torchvision contenders in
one process, and a test process runs them one test after another (tests/test_workers.py
reproduces both outcomes).

A worker also leaves the run's stop signals to the training process (`keep_run_signals_to_the_parent`):
a SIGTERM to the whole process group killed the workers and failed the run before its stop's
checkpoint.

Why not the `forkserver` or `spawn` start method, which copy nothing: every worker would import torch
and torchvision afresh (seconds per worker on a small machine) and the dataset would have to be
pickled; one collection before the fork keeps DataLoader's default and costs a fraction of a second.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


def keep_run_signals_to_the_parent(worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn's signature
    """A worker's signal handling, set as it starts: the training process alone acts on a stop.

    A signal sent to the whole process group (torchrun passes SIGTERM and SIGINT on so; `kill
    -TERM -PGID`) or to every process of a Slurm job step also reaches the workers. torch's own
    SIGTERM handler in a worker exits quietly only where the parent sent it, and anyone else's
    kills the worker: the training process then failed with "DataLoader worker ... is killed by
    signal: Terminated" in the middle of a step, before its stop's checkpoint. Here SIGTERM from
    the parent (DataLoader's shutdown, multiprocessing's at exit) still ends the worker at once,
    and anyone else's is ignored; SIGINT and SIGUSR1 are ignored (the worker had inherited the
    stop handler and said "Ctrl-C: stopping ..." once for each worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    # The worker's threads block SIGTERM (threads started later inherit the mask); one thread
    # takes each with its sender's pid, which a Python signal handler does not get.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def exit_on_the_parent_s() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # as torch's handler exits on its parent's SIGTERM

    threading.Thread(target=exit_on_the_parent_s, name="sigterm-from-parent", daemon=True).start()


def end_with_the_parent(parent: int) -> None:
    """A process pool's `initializer` (with initargs=(os.getpid(),)): the worker ends within a
    second of its parent. A forked worker holds copies of the parent's descriptors, a lock file's
    among them: a generation SIGKILLed (the OOM killer, torchrun's last kill) left its workers
    waiting for tasks forever, holding the cache's lock, and every later run hung on it without a
    word."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-the-parent", daemon=True).start()


class ForkSafeDataLoader(DataLoader):
    """A DataLoader that collects the main process's garbage just before it starts workers.

    Collected there, an unreachable DALI pipeline is destroyed in the process whose threads it waits
    for, and a worker inherits only objects still in use, which it never destroys (a worker leaves
    through `os._exit`). A full collection takes about 0.17 s in a process holding torch,
    torchvision and DALI, so it runs only when workers start: every `__iter__` without persistent
    workers, the first one with them (later epochs reuse the workers; DataLoader keeps them in
    `_iterator`, and without that attribute every epoch collects, which is safe, only slower).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("worker_init_fn", keep_run_signals_to_the_parent)
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        reuses_workers = self.persistent_workers and getattr(self, "_iterator", None) is not None
        if self.num_workers > 0 and not reuses_workers:
            gc.collect()
        return super().__iter__()

    def close(self) -> None:
        """Stops persistent workers now. Left to the interpreter's exit, multiprocessing terminates
        them (they are daemons) before they remove their temporary folders: each left a
        /tmp/pymp-* folder behind. A DataLoader has no public way to do this; its iterator's
        shutdown (which later calls skip) is what deleting the last reference to it runs."""
        iterator = getattr(self, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            self._iterator = None  # iterated again, the loader starts new workers
