"""Turn the single-device model into this rank's part of the chosen layout, wrapped for training."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from alexnet.config import ParallelConfig
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.data_parallel import apply_data_parallel
from alexnet.parallel.env import DistEnv
from alexnet.parallel.hybrid import apply_hybrid
from alexnet.parallel.layout import Layout
from alexnet.parallel.mesh import Mesh
from alexnet.parallel.towers import apply_towers


@dataclass
class ParallelModel:
    module: nn.Module  # what a training step calls (DDP where gradients are all-reduced)
    local: nn.Module  # this rank's model: its parameters, its state, evaluation
    layout: Layout  # maps states between `local` and the single-device model


def apply_parallelism(
    model: nn.Module, env: DistEnv, mesh: Mesh, cfg: ParallelConfig, counter: CommCounter
) -> ParallelModel:
    """`model` is the full single-device model, identical on every rank (same seed or same
    checkpoint); it is transformed in place where the layout splits it."""
    if mesh.mode == "towers":
        layout = apply_towers(model, mesh, counter)
        module = apply_data_parallel(model, env.device, cfg, counter, mesh.grad_group, mesh.grad_group_size)
        return ParallelModel(module, model, layout)
    if mesh.mode == "hybrid":
        local, layout = apply_hybrid(model, mesh, counter)
        fc = [f"head.{name}" for name, _ in local.head.named_parameters()]
        module = apply_data_parallel(local, env.device, cfg, counter, None, mesh.world_size, ignore=fc)
        return ParallelModel(module, local, layout)
    module = apply_data_parallel(model, env.device, cfg, counter, None, mesh.world_size)
    return ParallelModel(module, model, Layout(model))
