"""One training step (of one batch, or of several whose gradients it sums) and one evaluation
step: pure functions of their batches.

Mixed precision: bf16 autocast needs no loss scaling; fp16 uses a GradScaler (unscale before
clipping). A step whose loss is not finite on any rank is skipped on every rank, and the caller
aborts after too many in a row.

Under towers and hybrid, ranks hold different parameters, so whatever a step decides from
gradients must be decided for the whole model, not per rank: the clipping norm is the single-device
model's global norm, and an fp16 overflow in one rank's gradients skips the step (and backs off the
scale) on every rank. Both ride on the all-reduce the loss check needs anyway: one small collective
per step, whatever the layout, scaler and clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet.config import ConfigError
from alexnet.layers import DropoutContext, apply_dropout_context
from alexnet.metrics import topk_correct
from alexnet.parallel.data_parallel import is_ddp
from alexnet.parallel.layout import StepSync, replicated_sync
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
            # Native bf16 only (Ampere and later): before that torch reports it as supported through
            # emulation, slower than fp16, which those GPUs' tensor cores run.
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            mode = "off"  # CPU autocast is slower than fp32 on most CPUs
    if mode == "off":
        return AmpPolicy(device.type, None, None)
    if mode == "bf16":
        return AmpPolicy(device.type, torch.bfloat16, None)
    if mode != "fp16":  # a Config edited in Python ("BF16") took the fp16 branch below
        raise ConfigError(f"config key 'train.amp' must be auto, bf16, fp16 or off; got {mode!r}", ("train.amp",))
    if device.type != "cuda":
        raise ConfigError(
            "config key 'train.amp' is 'fp16', which needs a CUDA device; use bf16 or off on the CPU", ("train.amp",)
        )
    return AmpPolicy(device.type, torch.float16, torch.amp.GradScaler("cuda"))


@dataclass(frozen=True)
class StepResult:
    loss_sum: Tensor  # summed over the step's rows (all its batches'), on the device
    correct: Tensor  # [top1, top5] counts
    count: Tensor | int
    applied: bool  # False when every rank skipped the step: a non-finite loss or gradient, an fp16 overflow
    # Skipped as a routine fp16 overflow: a finite loss whose scaled gradients overflowed while
    # the loss scale was above 1, so the scaler backs off and tries again. GradScaler starts at
    # 65536 and probes a higher scale every 2000 steps: such skips are expected, not a sign of
    # divergence (at a scale of 1 or below an overflow is the gradient's own).
    overflow: bool = False
    # False when a rank's loss was not finite; a step skipped with finite losses had a non-finite
    # gradient (or, with train.grad_clip, a global norm beyond float32's range).
    loss_finite: bool = True


@dataclass(frozen=True)
class _WorldCheck:
    """What every rank learned from the step's one all-reduce."""

    loss_finite: bool  # on every rank
    grads_finite: bool  # after unscaling, on every rank (unchecked without a scaler or clipping)
    total_norm: Tensor | None  # the whole model's gradient norm (None: not asked for)


def _check_world(loss: Tensor, found_inf: Tensor | None, norm_sq: Tensor | None) -> _WorldCheck:
    """One SUM all-reduce over the world of [loss not finite, gradient overflow, partial squared
    norm]: flags and norm travel together because each collective costs a latency per step.
    Summed flags count the ranks that saw a problem; the norm's partial sums add up to the
    single-device model's squared norm (see StepSync), which NaN or inf keeps to its own slot."""
    dtype = norm_sq.dtype if norm_sq is not None else torch.float32
    zero = loss.new_zeros((), dtype=dtype)
    parts = [
        (~torch.isfinite(loss.detach())).to(dtype),
        found_inf.to(loss.device, dtype) if found_inf is not None else zero,
        norm_sq.to(loss.device) if norm_sq is not None else zero,
    ]
    stats = torch.stack(parts)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    bad_loss, bad_grads, total_sq = stats.tolist()  # the step's one host sync
    total = stats[2].sqrt() if norm_sq is not None else None
    # A non-finite norm (clipping asked for it) is a non-finite gradient somewhere, also without
    # a scaler: clipping by it would write NaN into every weight, so the step is skipped instead.
    return _WorldCheck(bad_loss == 0, bad_grads == 0 and math.isfinite(total_sq), total)


def _counted_norm_sq(model: nn.Module, sync: StepSync) -> Tensor:
    """This rank's share of the squared global gradient norm, in the parameters' dtype (the same
    on every rank, as the all-reduce needs, also on a rank that counts nothing)."""
    like = next(model.parameters())
    grads = [p.grad for p in sync.counted if p.grad is not None]
    if not grads:
        return like.new_zeros(())
    return nn.utils.get_total_norm(grads, 2.0).square().to(like.dtype)


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The overflow flags `unscale_` recorded for `optimizer` (one per device). GradScaler has no
    public accessor; torch's ShardedGradScaler reads and all-reduces the same state. `step` and
    `update` act on these tensors, so writing the global decision into them makes every rank
    skip, and back off its scale, together."""
    return list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())


def _scaled_step(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, flags: list[Tensor], check: _WorldCheck
) -> None:
    if not check.loss_finite:
        # Nothing to learn from a non-finite loss: skip, and end the scaler's iteration (it was
        # unscaled) without touching the scale or its growth count, as if the step never ran.
        scaler.update(new_scale=scaler.get_scale())
        return
    for flag in flags:
        flag.fill_(0.0 if check.grads_finite else 1.0)
    if check.grads_finite:
        scaler.step(optimizer)
    # A skipped step never reaches the optimizer, which `update` does not need (the flags are
    # recorded). Handing it to `scaler.step` would call a fused optimizer anyway, trusting its
    # kernel to skip on the flag: PyTorch's fused SGD then creates its momentum buffers with
    # `empty_like` on its first step and leaves them unwritten, so the usual first-step fp16
    # overflow made every later step read uninitialized memory (NaN weights on an H100).
    scaler.update()


@dataclass(frozen=True)
class MicroBatch:
    """One of the batches whose gradients an optimizer step sums (gradient accumulation)."""

    images: Tensor
    labels: Tensor
    dropout: DropoutContext  # its rows' places in the step's global batch


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    dropout: DropoutContext,
    grad_clip: float = 0.0,
    after_backward: StepSync | Callable[[], None] | None = None,
) -> StepResult:
    """One optimizer step of one batch (`accumulated_step` of a single MicroBatch)."""
    return accumulated_step(model, [MicroBatch(images, labels, dropout)], optimizer, amp, grad_clip, after_backward)


def _deferred_sync(model: nn.Module):
    """DDP's no_sync(): the batch's gradients are summed into .grad without an all-reduce, which
    the step's last batch then makes of the sum (DDP built without static_graph: see
    alexnet.parallel.apply). Other modules need nothing: their gradients are this rank's alone,
    or the layout finishes them once per step (StepSync)."""
    return model.no_sync() if is_ddp(model) else nullcontext()


def accumulated_step(
    model: nn.Module,
    batches: list[MicroBatch],
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    grad_clip: float = 0.0,
    after_backward: StepSync | Callable[[], None] | None = None,
) -> StepResult:
    """One optimizer step over `batches`: the step of their concatenation, one batch's activations
    at a time. Each batch's mean loss is weighted by its share of the step's rows, so the summed
    gradient is the mean over all of them, as one large batch gives (AlexNet has no batch
    statistics: the sum is the large batch's gradient up to rounding).

    `after_backward` is the layout's StepSync (`Layout.after_backward()`): it finishes gradients
    the layout keeps outside DDP (the hybrid's FC slices) and says which gradients this rank
    counts toward the global norm. A plain callable or None means every rank holds the whole
    model (data parallelism, one process)."""
    # Several batches keep the gradients and zero them: under DDP's gradient_as_bucket_view they
    # are then views of its buckets, which the batches under no_sync() accumulate into. Set to
    # None, those batches would accumulate into fresh tensors beside the buckets (the paper
    # model's 244 MB under dp) until the step's last all-reduce.
    optimizer.zero_grad(set_to_none=len(batches) == 1)
    scaler = amp.scaler if amp.scaler is not None and amp.scaler.is_enabled() else None
    rows = sum(b.labels.shape[0] for b in batches)
    loss_sum = correct = None
    try:
        for i, batch in enumerate(batches):
            with nullcontext() if i == len(batches) - 1 else _deferred_sync(model):
                apply_dropout_context(model, batch.dropout)
                with amp.autocast():
                    logits = model(batch.images)
                loss = F.cross_entropy(logits.float(), batch.labels)
                # One batch: its loss as it is (the step of before accumulation, bitwise).
                share = loss * (batch.labels.shape[0] / rows) if len(batches) > 1 else loss
                (scaler.scale(share) if scaler is not None else share).backward()
            with torch.no_grad():
                part = loss.detach() * batch.labels.shape[0]
                hits = topk_correct(logits.detach(), batch.labels)
                loss_sum = part if loss_sum is None else loss_sum + part
                correct = hits if correct is None else correct + hits
    finally:
        # Plain dropout again: a later forward in train mode outside a step (a user's own loop
        # over the model) reused the last batch's masks, or failed at another batch size.
        apply_dropout_context(model, None)
    assert loss_sum is not None and correct is not None, "a step needs at least one batch"
    sync = after_backward if isinstance(after_backward, StepSync) else replicated_sync(model, after_backward)
    sync()
    flags: list[Tensor] = []
    if scaler is not None:
        # Unscaled before the check: the overflow flags and the norm are about the true gradients.
        scaler.unscale_(optimizer)
        flags = _found_inf(scaler, optimizer)
    found_inf = torch.stack([f.to(loss_sum.device) for f in flags]).sum() if flags else None
    # The summed loss is finite only where every batch's was.
    check = _check_world(loss_sum, found_inf, _counted_norm_sq(model, sync) if grad_clip > 0 else None)
    applied = check.loss_finite and check.grads_finite
    overflow = scaler is not None and check.loss_finite and not applied and scaler.get_scale() > 1.0
    if applied and grad_clip > 0:
        # The same coefficient on every rank: the single-device model's clip_grad_norm_.
        nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, check.total_norm)
    if scaler is not None:
        _scaled_step(scaler, optimizer, flags, check)
    elif applied:
        optimizer.step()
    return StepResult(loss_sum, correct, rows, applied, overflow, check.loss_finite)


@torch.no_grad()
def eval_step(model: nn.Module, images: Tensor, labels: Tensor, amp: AmpPolicy) -> StepResult:
    with amp.autocast():
        logits = model(images)
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=PAD_LABEL, reduction="sum")
    count = (labels != PAD_LABEL).sum()
    return StepResult(loss_sum, topk_correct(logits, labels), count, True)
