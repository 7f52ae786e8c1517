"""DataLoader worker processes that start safely in a process that also runs DALI pipelines.

A DALI pipeline that is unreachable but not yet collected (held by a reference cycle, such as the
traceback of a failed `pipe.run()`) when a DataLoader forks its workers is copied into every
worker. The worker's garbage collector then destroys it there, where the pipeline's threads do not
exist (fork copies only the calling thread): the destructor waits for them forever or aborts the
worker, and a hung worker leaves the main process waiting for its batch forever (DataLoader has no
timeout by default; pytorch/pytorch#21554). The benchmark runs DALI and torchvision contenders in
one process, and a test process runs them one test after another (tests/test_workers.py
reproduces both outcomes).

Why not the `forkserver` or `spawn` start method, which copy nothing: every worker would import torch
and torchvision afresh (seconds per worker on a small machine) and the dataset would have to be
pickled; one collection before the fork keeps DataLoader's default and costs a fraction of a second.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ForkSafeDataLoader(DataLoader):
    """A DataLoader that collects the main process's garbage just before it starts workers.

    Collected there, an unreachable DALI pipeline is destroyed in the process whose threads it waits
    for, and a worker inherits only objects still in use, which it never destroys (a worker leaves
    through `os._exit`). A full collection takes about 0.17 s in a process holding torch,
    torchvision and DALI, so it runs only when workers start: every `__iter__` without persistent
    workers, the first one with them (later epochs reuse the workers; DataLoader keeps them in
    `_iterator`, and without that attribute every epoch collects, which is safe, only slower).
    """

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
