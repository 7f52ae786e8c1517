"""DistributedDataParallel over a data-parallel group, tuned from the config.

AlexNet keeps 96% of its 61M parameters in the FC layers, so its gradient all-reduce (~244 MB in
fp32 per step) is large next to its compute: a larger `bucket_cap_mb` means fewer, larger
all-reduces; `gradient_as_bucket_view` saves a copy of every gradient; the bf16/fp16 hooks halve
the bytes on the wire; PowerSGD sends a low-rank approximation (much less for fc6/fc7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from alexnet.config import ParallelConfig


def apply_data_parallel(
    model: nn.Module, device: torch.device, cfg: ParallelConfig, group: dist.ProcessGroup | None = None
) -> nn.Module:
    if not (dist.is_available() and dist.is_initialized()):
        return model
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
    )
    apply_comm_hook(ddp, cfg, group)
    return ddp


def apply_comm_hook(
    ddp: nn.parallel.DistributedDataParallel, cfg: ParallelConfig, group: dist.ProcessGroup | None
) -> None:
    state_group = group if group is not None else dist.group.WORLD
    if cfg.comm_hook == "bf16":
        ddp.register_comm_hook(state_group, default_hooks.bf16_compress_hook)
    elif cfg.comm_hook == "fp16":
        ddp.register_comm_hook(state_group, default_hooks.fp16_compress_hook)
    elif cfg.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=state_group, matrix_approximation_rank=cfg.powersgd_rank, start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
