"""How the training process's host (CPU) memory allocator treats big tensors.

glibc's malloc serves every request above its mmap threshold (32 MiB at most on 64-bit Linux)
with a fresh `mmap` and gives it back to the kernel on `free`. A CPU training step allocates and
frees dozens of such tensors every step (the paper model's conv1 activation alone is 37 MB at
batch 32), so every step touches brand-new pages and pays a page fault plus a kernel zero-fill per
4 KiB of each of them. PyTorch's CPU performance guide recommends preloading jemalloc or tcmalloc
for this reason; glibc does the same once told to keep freed memory in the process heap
(`mallopt`), which needs no extra library and no `LD_PRELOAD`.

The cost of "retain": the process keeps its peak heap size after a peak instead of returning it
to the kernel. A training process reaches its working set in the first steps and stays there, so
that is the right trade; `train.host_memory=system` leaves glibc's defaults, or, in a process
where an earlier run retained (a notebook's second run), puts back their values (glibc's adaptive
mmap threshold, which any mallopt turns off, stays off).

The setting lives in the process's C library state: processes forked later (DataLoader workers
under the default "fork" start method) inherit it, spawned ones start with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Literal

HostMemory = Literal["retain", "system"]

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap beyond this (2 GiB) goes back to the kernel.
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
# glibc's defaults (malloc/malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD).
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
# Whether this process's allocator retains: process state, as the C library's own is (a forked
# child inherits both; a spawned one starts with neither). A later "system" puts glibc's values back.
_ALLOCATOR = {"retained": False}


def apply_host_memory(policy: HostMemory) -> bool:
    """Apply `policy` to this process (and to processes forked from it later). True when the
    allocator was changed; False for "system", where the C library is not glibc, and where another
    allocator is preloaded."""
    log = logging.getLogger("alexnet")
    if policy == "system":
        return _put_back_defaults(log) if _ALLOCATOR["retained"] else False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("train.host_memory=retain: not glibc, the allocator is left as it is")
        return False
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        log.info("train.host_memory=retain: %s is preloaded and already keeps freed memory", preloaded)
        return False
    libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture it supports
    # mallopt returns 1 on success, 0 on error.
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not applied:
        log.warning("train.host_memory=retain: glibc refused mallopt; defaults kept")
    _ALLOCATOR["retained"] = applied
    return applied


def _put_back_defaults(log: logging.Logger) -> bool:
    """An earlier run of this process retained: a run asking for "system" stayed on "retain",
    though logged and recorded as "system"."""
    libc = ctypes.CDLL("libc.so.6")
    restored = (libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1)  # fmt: skip
    if restored:
        log.info("train.host_memory=system: glibc's default thresholds put back (an earlier run in this process "
                 "retained freed memory)")  # fmt: skip
        _ALLOCATOR["retained"] = False
    else:
        log.warning("train.host_memory=system: glibc refused mallopt; freed memory is still retained")
    return restored
