"""Stopping on request: a signal (SIGUSR1 from Slurm's --signal, SIGTERM from torchrun or a
scheduler, SIGINT from Ctrl-C), a stop file, or the end of the torchrun that started the worker
and left it running (SIGKILL), agreed across all ranks at the same step.

torchrun does not forward SIGUSR1 to its workers, so the Slurm script turns the signal into a
stop file (ALEXNET_STOP_FILE) that every worker polls; a signal delivered to a worker directly
works as well. Ranks all-reduce their flag every step, so they stop at the same step, write one
checkpoint together and exit; rank 0 then removes the stop file, so that the same command
resumes. A run that ends for good instead (all its epochs, or
train.max_steps) has rank 0 create `<stop file>.completed`: the Slurm script does not requeue a
job that left that marker, so a run that completed before the request took effect is not started
again. The marker says "done", not "stopped": a marker missed (written on another node, not yet
visible through a network file system's cache) costs one requeued job that finds nothing left to
train, where a missed "stopped" marker would end an unfinished run.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alexnet.parallel.agree import Fetched, gather_from_ranks, rank_groups, shared_fetch_error
from alexnet.parallel.env import LAUNCHER_ENV

log = logging.getLogger("alexnet")
STOP_FILE_ENV = "ALEXNET_STOP_FILE"
# SIGINT: Ctrl-C. Without torchrun a second one interrupts at once. torchrun (its workers run in
# sessions of their own) passes the first on to every worker and kills them --shutdown-timeout
# seconds later (30 by default). The next step (the batch at hand was agreed on before the
# request) and the checkpoint must fit in that; a validation stops before its next batch, but one
# in its last runs to its end, then the epoch's checkpoint and one more step (or the run ends).
# A second Ctrl-C sends SIGTERM, another stop request, and a third leaves torchrun at once, the
# workers going on to their checkpoint without it. A stop file has no such deadline.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
CTRL_C_ALONE = (
    b"Ctrl-C: stopping with a checkpoint after the next step (in a validation, before its next batch); "
    b"Ctrl-C again to interrupt\n"
)
CTRL_C_TORCHRUN = (
    b"Ctrl-C: stopping with a checkpoint after the next step (in a validation, before its next batch), "
    b"if that ends before torchrun kills the workers (--shutdown-timeout, 30 s by default)\n"
)
COMPLETED_SUFFIX = ".completed"  # slurm/alexnet.sh looks for this marker
# ... and for this one: the workers stopped on a request the script did not send (a SIGUSR1 that
# `scancel --signal=USR1` without --batch, or --signal=USR1@N without B:, sends to the job step).
STOPPED_SUFFIX = ".stopped"
# What a rank brings to the agreement; the highest wins. REQUESTED and FAILED stop every rank
# after the step of the batch at hand, with a checkpoint (a failure is told apart so that the
# ranks that did not fail say why they stop); NO_BATCH stops every rank before it: a rank could not
# read its batch (alexnet.parallel.agree).
REQUESTED, FAILED, NO_BATCH = 1, 2, 3


def stop_handlers() -> dict[int, Any]:
    """The handlers of the stop signals now, for `put_back_handlers`."""
    return {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


def put_back_handlers(handlers: dict[int, Any]) -> None:
    """After a run in a process that goes on (a notebook, a script of several runs): the ended
    run's handler only took note of a SIGTERM or Ctrl-C, so neither stopped the process any more."""
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python


class StopRequest:
    def __init__(self, device: torch.device, stop_file: str | None = None, launcher_pid: int | None = None) -> None:
        self.device = device
        self.stop_file = Path(stop_file) if stop_file else None
        self.launcher_pid = launcher_pid  # the parent whose end is a stop request (torchrun's agent)
        self.signal_name: str | None = None
        self._interrupts = 0  # Ctrl-Cs so far
        self._flag = torch.zeros(1, device=device)
        self._agreed_level = 0  # the last agreement's: 0, REQUESTED, FAILED or NO_BATCH

    @classmethod
    def from_environment(cls, device: torch.device, launcher_pid: int | None = None) -> StopRequest:
        """The stop file from ALEXNET_STOP_FILE; `launcher_pid`: the torchrun agent whose end is a
        stop request (DistEnv.launcher_pid)."""
        return cls(device, os.environ.get(STOP_FILE_ENV) or None, launcher_pid)

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        # launch/train.py blocks SIGUSR1 at its start: one sent since then is heard now (only that
        # one: a notebook's own mask of the others stays as it is)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":  # a validation can take minutes: say it was heard
                # os.write, not logging: a handler may run inside a logging call
                os.write(2, CTRL_C_TORCHRUN if LAUNCHER_ENV in os.environ else CTRL_C_ALONE)
        self.signal_name = signal.Signals(signum).name

    def requested_here(self) -> bool:
        return (
            self.signal_name is not None
            or self.launcher_gone()
            or (self.stop_file is not None and self.stop_file.exists())
        )

    def launcher_gone(self) -> bool:
        """True once the launcher has ended and left this process running (its parent pid changed)."""
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def agreed(self, failed_here: bool = False, no_batch_here: bool = False) -> bool:
        """True on every rank as soon as any rank has been asked to stop, has failed in a way
        that stops the run with a checkpoint (`failed_here`: this rank has), or has no batch
        (`no_batch_here`) (a collective)."""
        level = NO_BATCH if no_batch_here else FAILED if failed_here else REQUESTED if self.requested_here() else 0
        self._flag.fill_(float(level))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        self._agreed_level = int(self._flag.item())
        return self._agreed_level > 0

    def agreed_on(self, fetched: Fetched, failed_here: bool = False) -> bool:
        """`agreed` for a batch as `fetch_each` gave it: where some rank has no batch, every rank
        raises that rank's error here (no rank may take the step); else whether to stop."""
        stop = self.agreed(failed_here, no_batch_here=fetched.error is not None)
        if self._agreed_level == NO_BATCH:
            raise shared_fetch_error(fetched.error)
        return stop

    def requests(self) -> str:
        """Collective, after a stop every rank agreed on: what the ranks that were asked to stop
        were asked by ("signal SIGUSR1 on rank 1"; "" for a stop no rank was asked for, at
        train.max_steps or on a failure). Each rank's own: Slurm delivers a signal to the job step
        through each node's slurmd, so rank 0 may get it after the stop or never, and knew only
        that "another rank was asked to stop"; its marker then said nothing and the job ended
        with exit 0 unfinished and not requeued."""
        reasons = gather_from_ranks(self.reason() if self.requested_here() else "")
        if reasons.count(reasons[0]) == len(reasons):  # one process, or every rank alike (a stop file)
            return reasons[0]
        return "; ".join(f"{reasons[r]} on {ranks}" for r, ranks in rank_groups(reasons) if reasons[r])

    def served(self, step: int, requests: str) -> None:
        """After the checkpoint of a stop (rank 0): the requests (`requests()`) are left beside
        the stop file for the Slurm script (which requeues after a SIGUSR1 that reached only the
        workers), and the stop file, whose request is served, is removed. Left in place, it stopped
        every later session of the same command after one step, each saying that the same command
        resumes. The Slurm script removes it too, when the requeued job starts."""
        if self.stop_file is None:
            return
        if requests:  # not for a stop at train.max_steps
            why = f"stopped at step {step} by {requests}\n"
            self._write_marker(STOPPED_SUFFIX, why, "a Slurm job stopped by a signal to its step is not requeued")
        else:  # an earlier session's would tell of a request this session's end did not have
            self._remove_marker(STOPPED_SUFFIX)
        try:
            self.stop_file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the stop file %s (%s): remove it before resuming, or the next session "
                        "stops after its first step", self.stop_file, exc.strerror or exc)  # fmt: skip

    def marker(self, suffix: str = COMPLETED_SUFFIX) -> Path | None:
        """A file beside the stop file that tells the Slurm script how training ended (None
        without a stop file): for good (COMPLETED_SUFFIX), or on a request (STOPPED_SUFFIX)."""
        return self.stop_file.with_name(self.stop_file.name + suffix) if self.stop_file else None

    def mark_completed(self, step: int) -> None:
        """Tell whoever may write the stop file that there is nothing left to resume (rank 0). A
        marker that cannot be written is a warning: the run and its checkpoint are complete, and
        a missed marker costs at most one requeued job that finds nothing to train."""
        self._write_marker(
            COMPLETED_SUFFIX, f"completed at step {step}\n", "a requeued job would find nothing left to train"
        )

    def _write_marker(self, suffix: str, text: str, if_missed: str) -> None:
        """`text` as the marker of `suffix`; the other marker, an earlier session's, is removed: a
        .stopped left beside the .completed of the session that resumed and finished the run
        told a scheduler that reads it to requeue a finished run."""
        marker = self.marker(suffix)
        if marker is None:
            return
        self._remove_marker(STOPPED_SUFFIX if suffix == COMPLETED_SUFFIX else COMPLETED_SUFFIX)
        try:
            marker.write_text(text)
        except OSError as exc:
            log.warning("could not write %s (%s): %s", marker, exc.strerror or exc, if_missed)

    def _remove_marker(self, suffix: str) -> None:
        marker = self.marker(suffix)
        if marker is None:
            return
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s (%s), an earlier session's: it does not tell of this one",
                        marker, exc.strerror or exc)  # fmt: skip

    def reason(self) -> str:
        if self.signal_name:
            return f"signal {self.signal_name}"
        if self.launcher_gone():
            return f"the end of torchrun (pid {self.launcher_pid}), which left its workers running"
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "a failure on another rank" if self._agreed_level == FAILED else "another rank was asked to stop"
