"""A layout maps between this rank's module and the single-device model.

Checkpoints hold the single-device layout; a layout turns such a state into this rank's part
(`to_local`) and gathers the parts back into it (`to_full`), for the model's weights and for the
optimizer's momentum alike, so a run can resume under any layout and world size.

It also tells a training step which gradients this rank holds (`StepSync`), so that decisions
over the whole model (the gradient norm for clipping) count every parameter exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

State = dict[str, Tensor]


@dataclass(frozen=True)
class StepSync:
    """What a layout adds to a training step between backward and the optimizer step.

    Calling it finishes the gradients the layout keeps outside DDP (the hybrid's FC slices).
    `counted` are the parameters whose gradients this rank adds to the model's global gradient
    norm. Across the world every parameter of the single-device model is counted exactly once,
    so the SUM all-reduce of the ranks' sums of squares is the single-device model's squared
    norm: a rank counts what it holds alone within its model-parallel group (a tower, an FC
    slice), and of the ranks holding identical copies (data-parallel replicas, whose gradients
    are equal after their all-reduce) only the first counts it. The copies are then counted once
    without an extra collective over the model-parallel group."""

    counted: tuple[nn.Parameter, ...]
    finish: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.finish is not None:
            self.finish()


def is_first_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def counted_if(first: bool, params: Iterable[nn.Parameter]) -> tuple[nn.Parameter, ...]:
    return tuple(params) if first else ()


def replicated_sync(model: nn.Module, finish: Callable[[], None] | None = None) -> StepSync:
    """Every rank holds the whole model with identical gradients (plain data parallelism)."""
    return StepSync(counted_if(is_first_rank(), model.parameters()), finish)


class Moved(nn.Module):
    """Stands where a layer was that now lives on another rank; it holds no parameters."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"this layer lives on {self.where}")

    def extra_repr(self) -> str:
        return self.where


def replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, new)


def gather_states(local: State, group: dist.ProcessGroup | None) -> list[State]:
    """Every member of `group` gets every member's state (CPU tensors)."""
    states: list[State | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, {k: v.detach().cpu() for k, v in local.items()}, group=group)
    return states  # type: ignore[return-value]


class Layout:
    """Plain data parallelism: every rank holds the whole model under its single-device names."""

    mode = "dp"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def to_local(self, full: State) -> State:
        return dict(full)

    def to_full(self, local: State) -> State | None:
        """The single-device state on global rank 0 (None elsewhere); a collective for every rank
        in rank 0's model-parallel group."""
        return dict(local) if not dist.is_initialized() or dist.get_rank() == 0 else None

    def after_backward(self) -> StepSync:
        """What must run between backward and the optimizer step, and which gradients this rank
        counts toward the global norm."""
        return replicated_sync(self.model)
