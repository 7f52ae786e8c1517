"""The paper's optimizer and learning-rate policies.

Section 5: SGD, batch 128, momentum 0.9, weight decay 0.0005, lr 0.01 divided by 10 when the
validation error stops improving (three times in all). The rate is given for a reference global
batch and scaled linearly with the actual global batch (Goyal et al. 2017), with optional warmup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alexnet.config import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_reference_batch


# Optimizer settings that choose how the update is computed, not what it is: a checkpoint does
# not carry them over (a run resumed from an older checkpoint keeps this version's fused kernel).
IMPLEMENTATION_KEYS = frozenset({"foreach", "fused", "differentiable", "capturable"})


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    """Weight decay on weights only: cuda-convnet, which trained the paper's model, sets no decay
    on biases.

    The update runs as PyTorch's fused SGD kernel where the parameters' device has one (CPU, CUDA):
    decay, momentum and the step in one pass per tensor, where the default CPU path makes three
    and allocates a parameter-sized temporary for the decayed gradient (whole training steps at
    batch 32 on a 2-core EPYC: 1.025-1.056x as fast, `launch/microbench.py sgd-step`). The update
    is the same formula. Elsewhere (a device without the kernel, a non-float parameter) it is
    PyTorch's default path: the fused kernel checks its parameters only at its first step, so the
    choice is made here, not by catching that step's error."""
    named_params = list(named_params)  # read twice below: model.named_parameters() is a generator
    decay = [p for n, p in named_params if p.ndim > 1]
    no_decay = [p for n, p in named_params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "name": "biases"},
    ]
    fused = all(_has_fused_sgd(p) for p in decay + no_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused or None)


def _has_fused_sgd(param: Tensor) -> bool:
    """Whether PyTorch's fused SGD takes this parameter: a float tensor on a device with the
    kernel (the list PyTorch's own optimizers consult; private, so a missing one means no)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    return param.is_floating_point() and param.device.type in _get_fused_kernels_supported_devices()


@dataclass
class PlateauState:
    best_top1: float = -math.inf
    bad_evals: int = 0
    reductions: int = 0
    # The product of the factors of the reductions made: a schedule.factor changed on resume
    # applies to the reductions still to come, not again to those made (0.1 then 0.5 had put the
    # rate back up fivefold in the middle of an epoch).
    multiplier: float = 1.0


# A top-1 gain (percentage points) this close below schedule.min_delta counts as reaching it:
# 12.3 -> 13.3 is exactly one point (ten images of 1000), which 12.3 + 1.0 > 13.3 in floats refused.
_MIN_DELTA_SLACK = 1e-9


# The keys each schedule reads besides the warm-up's: a key set for another schedule is ignored.
_SCHEDULE_KEYS = {
    "plateau": ("factor", "patience", "min_delta", "max_reductions"),
    "step": ("factor", "step_epochs"),
    "cosine": ("min_lr_factor",),
    "constant": (),
}


def ignored_schedule_keys(cfg: ScheduleConfig) -> list[str]:
    """The schedule keys set to other than their defaults that `cfg.name` does not read (a
    `min_lr_factor` given to the plateau schedule, say): said at the start, as nothing uses them."""
    default = ScheduleConfig()
    read = set(_SCHEDULE_KEYS[cfg.name])
    return [
        f"schedule.{key}"
        for keys in _SCHEDULE_KEYS.values()
        for key in keys
        if key not in read and getattr(cfg, key) != getattr(default, key)
    ]


def schedule_problems(cfg: ScheduleConfig, epochs: int, peak_lr: float, eval_every: int = 1) -> list[str]:
    """What in the schedule's settings does not do what it looks like it does: a warm-up as long
    as the run, a step or plateau schedule that can never divide the rate within the run, keys
    the chosen schedule does not read."""
    problems = [warmup_problem(cfg, epochs, peak_lr)]
    if cfg.name == "step" and cfg.step_epochs >= epochs:
        problems.append(f"schedule.step_epochs ({cfg.step_epochs}) is not below train.epochs ({epochs}): the step "
                        "schedule never divides the rate")  # fmt: skip
    # The plateau's first division follows its (patience + 1)-th validation of the cadence: the
    # first sets the best, `patience` more without a gain divide. From the run's last epoch on,
    # no step is left to train at the divided rate.
    first = eval_every * (cfg.patience + 1)
    if cfg.name == "plateau" and cfg.max_reductions > 0 and first >= epochs:
        problems.append(f"the plateau schedule can first divide the rate after the validation of epoch {first} "
                        f"(train.eval_every {eval_every} x (schedule.patience {cfg.patience} + 1)), not before "
                        f"train.epochs ({epochs}): the rate never changes in this run")  # fmt: skip
    if cfg.name == "plateau" and cfg.max_reductions == 0:
        problems.append("schedule.max_reductions is 0: the plateau schedule never divides the rate")
    if cfg.warmup_epochs == 0 and cfg.warmup_start_factor != ScheduleConfig().warmup_start_factor:
        problems.append("schedule.warmup_start_factor is set, but schedule.warmup_epochs is 0: there is no warm-up "
                        "for it to start")  # fmt: skip
    ignored = sorted(dict.fromkeys(ignored_schedule_keys(cfg)))  # factor is read by two schedules
    if ignored:
        one = len(ignored) == 1
        problems.append(f"{', '.join(ignored)} {'is' if one else 'are'} not read by schedule.name={cfg.name}: "
                        f"{'it has' if one else 'they have'} no effect")  # fmt: skip
    return [p for p in problems if p]


def rate_change(
    saved: ScheduleConfig, saved_epochs: int, schedule: LrSchedule, step: int
) -> tuple[float, float] | None:
    """(the checkpoint's rate, this run's) for step index `step` where the schedule's settings or
    train.epochs changed on resume move it (a cosine re-spread over more epochs goes back up);
    None where they do not. Both at this run's peak rate: a changed global batch is said apart."""
    before = LrSchedule(saved, schedule.peak_lr, schedule.steps_per_epoch, saved_epochs)
    before.load_state_dict(schedule.state_dict())
    was, now = before.lr_at(step), schedule.lr_at(step)
    return None if math.isclose(was, now, rel_tol=1e-6, abs_tol=0.0) else (was, now)


def warmup_problem(cfg: ScheduleConfig, epochs: int, peak_lr: float) -> str:
    """Why the warm-up defeats the schedule ("" when it does not): one as long as the run never
    reaches the peak rate (a short trial of an 8-GPU recipe, say)."""
    if cfg.warmup_epochs < epochs:
        return ""
    return (f"schedule.warmup_epochs ({cfg.warmup_epochs:g}) is not below train.epochs ({epochs}): the learning "
            f"rate never reaches its peak of {peak_lr:.4g}")  # fmt: skip


class LrSchedule:
    """lr(step) = peak * warmup(step) * policy(step); plateau decisions come from validations."""

    def __init__(self, cfg: ScheduleConfig, peak_lr: float, steps_per_epoch: int, epochs: int) -> None:
        self.cfg = cfg
        self.peak_lr = peak_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.plateau = PlateauState()
        # The schedule is a function of epoch progress, counted in steps of `steps_per_epoch`.
        # While the epochs keep their length that count is the global step itself (offset 0, so
        # a resume under the same layout is bit-exact); a resume under another number of steps
        # per epoch moves it, so that the rate goes on from the same fraction of the run.
        self.step_offset = 0

    def realign(self, step: int, position: int) -> None:
        """From global step `step` on, the run stands `position` steps (of this schedule's
        epochs) into its schedule: epochs done * steps_per_epoch + batches done in this one."""
        self.step_offset = position - step

    def position(self, step: int) -> int:
        """Where global step `step` stands in this schedule's epochs (epochs x steps_per_epoch)."""
        return step + self.step_offset

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        step = self.position(step)
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        warm = 1.0
        if step < warmup_steps:
            warm = cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup_steps
        if cfg.name == "constant":
            policy = 1.0
        elif cfg.name == "step":
            policy = cfg.factor ** (step // (cfg.step_epochs * self.steps_per_epoch))
        elif cfg.name == "cosine":
            span = max(self.total_steps - warmup_steps, 1)
            t = min(max(step - warmup_steps, 0) / span, 1.0)
            policy = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
        else:
            policy = self.plateau.multiplier
        return self.peak_lr * warm * policy

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe_validation(self, top1: float) -> bool:
        """Record a validation top-1 (%); True when the plateau policy just divided the rate."""
        if self.cfg.name != "plateau":
            return False
        p = self.plateau
        gain = top1 - p.best_top1
        if gain > 0 and gain >= self.cfg.min_delta - _MIN_DELTA_SLACK:  # an equal top-1 is no gain
            p.best_top1 = top1
            p.bad_evals = 0
            return False
        p.bad_evals += 1
        if p.bad_evals >= self.cfg.patience and p.reductions < self.cfg.max_reductions:
            p.reductions += 1
            p.multiplier *= self.cfg.factor
            p.bad_evals = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_top1": self.plateau.best_top1,
            "bad_evals": self.plateau.bad_evals,
            "reductions": self.plateau.reductions,
            "multiplier": self.plateau.multiplier,
            "step_offset": self.step_offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        reductions = int(state["reductions"])
        # Older checkpoints have no multiplier: restore_training gives them the checkpoint's own
        # factor's (resume.with_plateau_multiplier); this factor's where no config is at hand.
        multiplier = float(state.get("multiplier", self.cfg.factor**reductions))
        self.plateau = PlateauState(float(state["best_top1"]), int(state["bad_evals"]), reductions, multiplier)
        self.step_offset = int(state.get("step_offset", 0))  # absent from older checkpoints
