"""Batches every rank agrees on before it uses them, and setups every rank agrees have worked.

DALI cannot drop a bad file from a batch (PITFALLS 6): a rank whose shard holds one gets a
DataError instead of its batch, while the other ranks, holding theirs, go on into the step's
collectives and wait there until their connection to it breaks (a gloo traceback) or their
timeout ends (NCCL). So each batch is agreed on first, with one all-reduce of a flag (the
trainer's stop agreement carries it, so a training step costs no extra collective), and where a
rank has none, every rank raises that rank's error.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from alexnet.checkpoint import CheckpointError
from alexnet.config import ConfigError
from pipelines.index import DataError

T = TypeVar("T")
# What a rank's own reading of its data folders and checkpoint can fail with.
SETUP_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, OSError)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Fetched(Generic[T]):
    batch: T | None  # None where the loader failed
    error: DataError | None
    seconds: float  # spent waiting for the loader


def fetch_each(batches: Iterable[T]) -> Iterator[Fetched[T]]:
    """Each batch; where the loader raises a DataError instead, that error once, and nothing after
    it (a loader that failed is not asked again)."""
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DataError as exc:
            yield Fetched(None, exc, time.perf_counter() - asked)
            return
        yield Fetched(batch, None, time.perf_counter() - asked)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (a collective; `flag` itself in one process)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shared_data_error(mine: DataError | None) -> DataError:
    """Collective, once every rank knows that some rank has no batch: the error of the first such
    rank, on every rank."""
    if not _distributed():
        assert mine is not None, "no rank is missing its batch"
        return mine
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if mine is None else str(mine))
    return DataError(next(message for message in gathered if message is not None))


def agreed_batches(batches: Iterable[T], device: torch.device) -> Iterator[T]:
    """The batches of `batches`, each agreed on by every rank before it is yielded."""
    for fetched in fetch_each(batches):
        if any_rank(fetched.error is not None, device):
            raise shared_data_error(fetched.error)
        yield fetched.batch  # type: ignore[misc] - None only with an error, which raised


def share_setup_failure(failure: Exception | None, kinds: tuple[type[Exception], ...] = SETUP_ERRORS) -> None:
    """Collective, after what each rank reads on its own (data folders, a checkpoint), which one
    rank can fail at alone where storage is node-local: every rank raises the first failing
    rank's error (of the first of `kinds` it is), naming that rank where not all failed alike,
    instead of waiting for it in the next collective. `failure` must be of one of `kinds`."""
    if not _distributed():
        if failure is not None:
            raise failure
        return
    mine = None if failure is None else (next(i for i, k in enumerate(kinds) if isinstance(failure, k)), str(failure))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    failed = [(rank, f) for rank, f in enumerate(gathered) if f is not None]
    if not failed:
        return
    rank, (kind, message) = failed[0]
    if len(failed) < len(gathered) or any(f != failed[0][1] for _, f in failed):
        message = f"rank {rank} (of {len(gathered)}): {message}"
    raise kinds[kind](message)
