"""Datasets the project generates on first use into the user's cache, once per machine.

Many ranks (and several jobs) may ask for the same dataset at once: one of them writes it into a
temporary folder under a file lock and renames it into place with a marker file, so a reader never
sees a half-written dataset and an interrupted generation is simply redone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

READY = ".complete"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/alexnet-dist` (default `~/.cache/alexnet-dist`)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet-dist"


def ensure_generated(root: Path, write: Callable[[Path], None], what: str) -> Path:
    """`root`, after `write(folder)` has filled it if it was not complete yet; `what` names the
    dataset in the log line."""
    if (root / READY).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / READY).exists():  # another process may have finished while we waited
            logging.getLogger("alexnet").info("generating %s into %s (first use only)", what, root)
            tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            (tmp / READY).write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    return root
