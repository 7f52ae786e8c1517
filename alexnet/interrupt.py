"""Ctrl-C for the launchers: one line and the shell's status for it, 130, instead of a
KeyboardInterrupt traceback. Without torch, so that the tools which do not need it (scan.py,
prepare_imagenet.py) start without its import (2-3 s); alexnet.process.run_command uses it for
the others."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def print_error(message: str) -> None:
    """`error: <message>` on stderr in one write. The ranks of a job that all stop with the same
    error share torchrun's stderr, and print() writes the text and its newline apart: two ranks'
    lines ran into one."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def quiet_ctrl_c_while_starting() -> None:
    """A launcher's first call, run as a script, before its imports (torch's and DALI's take 3-5 s):
    Ctrl-C then ends the process with the one line and status it gets later, not a traceback of
    importlib's and torch's frames (10 to 60 lines). Nothing is written before `main` runs, so the
    process ends at once; status_of puts Python's own handler back for `main`."""
    signal.signal(signal.SIGINT, _ended_while_starting)


def _ended_while_starting(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    os.write(2, b"error: interrupted\n")  # not print_error: a handler may run inside a write to stderr
    os._exit(INTERRUPTED)


def status_of(main: Callable[[], int]) -> int:
    """`main`'s status, or INTERRUPTED after one line for Ctrl-C (the commands stage their files
    and rename them into place, so nothing is left half-written)."""
    if signal.getsignal(signal.SIGINT) is _ended_while_starting:  # from here on, main's own clean-up runs
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        print_error("interrupted")
        return INTERRUPTED
