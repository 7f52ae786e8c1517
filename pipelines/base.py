"""The one Loader protocol every pipeline implements, and the numbers they share.

A loader yields `(images, labels)` on the training device. Iterating it once runs one epoch to
StopIteration (never count to len() by hand) and moves it to the next epoch. Every rank gets the
same number of steps:

* train: `train_steps` batches per epoch, all of real samples (a shard's incomplete last batch is
  dropped, like DataLoader's drop_last, because the shards differ in size by one sample);
* val: `val_steps` batches per epoch of constant shape; rows that only pad a shard to a whole
  batch carry label -1 (PAD_LABEL), so that every image is counted exactly once across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from pipelines.index import DataError, FileIndex

PAD_LABEL = -1
Split = Literal["train", "val"]


@dataclass(frozen=True)
class ImageSpec:
    """What an image becomes; identical for every pipeline kind."""

    crop: int
    resize: int
    train_crop: Literal["paper", "random_resized"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ShardSpec:
    """How this rank reads: its data-parallel shard and batch."""

    shard_id: int
    num_shards: int
    batch_size: int
    seed: int
    # Batches an optimizer step takes (train.accum_steps): a training epoch holds whole steps only.
    batches_per_step: int = 1


class Loader(Protocol):
    split: Split
    num_samples: int  # real samples in the whole split (all shards)
    keeps_epoch_order: bool  # whether a position converted to another layout goes on in the epoch's order

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Contiguous shard [start, end), the split DALI's readers use."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def train_steps(num_samples: int, num_shards: int, batch_size: int, batches_per_step: int = 1) -> int:
    """Whole batches in the smallest shard, the same on every rank: as many as make whole optimizer
    steps of `batches_per_step` batches (the rest are left out, as an incomplete batch is)."""
    batches = (num_samples // num_shards) // batch_size
    return batches - batches % batches_per_step


def val_steps(num_samples: int, num_shards: int, batch_size: int) -> int:
    """Batches that cover the largest shard; smaller shards are padded to it."""
    largest = -(-num_samples // num_shards)
    return -(-largest // batch_size)


@dataclass(frozen=True)
class EpochLayout:
    """How one training epoch is cut into steps: what a loader position counts in."""

    num_shards: int
    batch_size: int  # per shard
    steps: int  # per epoch, the same on every shard

    @property
    def global_batch(self) -> int:
        return self.num_shards * self.batch_size


def convert_position(pos: int, old: EpochLayout, new: EpochLayout) -> int:
    """A position `pos` (batches into the epoch) under `old`, as batches under `new`.

    By samples consumed, rounded down: the resumed epoch retrains less than one global batch
    rather than skip any (with one permutation per epoch shared by all shard counts, as the
    torchvision loader has, the samples consumed are a prefix of it, so none is skipped), and it
    is never longer than one epoch (clamped). A finished epoch stays finished: the samples the old
    layout left out of it (each shard's incomplete last batch) are not trained as a late extra."""
    if pos >= old.steps:
        return new.steps
    return min(pos * old.global_batch // new.global_batch, new.steps)


def position_state(epoch: int, pos: int, shard: ShardSpec, steps: int, index: FileIndex) -> dict[str, Any]:
    """A loader's position as its checkpoint holds it. `num_shards`, `steps` and `batch_size` say
    what `pos` counts in, so that a resume under another sharding or batch can convert it
    (alexnet.resume.saved_layout reads them); `num_samples` and `files` (the list's fingerprint)
    tell a resume over another file list (bad files left out, files renamed), whose epoch order
    differs, from an exact one; `seed` (data.seed) one under another order of the same list."""
    return {
        "epoch": epoch, "pos": pos, "num_shards": shard.num_shards, "steps": steps,
        "batch_size": shard.batch_size, "num_samples": len(index), "files": index.fingerprint, "seed": shard.seed,
    }  # fmt: skip


def check_shardable(num_samples: int, num_shards: int, where: str, remedy: str) -> None:
    """A DataError when a DALI reader cannot be split into `num_shards` shards: it needs one
    sample per shard at least (and would stop the run with an assert when first built, for
    validation after a whole epoch of training)."""
    if num_samples < num_shards:
        raise DataError(
            f"{where}: {num_samples} image(s) for {num_shards} data-parallel shards; DALI's reader needs at "
            f"least one per shard: {remedy}"
        )


def check_trainable(num_samples: int, num_shards: int, batch_size: int, where: str, batches_per_step: int = 1) -> None:
    """A DataError (what launch/train.py reports in one line) when no shard holds one whole
    optimizer step's batches."""
    if train_steps(num_samples, num_shards, batch_size, batches_per_step) == 0:
        step = "one batch" if batches_per_step == 1 else f"{batches_per_step} batches (train.accum_steps)"
        raise DataError(
            f"{where}: {num_samples} training images over {num_shards} data-parallel shard(s) leave "
            f"{num_samples // num_shards} per shard, fewer than {step} of data.batch_size={batch_size}"
        )
