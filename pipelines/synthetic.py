"""Random tensors made once on the training device: measures compute and communication only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipelines.base import ShardSpec, Split


class SyntheticLoader:
    keeps_epoch_order = True  # its batches have no order to lose

    def __init__(
        self,
        split: Split,
        crop: int,
        num_classes: int,
        shard: ShardSpec,
        steps: int,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.split = split
        self.num_samples = steps * shard.batch_size * shard.num_shards
        self._steps = steps
        self._shard = shard
        g = torch.Generator().manual_seed(shard.seed * 1_000_003 + shard.shard_id)
        images = torch.randn(shard.batch_size, 3, crop, crop, generator=g)
        labels = torch.randint(0, num_classes, (shard.batch_size,), generator=g)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self._images = images.to(device)
        self._labels = labels.to(device)
        self._epoch = 0
        self._pos = 0

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self._pos < self._steps:
            self._pos += 1
            yield self._images, self._labels
        self._pos = 0
        self._epoch += 1

    def state_dict(self) -> dict[str, Any]:
        # What `pos` counts in, as the file loaders say it (pipelines.base.position_state), so
        # that a resume under another batch or accumulation converts it.
        shard = self._shard
        return {"epoch": self._epoch, "pos": self._pos, "num_shards": shard.num_shards, "steps": self._steps,
                "batch_size": shard.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])

    def close(self) -> None:
        pass
