"""Top-k counts, exact distributed totals, throughput, and the metrics writers.

Accuracy across ranks is (sum of correct) / (sum of counted), never an average of per-rank
percentages; rows labelled PAD_LABEL (shard padding) are not counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipelines.base import PAD_LABEL


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of rows whose label is among the top-k logits, for each k (padding rows excluded)."""
    valid = labels != PAD_LABEL
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = (top == labels[:, None]) & valid[:, None]
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


@dataclass
class Tally:
    """Running sums kept on the device (no host sync per step): loss sum, top-1, top-5, count."""

    device: torch.device
    sums: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: Tensor, correct: Tensor, count: Tensor | int) -> None:
        self.sums += torch.stack(
            [
                loss_sum.detach().double(),
                correct[0].double(),
                correct[1].double(),
                torch.as_tensor(count, device=self.device).double(),
            ]
        )

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Sum over `group` (all ranks when distributed) and return loss, top1, top5, count."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=group)
        loss, c1, c5, n = sums.tolist()
        n_safe = max(n, 1.0)
        return {"loss": loss / n_safe, "top1": 100.0 * c1 / n_safe, "top5": 100.0 * c5 / n_safe, "count": int(n)}

    def reset(self) -> None:
        self.sums.zero_()


class Throughput:
    """Images per second over a window, and how much of the window was spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_sec": self.images / elapsed, "data_wait_share": self.data_wait / elapsed}


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key not in ("split", "epoch", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
