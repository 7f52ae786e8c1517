"""One training run, start to finish, in the calling process (one torchrun worker)."""

from __future__ import annotations

import logging
import os
from typing import Any

from alexnet.config import Config
from alexnet.hostmem import apply_host_memory
from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.parallel.mesh import build_mesh
from alexnet.plan import build_plan, set_determinism
from alexnet.trainer import Trainer


def init_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_training(cfg: Config, config_path: str | None) -> dict[str, Any]:
    init_logging(int(os.environ.get("RANK", "0")))
    apply_host_memory(cfg.train.host_memory)  # before the first big tensor, and before loaders fork
    env = init_distributed(cfg.parallel.timeout_s)
    try:
        set_determinism(cfg.train.deterministic)
        mesh = build_mesh(env, cfg.parallel.mode, cfg.parallel.fc_group)
        plan = build_plan(cfg, env, mesh, config_path)
        return Trainer(cfg, env, mesh, plan).fit()
    finally:
        shutdown_distributed()
