"""A layout maps between this rank's module and the single-device model.

Checkpoints hold the single-device layout; a layout turns such a state into this rank's part
(`to_local`) and gathers the parts back into it (`to_full`), for the model's weights and for the
optimizer's momentum alike, so a run can resume under any layout and world size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor, nn

State = dict[str, Tensor]


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

    def after_backward(self) -> Callable[[], None] | None:
        """What must run between backward and the optimizer step (None: nothing)."""
        return None
