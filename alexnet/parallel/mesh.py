"""Where a rank sits in the layout: its data-parallel coordinate and the process groups it uses.

Data is indexed by the data-parallel coordinate, never by LOCAL_RANK: on two nodes, local rank 0
exists twice and would read the same shard twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from alexnet.parallel.env import DistEnv


@dataclass(frozen=True)
class Mesh:
    mode: str
    data_rank: int  # which shard of the data this rank reads
    data_size: int  # how many distinct shards there are
    # Ranks whose (correct, count) sums make up the whole dataset exactly once; None = the world.
    metric_group: dist.ProcessGroup | None = None

    def describe(self) -> str:
        return f"{self.mode}: data shard {self.data_rank} of {self.data_size}"


def build_mesh(env: DistEnv, mode: str) -> Mesh:
    if mode == "dp":
        return Mesh(mode, data_rank=env.rank, data_size=env.world_size)
    raise ValueError(f"parallel.mode: {mode!r} is not available yet (choose 'dp')")
