"""A training loader's batches grouped into optimizer steps: gradient accumulation's input.

With `train.accum_steps` = A, an optimizer step sums the gradients of A batches of
`data.batch_size` before it updates the weights: the step of a batch A times as large, at the
activation memory of one batch. The StepLoader is the Loader protocol over the loader of those
batches ("micro-batches"), which yields each step's A batches together, so that everything that
counts steps (the schedule, checkpoints, `train.max_steps`, the stop agreement, progress) counts
optimizer steps. Its state speaks in steps as well: its position counts steps and its batch is
one step's samples per shard (data.batch_size x A), so that a resume under another
accumulation converts its position by samples, as under another batch size
(`pipelines.base.convert_position`). `accum_steps` in the state tells an exact resume (the same
micro-batches: a DALI reader's checkpoint is one of batches of its size) from a converted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipelines.base import Loader

# One optimizer step's batches, each (images, labels).
StepBatches = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class StepLoader:
    """The Loader protocol over a loader of batches, whose items are a step's `accum_steps`
    batches (StepBatches) and whose state counts steps (the module's docstring)."""

    def __init__(self, loader: Loader, accum_steps: int) -> None:
        if accum_steps < 1 or len(loader) % accum_steps:
            # The loaders round a training epoch down to whole steps (ShardSpec.batches_per_step).
            raise ValueError(f"{len(loader)} batches per epoch are not whole steps of {accum_steps} batches")
        self.split = loader.split
        self.num_samples = loader.num_samples
        self.keeps_epoch_order = loader.keeps_epoch_order
        self.batch_loader = loader
        self.accum_steps = accum_steps

    def __len__(self) -> int:
        return len(self.batch_loader) // self.accum_steps

    def __iter__(self) -> Iterator[StepBatches]:
        step: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self.batch_loader:
            step.append(batch)
            if len(step) == self.accum_steps:
                yield tuple(step)
                step = []

    def state_dict(self) -> dict[str, Any]:
        state = self.batch_loader.state_dict()
        a = self.accum_steps
        # Checkpoints are written between steps: a position inside one would lose its batches.
        assert int(state["pos"]) % a == 0, f"batch {state['pos']} is inside a step of {a} batches"
        in_steps = {"pos": int(state["pos"]) // a, "accum_steps": a}
        if "steps" in state:
            in_steps["steps"] = int(state["steps"]) // a
        if "batch_size" in state:
            in_steps["batch_size"] = int(state["batch_size"]) * a
        return {**state, **in_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state` in steps of this loader: its own, or one converted to its layout."""
        a = self.accum_steps
        in_batches = {"pos": int(state["pos"]) * a}
        if "steps" in state:
            in_batches["steps"] = int(state["steps"]) * a
        if "batch_size" in state:
            in_batches["batch_size"] = int(state["batch_size"]) // a
        self.batch_loader.load_state_dict({**state, **in_batches})

    def close(self) -> None:
        self.batch_loader.close()


def accum_steps_of(state: dict[str, Any]) -> int:
    """The accumulation a saved training-loader state was written under (1 before there was any)."""
    return int(state.get("accum_steps", 1))


def describe_step_batch(batch_size: int, accum_steps: int) -> str:
    """A replica's batch per optimizer step, as the logs name it: "16", or "16 (2 accumulated
    batches of 8)"."""
    if accum_steps == 1:
        return str(batch_size)
    return f"{batch_size * accum_steps} ({accum_steps} accumulated batches of {batch_size})"
