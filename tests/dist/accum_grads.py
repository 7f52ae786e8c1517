"""Where an accumulated step's batches sum their gradients: tests/test_accumulation.py calls
`same_storage_per_step` in a gloo group of its own process; under torchrun (any number of ranks)
this script writes the same result.

Usage: torchrun --nproc_per_node=2 tests/dist/accum_grads.py OUT_JSON

A DDP wrapper settled as the trainer settles it (`settle_buckets`), then three accumulated steps
of two batches. Rank 0 writes, per step and `gradient_as_bucket_view`, whether the first
parameter's gradient after the first batch (under no_sync) is the tensor it is after the step
(a view of DDP's bucket), or a tensor of its own beside the bucket.
"""

import json
import sys
from contextlib import contextmanager

import torch
from torch import nn

import alexnet.engine as engine
from alexnet.engine import MicroBatch, accumulated_step, build_amp
from alexnet.parallel.data_parallel import settle_buckets
from alexnet.parallel.env import init_distributed, shutdown_distributed


def same_storage_per_step(as_view: bool) -> list[bool]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=as_view)
    settle_buckets(ddp, torch.randn(2, 3, 2, 2))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    first = next(ddp.parameters())
    after_first_batch: list[int | None] = []
    deferred = engine._deferred_sync

    @contextmanager
    def noting(module):
        with deferred(module):
            yield
        after_first_batch.append(None if first.grad is None else first.grad.data_ptr())

    engine._deferred_sync = noting
    same = []
    try:
        for _ in range(3):
            batches = [MicroBatch(torch.randn(2, 3, 2, 2), torch.randint(0, 4, (2,)), None) for _ in range(2)]
            accumulated_step(ddp, batches, optimizer, build_amp("off", torch.device("cpu")))
            same.append(after_first_batch[-1] == first.grad.data_ptr())
    finally:
        engine._deferred_sync = deferred
    return same


def main() -> None:
    env = init_distributed(60.0)
    try:
        result = {"bucket_view": same_storage_per_step(True), "own_grads": same_storage_per_step(False)}
        if env.rank == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(result, f)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
