"""Run under torchrun (4 ranks): a run cut into two sessions against the same run in one.

Usage: torchrun --nproc_per_node=4 tests/dist/resume_buckets.py OUT_DIR

Each case trains STEPS steps straight, then CUT steps, puts weights and momentum into a fresh
model, wrapper and optimizer (a new session), and trains the rest. Both sessions settle DDP's
buckets with an example batch, as the trainer does. Cases: plain all-reduce (with
parallel.static_graph); PowerSGD with its
state carried over (`PowerSGDCarry.state_dict` / `load_state_dict`, by parameter name), in the
dp layout and in the hybrid one (DDP over the convolutions). Writes
OUT_DIR/rank<R>.json: per case, whether the final weights equal the straight run's bitwise, and
their largest difference.
"""

import json
import sys
from pathlib import Path

import torch
from layout_check import CPU, PER_REPLICA, SIZE, batch, fresh_model

from alexnet.config import OptimConfig, ParallelConfig
from alexnet.engine import build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.optim import build_optimizer
from alexnet.parallel.apply import apply_parallelism, example_batch
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.parallel.mesh import build_mesh

STEPS = 7
CUT = 4  # PowerSGD compresses from the third step: the cut falls two steps into compression
CASES = {  # layout, comm hook, parallel.static_graph (under which DDP rebuilds a step later)
    "plain_static_graph": ("dp", "none", True),
    "powersgd": ("dp", "powersgd", False),
    "hybrid_powersgd": ("hybrid", "powersgd", False),
}


def session(env, mode, hook, static, weights=None, momentum=None, carried=None):
    mesh = build_mesh(env, mode, 2)
    cfg = ParallelConfig(mode=mode, fc_group=2, comm_hook=hook, bucket_cap_mb=1, static_graph=static)  # 12 buckets
    par = apply_parallelism(fresh_model(), env, mesh, cfg, CommCounter(), example_batch(SIZE, CPU, False))
    if weights is not None:  # this rank's part (the hybrid's FC slices are the rank's own)
        par.local.load_state_dict(weights)
    opt = build_optimizer(list(par.local.named_parameters()), OptimConfig(), lr=0.01)
    if momentum is not None:
        opt.load_state_dict(momentum)
    if carried is not None:
        par.comm_hook.carry.load_state_dict(par.comm_hook.powersgd, carried, CPU)
    return mesh, par, opt


def train(mesh, par, opt, steps):
    rows = slice(mesh.data_rank * PER_REPLICA, (mesh.data_rank + 1) * PER_REPLICA)
    amp = build_amp("off", CPU)
    after = par.layout.after_backward()
    for step in steps:
        images, labels = batch(step, mesh.data_size)
        dropout = DropoutContext(3, step, torch.arange(rows.start, rows.stop))
        train_step(par.module, images[rows].clone(), labels[rows], opt, amp, dropout, 0.0, after)


def weights_of(par):
    return {k: v.clone() for k, v in par.local.state_dict().items()}


def run_case(env, mode, hook, static):
    mesh, par, opt = session(env, mode, hook, static)
    train(mesh, par, opt, range(STEPS))
    straight = weights_of(par)

    mesh, par, opt = session(env, mode, hook, static)
    train(mesh, par, opt, range(CUT))
    hook_state = par.comm_hook
    carried = hook_state.carry.state_dict(hook_state.powersgd) if hook == "powersgd" else None
    mesh, par, opt = session(env, mode, hook, static, weights_of(par), opt.state_dict(), carried)
    train(mesh, par, opt, range(CUT, STEPS))
    resumed = weights_of(par)
    equal = all(torch.equal(resumed[k], v) for k, v in straight.items())
    diff = max((resumed[k] - v).abs().max().item() for k, v in straight.items())
    return {"equal": equal, "max_diff": diff}


def main(out_dir: str) -> None:
    env = init_distributed(timeout_s=120)
    result = {name: run_case(env, *case) for name, case in CASES.items()}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
