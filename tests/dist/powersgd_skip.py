"""Run under torchrun (2 ranks): PowerSGD across a step that every rank skipped.

Usage: torchrun --nproc_per_node=2 tests/dist/powersgd_skip.py OUT_DIR

Eight data-parallel steps with parallel.comm_hook=powersgd (compressing from step 3 on); at step 5
rank 1's images are NaN, so the loss is non-finite and every rank skips the step, while PowerSGD
has already folded the NaN gradients into its error-feedback residual and factors. Two runs:
`forget` calls ParallelModel.forget_skipped_step() after the skip, as the trainer does; `keep`
does not (its next step applies NaN gradients). Writes OUT_DIR/rank<R>.json: per run, `applied` per step and whether the weights are
finite at the end.
"""

import json
import sys
from pathlib import Path

import torch
from layout_check import batch, fresh_model

from alexnet.config import OptimConfig, ParallelConfig
from alexnet.engine import build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.optim import build_optimizer
from alexnet.parallel.apply import apply_parallelism
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.parallel.mesh import build_mesh

SEED = 11
STEPS = 8
NAN_STEP = 4  # 0-based: the fifth step, two steps into compression
POISON_RANK = 1


def run(env, forget: bool) -> dict:
    mesh = build_mesh(env, "dp", 0)
    par = apply_parallelism(fresh_model(), env, mesh, ParallelConfig(comm_hook="powersgd"), CommCounter())
    opt = build_optimizer(list(par.local.named_parameters()), OptimConfig(), lr=0.01)
    amp = build_amp("off", torch.device("cpu"))
    rows = slice(env.rank * 2, env.rank * 2 + 2)
    applied = []
    for step in range(STEPS):
        images, labels = batch(step, mesh.data_size)
        images, labels = images[rows].clone(), labels[rows]
        if step == NAN_STEP and env.rank == POISON_RANK:
            images.fill_(float("nan"))
        result = train_step(par.module, images, labels, opt, amp, DropoutContext(SEED, step, torch.arange(2)))
        applied.append(bool(result.applied))
        if not result.applied and forget:
            par.forget_skipped_step()
    finite = all(bool(torch.isfinite(p).all()) for p in par.local.parameters())
    return {"applied": applied, "finite": finite, "compressed": par.comm_hook.powersgd.iter > 2}


def main(out_dir: str) -> None:
    env = init_distributed(timeout_s=120)
    result = {"forget": run(env, forget=True), "keep": run(env, forget=False)}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
