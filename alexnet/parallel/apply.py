"""Turn the single-device model into this rank's part of the chosen layout, wrapped for training."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alexnet.config import ParallelConfig
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.data_parallel import CommHookState, apply_data_parallel
from alexnet.parallel.env import DistEnv
from alexnet.parallel.hybrid import apply_hybrid, fc_grad_wire_dtype
from alexnet.parallel.layout import Layout
from alexnet.parallel.mesh import Mesh
from alexnet.parallel.towers import apply_towers

log = logging.getLogger("alexnet")


@dataclass
class ParallelModel:
    module: nn.Module  # what a training step calls (DDP where gradients are all-reduced)
    local: nn.Module  # this rank's model: its parameters, its state, evaluation
    layout: Layout  # maps states between `local` and the single-device model
    comm_hook: CommHookState | None = None  # DDP's gradient hook's state (None: no DDP)

    def forget_skipped_step(self) -> None:
        """Call after a step that was skipped on every rank: drops what the gradient hook kept
        of it (PowerSGD's residuals and factors)."""
        if self.comm_hook is not None:
            self.comm_hook.forget_skipped_step()


def example_batch(crop: int, device: torch.device, channels_last: bool) -> Tensor:
    """One black image in the training's shape and memory format, for `apply_parallelism`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.zeros(1, 3, crop, crop, device=device).contiguous(memory_format=fmt)


def apply_parallelism(
    model: nn.Module,
    env: DistEnv,
    mesh: Mesh,
    cfg: ParallelConfig,
    counter: CommCounter,
    example: Tensor | None = None,
) -> ParallelModel:
    """`model` is the full single-device model, identical on every rank (same seed or same
    checkpoint); it is transformed in place where the layout splits it. `example`: an input batch
    (one image will do) that settles DDP's buckets before the first step, as an exact resume
    needs (`alexnet.parallel.data_parallel.settle_buckets`)."""
    if env.is_main:
        warn_of_unused_settings(cfg, mesh)
    if mesh.mode == "towers":
        layout = apply_towers(model, mesh, counter)
        module, hook = apply_data_parallel(model, env.device, cfg, counter, mesh.grad_group, mesh.grad_group_size,
                                          example=example)  # fmt: skip
        return ParallelModel(module, model, layout, hook)
    if mesh.mode == "hybrid":
        local, layout = apply_hybrid(model, mesh, counter, fc_grad_wire_dtype(cfg.comm_hook, mesh))
        fc = [f"head.{name}" for name, _ in local.head.named_parameters()]
        module, hook = apply_data_parallel(local, env.device, cfg, counter, None, mesh.world_size, fc, example)
        return ParallelModel(module, local, layout, hook)
    module, hook = apply_data_parallel(model, env.device, cfg, counter, None, mesh.world_size, example=example)
    return ParallelModel(module, model, Layout(model), hook)


def ddp_settings(cfg: ParallelConfig, accum_steps: int, warn: bool) -> ParallelConfig:
    """The settings DDP is built with: gradient accumulation (all but a step's last batch under
    no_sync()) leaves out parallel.static_graph, as a precaution. DDP's static-graph reducer
    counts its first iteration by backward passes, and under no_sync() that count is what
    pytorch/pytorch#187732 (open in PyTorch 2.14.1) fixes: a wrapper whose first backward runs
    under no_sync() stops at an INTERNAL ASSERT ("expect_autograd_hooks_"), and, past it, its
    gradients are no longer all-reduced. This project's wrappers take two synced passes first
    (settle_buckets), which avoids that case (checked on gloo, not on NCCL), but a silent loss
    of the all-reduce is not worth static_graph's small saving. `warn`: say so (once)."""
    if accum_steps == 1 or not cfg.static_graph:
        return cfg
    if warn:
        log.warning("parallel.static_graph=true is not applied with train.accum_steps=%d: DDP's static graph "
                    "under no_sync() is what pytorch/pytorch#187732 fixes (an internal assert, or gradients no "
                    "longer all-reduced); left out as a precaution", accum_steps)  # fmt: skip
    return dataclasses.replace(cfg, static_graph=False)


def warn_of_unused_settings(cfg: ParallelConfig, mesh: Mesh) -> None:
    """Settings this layout has no use for, which a run accepted without a word (a user reading
    the config would think them in effect)."""
    if cfg.fc_group and mesh.mode != "hybrid":
        log.warning("parallel.fc_group=%d applies to parallel.mode=hybrid only: ignored in %s", cfg.fc_group, mesh.mode)
    if cfg.comm_hook != "none" and mesh.grad_group_size == 1:
        log.warning("parallel.comm_hook=%s has no gradient all-reduce to compress (one replica: %s on %d "
                    "process(es)): ignored", cfg.comm_hook, mesh.mode, mesh.world_size)  # fmt: skip
