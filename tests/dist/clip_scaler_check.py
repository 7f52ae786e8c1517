"""Run under torchrun: the decisions a training step must take the same way on every rank.

Usage: torchrun --nproc_per_node=N tests/dist/clip_scaler_check.py OUT_DIR RUN [RUN ...]
with RUN = MODE:FC_GROUP, e.g. hybrid:2 (the runs of one world size share a launch, whose start
took longer than a run).

Writes OUT_DIR/RUN/rank<R>.json with
* clip: MODE against the single-device model (computed on rank 0 alone and handed to the
  others), both through engine.train_step with gradient clipping that bites on every step
  (float64, so the only differences are summation orders);
* scaler_clip<C>: a GradScaler("cpu") run of four steps (normal; an overflow in one parameter's
  gradient on rank 1 only; a NaN image on rank 1 only; normal) with clipping C, recording what
  every rank decided;
* fp32_clip<C>: the same four steps without a scaler, with clipping (whose norm sees the inf).
"""

import json
import sys
from pathlib import Path

import torch
from layout_check import batch, fresh_model, from_rank_0, max_diff

from alexnet.config import OptimConfig, ParallelConfig
from alexnet.engine import AmpPolicy, build_amp, train_step
from alexnet.layers import DropoutContext
from alexnet.optim import build_optimizer
from alexnet.parallel.apply import ParallelModel, apply_parallelism
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.parallel.mesh import Mesh, build_mesh

SEED = 11
CLIP = 0.05  # well below this model's gradient norm: every step is clipped (the test checks)
CLIP_STEPS = 3
CLIP_LR = 0.5  # clipped steps are short: a large rate makes them move the weights visibly
POISON_RANK = 1
# Step kinds of the scaler run, in order.
SCALER_STEPS = ("normal", "grad_overflow", "nan_loss", "normal")
CPU = torch.device("cpu")


def rows_of(mesh: Mesh, per_replica: int) -> slice:
    return slice(mesh.data_rank * per_replica, (mesh.data_rank + 1) * per_replica)


def clipped_reference(replicas: int) -> dict:
    """The single-device model's weights after CLIP_STEPS clipped steps on the global batch of
    `replicas` replicas (float64), how far they moved, and its gradient norm after each clip."""
    torch.set_default_dtype(torch.float64)
    try:
        amp = build_amp("off", CPU)
        reference = fresh_model()
        ref_opt = build_optimizer(list(reference.named_parameters()), OptimConfig(), lr=CLIP_LR)
        clipped_norms = []
        for step in range(CLIP_STEPS):
            images, labels = batch(step, replicas)
            everyone = torch.arange(len(labels))
            train_step(reference, images, labels, ref_opt, amp, DropoutContext(SEED, step, everyone), CLIP)
            # After clipping, the reference's norm is CLIP exactly when the clip bit.
            clipped_norms.append(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item())
        start = fresh_model().state_dict()
        state = reference.state_dict()
        moved = max(max_diff(v, start[k]) for k, v in state.items())
        return {"state": state, "weights_moved": moved, "clipped_norms": clipped_norms}
    finally:
        torch.set_default_dtype(torch.float32)


def check_clip(env, mesh: Mesh) -> dict:
    """Weights after CLIP_STEPS clipped steps, against the single-device model's (computed on
    rank 0 and handed to every rank: the same on each)."""
    reference = from_rank_0(lambda: clipped_reference(mesh.data_size))
    torch.set_default_dtype(torch.float64)
    try:
        amp = build_amp("off", CPU)
        par = apply_parallelism(fresh_model(), env, mesh, ParallelConfig(), CommCounter())
        opt = build_optimizer(list(par.local.named_parameters()), OptimConfig(), lr=CLIP_LR)
        after_backward = par.layout.after_backward()
        rows = rows_of(mesh, 2)
        ids = torch.arange(rows.start, rows.stop)
        for step in range(CLIP_STEPS):
            images, labels = batch(step, mesh.data_size)
            dropout = DropoutContext(SEED, step, ids)
            train_step(par.module, images[rows], labels[rows], opt, amp, dropout, CLIP, after_backward)
        ref_state = par.layout.to_local(reference["state"])
        return {
            "weights_after_steps": max(max_diff(v, ref_state[k]) for k, v in par.local.state_dict().items()),
            "weights_moved": reference["weights_moved"],
            "clipped_norms": reference["clipped_norms"],
        }
    finally:
        torch.set_default_dtype(torch.float32)


def poison_on(par: ParallelModel, rank: int, armed: list[bool]) -> None:
    """While `armed[0]` is set, POISON_RANK overflows in one gradient: an fc8 parameter, which
    under towers and hybrid no other rank of its model holds (the way fp16 overflows in one
    tower). `rank` is this process's global rank."""
    param = next(p for n, p in par.local.named_parameters() if "fc8" in n)

    def overflow(p: torch.Tensor) -> None:
        if armed[0] and rank == POISON_RANK:
            p.grad.view(-1)[0] = float("inf")

    param.register_post_accumulate_grad_hook(overflow)


def check_scaler(env, mesh: Mesh, clip: float, scaler: bool = True) -> dict:
    """Per step: applied, the scale after it (None without a scaler), the trainer's non-finite
    streak, whether this rank's weights changed."""
    par = apply_parallelism(fresh_model(), env, mesh, ParallelConfig(), CommCounter())
    opt = build_optimizer(list(par.local.named_parameters()), OptimConfig(), lr=0.002)
    amp = AmpPolicy("cpu", None, torch.amp.GradScaler("cpu")) if scaler else build_amp("off", CPU)
    after_backward = par.layout.after_backward()
    armed = [False]
    poison_on(par, env.rank, armed)
    rows = rows_of(mesh, 2)
    ids = torch.arange(rows.start, rows.stop)
    streak, record = 0, {"applied": [], "overflow": [], "scale": [], "streak": [], "weights_changed": []}
    for step, kind in enumerate(SCALER_STEPS):
        images, labels = batch(step, mesh.data_size)
        images, labels = images[rows].clone(), labels[rows]
        if kind == "nan_loss" and env.rank == POISON_RANK:
            images.fill_(float("nan"))
        armed[0] = kind == "grad_overflow"
        before = {k: v.clone() for k, v in par.local.state_dict().items()}
        result = train_step(par.module, images, labels, opt, amp, DropoutContext(SEED, step, ids), clip, after_backward)
        # The trainer's count (Trainer._count_skips): a scaler's overflow back-off is not counted.
        streak = 0 if result.applied else streak + (not result.overflow)
        after = par.local.state_dict()
        record["applied"].append(bool(result.applied))
        record["overflow"].append(bool(result.overflow))
        record["scale"].append(amp.scaler.get_scale() if scaler else None)
        record["streak"].append(streak)
        record["weights_changed"].append(any(not torch.equal(v, before[k]) for k, v in after.items()))
    return record


def check_run(env, out_dir: Path, mode: str, fc_group: int) -> None:
    mesh = build_mesh(env, mode, fc_group)
    result = {"rank": env.rank, "clip": check_clip(env, mesh)}
    for clip in (0.0, CLIP):
        result[f"scaler_clip{clip}"] = check_scaler(env, mesh, clip)
    result[f"fp32_clip{CLIP}"] = check_scaler(env, mesh, CLIP, scaler=False)
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))


def main(out_dir: str, runs: list[str]) -> None:
    env = init_distributed(timeout_s=120)
    for run in runs:
        mode, fc_group = run.split(":")
        check_run(env, Path(out_dir, run), mode, int(fc_group))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
