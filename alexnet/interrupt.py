"""Ctrl-C for the launchers: one line and the shell's status for it, 130, instead of a
KeyboardInterrupt traceback. Without torch, so that the tools which do not need it (scan.py,
prepare_imagenet.py) start without its import (2-3 s); alexnet.process.run_command uses it for
the others."""

from __future__ import annotations

import sys
from collections.abc import Callable

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def print_error(message: str) -> None:
    """`error: <message>` on stderr in one write. The ranks of a job that all stop with the same
    error share torchrun's stderr, and print() writes the text and its newline apart: two ranks'
    lines ran into one."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def status_of(main: Callable[[], int]) -> int:
    """`main`'s status, or INTERRUPTED after one line for Ctrl-C (the commands stage their files
    and rename them into place, so nothing is left half-written)."""
    try:
        return main()
    except KeyboardInterrupt:
        print_error("interrupted")
        return INTERRUPTED
