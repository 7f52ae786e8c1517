"""Run under torchrun: one DDP training step, each rank on its slice of a fixed global batch.

Usage: torchrun --nproc_per_node=N tests/dist/ddp_step.py OUT.pt
Rank 0 saves the model's state after the step.
"""
import sys

import torch

from alexnet.config import OptimConfig, ParallelConfig
from alexnet.engine import build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.model import build_model
from alexnet.optim import build_optimizer
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.data_parallel import apply_data_parallel
from alexnet.parallel.env import init_distributed, shutdown_distributed

PER_RANK = 4
SIZE = 67


def global_batch(world: int):
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(PER_RANK * world, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, 10, (PER_RANK * world,), generator=g)
    return images, labels


def one_step(model, images, labels, sample_ids):
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(lr=0.05), lr=0.05)
    amp = build_amp("off", torch.device("cpu"))
    train_step(model, images, labels, optimizer, amp, DropoutContext(seed=9, step=0, sample_ids=sample_ids))


def fresh_model():
    torch.manual_seed(0)
    return build_model("paper", 10, dropout=0.5, input_size=SIZE, init="kaiming")


def main(out: str) -> None:
    env = init_distributed(timeout_s=60)
    model = fresh_model()
    ddp, _ = apply_data_parallel(model, env.device, ParallelConfig(), CommCounter(), None, env.world_size)
    images, labels = global_batch(env.world_size)
    rows = slice(env.rank * PER_RANK, (env.rank + 1) * PER_RANK)
    one_step(ddp, images[rows], labels[rows], torch.arange(rows.start, rows.stop))
    if env.is_main:
        torch.save(model.state_dict(), out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
