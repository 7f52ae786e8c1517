"""Timed training steps, and where a step's time goes.

A contender is one model in one layout with one stream of batches. Each of its turns runs two
windows of the same number of steps:

* full: the real step (gradients all-reduced by DDP); its length is the step time, and the time
  spent waiting in the batch iterator is the data wait;
* breakdown: the same steps under DDP's `no_sync()` (no gradient all-reduce) with the layout's
  blocking collectives timed (`CommCounter(timed=True)`, which synchronizes around each of them).

Then, per step: gradient communication (exposed) = full - no_sync (minus their data waits) plus
the timed gradient collectives outside DDP (the hybrid's FC slices); activation exchange = the
timed exchanges; compute = the rest of the no_sync step. On CUDA the device is synchronized
around every timed region. Window seconds are the slowest rank's; the split is the ranks' mean.

As in the trainer, the ranks agree on each batch before its step, with the trainer's own
agreement (alexnet.stop.StopRequest: a bad file on one rank stops every rank), so a step carries
the trainer's per-step all-reduce and device sync; the data wait is the time in the batch
iterator alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alexnet.bench.timing import BenchSettingsError, Window, summarize
from alexnet.engine import AmpPolicy, train_step
from alexnet.layers import DropoutContext
from alexnet.parallel.agree import fetch_each
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.data_parallel import is_ddp
from alexnet.parallel.layout import StepSync
from alexnet.stop import StopRequest

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainParts:
    """What one training step needs, built the way the trainer builds it."""

    module: nn.Module  # what the step calls (DDP where gradients are all-reduced)
    optimizer: torch.optim.Optimizer
    amp: AmpPolicy
    counter: CommCounter
    after_backward: StepSync | Callable[[], None] | None
    sample_base: torch.Tensor  # this rank's rows in the global batch (dropout masks)
    seed: int
    grad_clip: float = 0.0  # train.grad_clip: clipping adds the global norm's arithmetic and all-reduce


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reduce(values: list[float], op: str, device: torch.device) -> list[float]:
    """MAX or mean over ranks (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


class TrainContender:
    def __init__(
        self,
        name: str,
        parts: TrainParts,
        batches: Batches,
        steps: int,
        images_per_step: int,
        device: torch.device,
        breakdown: bool,
        lead_in: int = 0,
    ) -> None:
        self.name = name
        self.parts = parts
        self._batches = fetch_each(batches)
        self._agreement = StopRequest(device)  # no signal handlers, no stop file: batches only
        self._steps = steps
        self._images_per_step = images_per_step  # over all ranks: batch x data-parallel replicas
        self._device = device
        self._breakdown = breakdown
        self._lead_in = lead_in  # untimed steps first: batches a loader prefetched while idle
        self._step = 0

    def _run_steps(self, n: int, grad_sync: bool) -> tuple[float, float]:
        """n training steps; returns (seconds, seconds waiting for batches)."""
        p = self.parts
        # Without gradient sync each rank applies its own gradients, so the replicas drift apart
        # for the rest of the benchmark: harmless, since a step's time does not depend on the
        # weights' values and the benchmark's weights are thrown away.
        no_sync = p.module.no_sync() if (not grad_sync and is_ddp(p.module)) else nullcontext()
        wait = 0.0
        sync(self._device)
        start = time.perf_counter()
        with no_sync:
            for _ in range(n):
                fetched = next(self._batches)
                wait += fetched.seconds
                self._agreement.agreed_on(fetched)
                images, labels = fetched.batch  # type: ignore[misc] - a batch where no error
                dropout = DropoutContext(p.seed, self._step, p.sample_base[: labels.shape[0]])
                train_step(p.module, images, labels, p.optimizer, p.amp, dropout, p.grad_clip, p.after_backward)
                self._step += 1
        sync(self._device)
        return time.perf_counter() - start, wait

    def run_steps(self, n: int) -> None:
        """n untimed training steps with gradient synchronisation (e.g. under a profiler)."""
        self._run_steps(n, grad_sync=True)

    def run_window(self) -> Window:
        p = self.parts
        if self._lead_in:
            self._run_steps(self._lead_in, grad_sync=True)
        p.counter.take()
        p.counter.timed = False
        full, wait = self._run_steps(self._steps, grad_sync=True)
        payload, sent = p.counter.take()
        extra: dict[str, float] = {f"payload.{k}": v / self._steps for k, v in payload.items()}
        extra.update({f"sent.{k}": v / self._steps for k, v in sent.items()})
        nosync = nosync_wait = grad_blocking = exchange = 0.0
        if self._breakdown:
            p.counter.take_seconds()
            p.counter.timed = True
            nosync, nosync_wait = self._run_steps(self._steps, grad_sync=False)
            p.counter.timed = False
            p.counter.take()
            timed = p.counter.take_seconds()
            grad_blocking = sum(v for k, v in timed.items() if "grad" in k)
            exchange = sum(v for k, v in timed.items() if "grad" not in k)
        (full_max,) = _reduce([full], "max", self._device)
        means = _reduce([full, wait, nosync, nosync_wait, grad_blocking, exchange], "mean", self._device)
        keys = ("full_s", "data_wait_s", "nosync_s", "nosync_data_wait_s", "grad_blocking_s", "exchange_s")
        extra.update({k: v / self._steps for k, v in zip(keys, means)})
        extra["breakdown"] = float(self._breakdown)
        extra["ddp"] = float(is_ddp(p.module))
        extra["steps"] = float(self._steps)
        return Window(self._images_per_step * self._steps, full_max, extra)


def step_split(windows: list[Window], world_size: int = 1) -> dict[str, float | None]:
    """Median per-step seconds of each part of a step over the windows (see the module's doc).
    The parts add up to `step_s` (the ranks' mean full step): where noise makes the no_sync
    window the slower one, no gradient communication was exposed, and each part is clamped to
    what the step leaves, so compute is the remainder and never negative. On several processes
    without the no_sync windows (`--no-breakdown`) communication is not measured: compute,
    gradient communication and exchange are None rather than "all compute"."""

    def med(key: str) -> float:
        return summarize([w.extra.get(key, 0.0) for w in windows]).median

    full, wait = med("full_s"), med("data_wait_s")
    busy = max(0.0, full - wait)  # the step's time outside the batch iterator
    split: dict[str, float | None] = {"step_s": full, "data_wait_s": wait, "grad_comm_s": 0.0, "exchange_s": 0.0}
    measured = any(w.extra.get("breakdown") for w in windows)
    if not measured and world_size > 1:
        return {**split, "grad_comm_s": None, "exchange_s": None, "compute_s": None}
    if measured:
        nosync = med("nosync_s") - med("nosync_data_wait_s")
        # Without DDP nothing is all-reduced behind the step: a difference is noise.
        ddp = any(w.extra.get("ddp") for w in windows)
        exposed = min(max(0.0, busy - nosync), busy) if ddp else 0.0
        split["grad_comm_s"] = min(exposed + med("grad_blocking_s"), busy)
        split["exchange_s"] = min(med("exchange_s"), busy - split["grad_comm_s"])
    # one process, nothing exchanged: all of the step that is not waiting is compute
    split["compute_s"] = busy - split["grad_comm_s"] - split["exchange_s"]
    return split


def comm_bytes(windows: list[Window]) -> dict[str, Any]:
    """Bytes per step and rank by kind (payload handed to collectives, and sent on the wire)."""
    last = windows[-1].extra
    out: dict[str, Any] = {"payload": {}, "sent": {}}
    for key, value in last.items():
        head, _, kind = key.partition(".")
        if head in out and kind:
            out[head][kind] = value
    out["payload_total"] = sum(out["payload"].values())
    out["sent_total"] = sum(out["sent"].values())
    return out


def endless(loader) -> Batches:
    """Batches across epoch boundaries, each epoch run to StopIteration as training runs it."""
    if len(loader) == 0:
        raise BenchSettingsError("the loader has no batches (fewer images than one batch)")
    while True:
        yield from loader
