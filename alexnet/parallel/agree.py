"""Batches every rank agrees on before it uses them.

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
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from pipelines.index import DataError

T = TypeVar("T")


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
