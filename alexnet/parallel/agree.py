"""Batches every rank agrees on before it uses them, and setups every rank agrees have worked.

DALI cannot drop a bad file from a batch: a rank whose shard holds one gets a
DataError instead of its batch, while the other ranks, holding theirs, go on into the step's
collectives and wait there until their connection to it breaks (a gloo traceback) or their
timeout ends (NCCL). The same holds for a loader that fails in a way nobody foresaw (a DALI
internal error, memory running out on one node). So each batch is agreed on first, with one
all-reduce of a flag (the trainer's stop agreement carries it, so a training step costs no extra
collective), and where a rank has none, every rank stops with that rank's error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from alexnet.checkpoint import CheckpointError
from alexnet.config import ConfigError
from pipelines.filecheck import dali_cause
from pipelines.index import DataError, FileIndex

T = TypeVar("T")
log = logging.getLogger("alexnet")
# What a rank's own reading of its data folders and checkpoint can fail with.
SETUP_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, OSError)


class LoaderError(RuntimeError):
    """A rank's loader failed with something other than a bad file (across processes)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Fetched(Generic[T]):
    batch: T | None  # None where the loader failed
    error: Exception | None  # what it raised: a DataError (a bad file) or anything else
    seconds: float  # spent waiting for the loader


def fetch_each(batches: Iterable[T]) -> Iterator[Fetched[T]]:
    """Each batch; where the loader raises an error instead, that error once, and nothing after it
    (a loader that failed is not asked again). The caller agrees with the other ranks before it
    raises the error: a rank that raised it at once would leave them waiting in a collective."""
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - raised by the caller, once the other ranks know
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


def least_on_any_rank(value: float, device: torch.device) -> float:
    """The smallest of every rank's `value` (a collective; `value` itself in one process)."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def shared_fetch_error(mine: Exception | None) -> Exception:
    """Collective, once every rank knows that some rank has no batch: the error to raise here.
    One process raises its loader's own error. Across processes a bad file is a DataError naming
    it, anything else a LoaderError naming the rank and what it raised, whose traceback that rank
    logs first (before any rank can exit and have torchrun stop the rest); a rank whose loader
    failed raises its own, the others the first failing rank's."""
    if not _distributed():
        assert mine is not None, "no rank is missing its batch"
        return mine
    rank, world = dist.get_rank(), dist.get_world_size()
    if mine is not None and not isinstance(mine, DataError):
        log.error("rank %d: its loader failed; every rank stops", rank, exc_info=mine)
    told = None if mine is None else (isinstance(mine, DataError), describe_error(mine))
    gathered: list[tuple[bool, str] | None] = [None] * world
    dist.all_gather_object(gathered, told)
    failed = rank if mine is not None else next(r for r, t in enumerate(gathered) if t is not None)
    bad_file, message = gathered[failed]  # type: ignore[misc] - that rank told its error
    error = DataError(message) if bad_file else LoaderError(
        f"rank {failed} (of {world}) could not load its batch: {message} (rank {failed} logged its traceback)"
    )  # fmt: skip
    error.__cause__ = mine  # where it is this rank's own: for a caller that prints the chain
    return error


def describe_error(exc: BaseException) -> str:
    """A DataError's message (it says what is wrong); anything else's type and first line, and
    for a DALI error the line that says what went wrong in its operator (its first line says
    only "Critical error in pipeline:")."""
    if isinstance(exc, DataError):
        return str(exc)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    cause = dali_cause(str(exc))
    said = " ".join(part for part in (first, cause) if part)
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def agreed_batches(batches: Iterable[T], device: torch.device) -> Iterator[T]:
    """The batches of `batches`, each agreed on by every rank before it is yielded."""
    for fetched in fetch_each(batches):
        if any_rank(fetched.error is not None, device):
            raise shared_fetch_error(fetched.error)
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
    error = kinds[kind]
    if len(failed) < len(gathered) or any(f != failed[0][1] for _, f in failed):
        message = f"rank {rank} (of {len(gathered)}): {message}"
        if issubclass(error, ConfigError):
            # A file or folder a key names missing on some nodes alone (node-local storage, a
            # mount) is the node's problem, not the command's: exit 1 (a scheduler may retry), not 2.
            error = DataError
    raise error(message)


# Settings that name paths: each node may spell them or mount the data its own way (a dataset
# copied to every node's local disk, a relative run.root). What they lead to is checked where it
# matters: the data's classes and counts, the checkpoint a resume starts from, a new run's weights.
PATH_KEYS = frozenset(
    {
        "data.root",
        "data.train_files",
        "data.val_files",
        "data.lighting_stats",
        "run.root",
        "checkpoint.resume",
        "model.weights",
    }
)
# A node's own tuning, which no collective depends on: loader threads and queue depth, the
# decoder and host memory of a node with other cores or another GPU, how rank 0 reports, the
# collective timeout each rank waits.
LOCAL_KEYS = frozenset(
    {"data.num_threads", "data.prefetch", "data.hw_decoder_load", "data.decoder", "train.host_memory",
     "run.progress", "run.tensorboard", "run.plot", "parallel.timeout_s"}
)  # fmt: skip
MAY_DIFFER = PATH_KEYS | LOCAL_KEYS


def check_same_settings(settings: dict[str, Any], what: str, may_differ: frozenset[str] = MAY_DIFFER) -> None:
    """Collective, at the start: every rank was started with the same `settings` (flat, dotted
    keys), else every rank stops with a ConfigError naming the keys that differ. Nothing checked
    it: an agent started with other overrides hung at the first epoch's end (train.epochs),
    aborted in gloo (data.batch_size), or trained replicas that drifted apart without a word
    (optim.lr, of which rank 0's copy was checkpointed)."""
    if not _distributed():
        return
    mine = {key: value for key, value in settings.items() if key not in may_differ}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    keys = sorted({key for g in gathered for key in g})
    differ = [key for key in keys if any(g.get(key) != gathered[0].get(key) for g in gathered)]
    if not differ:
        return
    shown = "; ".join(_values_by_rank(gathered, key) for key in differ[:3]) + (" ..." if len(differ) > 3 else "")
    raise ConfigError(
        f"the ranks were started with different {what}: {shown}; start every rank with the same command "
        f"(only paths and a node's own tuning may differ: {', '.join(sorted(may_differ))})"
    )


def option_settings(options: dict[str, Any]) -> dict[str, Any]:
    """A command's options as the settings to compare, named as typed: {"--ten-crop": True}."""
    return {f"--{name.replace('_', '-')}": value for name, value in options.items()}


class CheckpointChangedError(CheckpointError):
    """The ranks read one path and found different checkpoints: a run still training may have
    replaced the file between their reads (or each node has a copy of its own)."""


# Said with the error above: which of the two cases it is cannot be told from the files.
CHANGED_ADVICE = (
    "every rank read the same path: a run still training into it replaced the file between the ranks' reads (run "
    "again, or use a copy of the file), or each node has a copy of its own there, and they differ"
)


def check_same_checkpoint(
    found: tuple[Path, dict[str, Any]] | None, what: str, advice: str, may_be_written: bool = True
) -> None:
    """Collective: every rank has the same checkpoint (`found`: its path and progress; None: this
    rank found none), told by its progress (the run's step and its clock, which no other
    checkpoint shares), not by its path: nodes may spell the folder their own way (a symbolic
    link, a relative path, a copy under another name). Ranks that read node-local copies of other
    steps, or none, raise a CheckpointError: "the ranks <what> (what each found); <advice>"; a
    CheckpointChangedError where every rank found one under the same path (a live run's last.pt
    replaced between the ranks' reads looks the same), unless no run may be writing it
    (`may_be_written`: a run's own checkpoints, which its lock keeps from any other session)."""
    path = None if found is None else str(found[0])
    identity = None if found is None else checkpoint_identity(found[1])
    try:
        check_same_contents(None if found is None else (path, identity, f"step {identity[0]}"), what, advice)
    except CheckpointError as exc:
        paths = gather_from_ranks(path)  # every rank is here: the check raises on all alike
        if may_be_written and paths[0] is not None and all(p == paths[0] for p in paths):
            raise CheckpointChangedError(f"{str(exc).removesuffix(advice)}{CHANGED_ADVICE}") from None
        raise


def check_same_contents(
    found: tuple[str, Any, str] | None, what: str, advice: str, error: type[Exception] = CheckpointError
) -> None:
    """Collective: every rank read the same contents (`found`: the path it read, an identity of
    what it holds, and that identity in a few words; None: this rank read nothing), whatever the
    paths. Else every rank raises `error`: "the ranks <what> (the ranks of each identity, with
    the first one's path and words); <advice>"."""
    if not _distributed():
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    identities = [g[1] if g else None for g in gathered]
    if any(identity != identities[0] for identity in identities):
        # Ranks that read the same are named together, with the first one's path and words: one
        # line per rank made 64 lines of one error at 64 ranks.
        seen = "; ".join(
            f"{ranks}: " + (f"{gathered[r][0]} ({gathered[r][2]})" if gathered[r] else "none")
            for r, ranks in rank_groups(identities)
        )
        raise error(f"the ranks {what} ({seen}); {advice}")


def check_same_files(where: str, indexes: dict[str, FileIndex]) -> None:
    """Collective: every node's copy of the data (each may read its own: data.root, --data) holds
    the same class folders and files, told by the lists' fingerprints; `indexes` by split name
    ("" for one unnamed split). Nothing compared them: a copy a few files short had the ranks take
    different numbers of steps until a collective broke an epoch later, or evaluated two image
    sets into one figure."""
    if not _distributed():
        return  # nothing to compare: the fingerprints are not computed
    classes = next(iter(indexes.values())).classes
    prints = [index.fingerprint for index in indexes.values()]
    counts = " / ".join(f"{len(index)}{' ' + name if name else ''}" for name, index in indexes.items())
    words = f"{len(classes)} classes, {counts} images, file list{'s' if len(prints) > 1 else ''} "
    words += "/".join(fp[:8] for fp in prints)
    advice = "every node's copy of the data must hold the same class folders and files"
    check_same_contents((where, (classes, *prints), words), "read different data", advice, DataError)


def checkpoint_identity(progress: dict[str, Any]) -> tuple[Any, str]:
    """(step, the run's clock to the last bit): the same for one checkpoint wherever it is read."""
    return int(progress.get("step", 0)), repr(progress.get("train_seconds"))


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, by rank (a collective); [value] alone without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rank_groups(values: list[Any]) -> list[tuple[int, str]]:
    """(the first rank, "ranks 0, 1, 3") for each distinct value of `values` (by rank), in rank
    order: what ranks said alike is said once for them (one line per rank made 64 lines at 64)."""
    return [(r, ranks_text(values, v)) for r, v in enumerate(values) if values.index(v) == r]


def ranks_text(values: list[Any], value: Any) -> str:
    """Where `values` holds `value`, as "ranks 0, 1, 3" (the first 8) or "rank 2"."""
    ranks = [r for r, v in enumerate(values) if v == value]
    shown = ", ".join(map(str, ranks[:8])) + (" ..." if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


def _values_by_rank(gathered: list[dict[str, Any]], key: str) -> str:
    values = [g.get(key) for g in gathered]
    distinct = list(dict.fromkeys(map(repr, values)))
    return f"{key} " + ", ".join(f"{v} on {ranks_text(list(map(repr, values)), v)}" for v in distinct)


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"train.epochs": 90, ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
