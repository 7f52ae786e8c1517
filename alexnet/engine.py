"""One training step and one evaluation step: pure per-batch functions.

Mixed precision: bf16 autocast needs no loss scaling; fp16 uses a GradScaler (unscale before
clipping). A step whose loss is not finite on any rank is skipped on every rank (the decision is
all-reduced, so replicas never diverge), and the caller aborts after too many in a row.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet.layers import DropoutContext, apply_dropout_context
from alexnet.metrics import topk_correct
from pipelines.base import PAD_LABEL


@dataclass(frozen=True)
class AmpPolicy:
    device_type: str
    dtype: torch.dtype | None  # None: full precision
    scaler: torch.amp.GradScaler | None

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def build_amp(mode: Literal["auto", "bf16", "fp16", "off"], device: torch.device) -> AmpPolicy:
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "off"  # CPU autocast is slower than fp32 on most CPUs
    if mode == "off":
        return AmpPolicy(device.type, None, None)
    if mode == "bf16":
        return AmpPolicy(device.type, torch.bfloat16, None)
    if device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or off on the CPU")
    return AmpPolicy(device.type, torch.float16, torch.amp.GradScaler("cuda"))


@dataclass(frozen=True)
class StepResult:
    loss_sum: Tensor  # summed over the batch's rows, on the device
    correct: Tensor  # [top1, top5] counts
    count: Tensor | int
    applied: bool  # False when the step was skipped for a non-finite loss


def _all_ranks_finite(loss: Tensor, group: dist.ProcessGroup | None) -> bool:
    flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() == 0)


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    dropout: DropoutContext,
    grad_clip: float = 0.0,
    after_backward: Callable[[], None] | None = None,
) -> StepResult:
    """One optimizer step. `after_backward` finishes gradients a layout keeps outside DDP (the
    hybrid's FC slices) before they are checked and applied."""
    apply_dropout_context(model, dropout)
    with amp.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
    else:
        loss.backward()
    if after_backward is not None:
        after_backward()
    applied = _all_ranks_finite(loss, None)
    if applied:
        if amp.scaler is not None:
            if grad_clip > 0:
                amp.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scale = amp.scaler.get_scale()
            amp.scaler.step(optimizer)
            amp.scaler.update()
            applied = amp.scaler.get_scale() >= scale  # a lower scale means the step was skipped
        else:
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
    with torch.no_grad():
        correct = topk_correct(logits.detach(), labels)
    return StepResult(loss.detach() * labels.shape[0], correct, labels.shape[0], applied)


@torch.no_grad()
def eval_step(model: nn.Module, images: Tensor, labels: Tensor, amp: AmpPolicy) -> StepResult:
    with amp.autocast():
        logits = model(images)
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=PAD_LABEL, reduction="sum")
    count = (labels != PAD_LABEL).sum()
    return StepResult(loss_sum, topk_correct(logits, labels), count, True)
