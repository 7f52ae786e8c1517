"""DistributedDataParallel over a data-parallel group, tuned from the config, with its gradient
traffic counted.

AlexNet keeps 96% of its 61M parameters in the FC layers, so its gradient all-reduce (244 MB in
fp32 per step) is large next to its compute:
* `bucket_cap_mb`: larger buckets mean fewer, larger all-reduces (fc6 alone is 151 MB; the
  default 25 MB cuts it into several calls); raise it on fast links, lower it to start the first
  all-reduce earlier in the backward pass;
* `gradient_as_bucket_view`: gradients live inside the buckets, saving one copy (244 MB);
* `static_graph`: the same parameters are used every step, which lets DDP skip per-step checks;
* `comm_hook`: `bf16`/`fp16` halve the bytes on the wire (use on slow inter-node links; bf16 keeps
  fp32's range); `powersgd` sends a rank-r approximation of each weight matrix (fc6's 4096x9216
  gradient becomes (4096+9216) x r numbers): for clusters with slow networks, at some accuracy
  risk; `none`: exact fp32 all-reduce, the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from alexnet.config import ParallelConfig
from alexnet.parallel.comm import CommCounter, allreduce_sent
from alexnet.parallel.powersgd_state import PowerSGDCarry, compression_problem, factor_sizes

GRAD_KIND = "grad_allreduce"
log = logging.getLogger("alexnet")


@dataclass
class CommHookState:
    group: dist.ProcessGroup | None
    world: int
    counter: CommCounter
    wire_bytes_per_element: int | None  # None: as the bucket's dtype
    powersgd: powerSGD_hook.PowerSGDState | None = None
    carry: PowerSGDCarry | None = None  # PowerSGD's state by parameter, across bucket layouts
    serial: bool = False  # finish each bucket's hook before DDP launches the next (gloo)

    def forget_skipped_step(self) -> None:
        """After a step that every rank skipped (a non-finite loss, an fp16 overflow): PowerSGD
        has folded that step's non-finite gradients into its state, the error-feedback residual
        added to every later gradient and the warm-started P and Q factors, which would make
        every later step non-finite too. Dropped on every rank at the same step (the skip is a
        world decision), they are rebuilt as at the first compressed step: a zero residual, and
        Q from PowerSGD's own seeded generator, the same on every rank."""
        if self.powersgd is not None and self.carry is not None:
            self.carry.forget(self.powersgd)


def _count_bucket(state: CommHookState, bucket: dist.GradBucket) -> None:
    buf = bucket.buffer()
    per_element = state.wire_bytes_per_element or buf.element_size()
    if state.powersgd is not None and state.powersgd.iter >= state.powersgd.start_powerSGD_iter:
        elements = sum(_powersgd_elements(state.powersgd, g) for g in bucket.gradients())
    else:
        elements = buf.numel()
    nbytes = elements * per_element
    state.counter.add(GRAD_KIND, nbytes, allreduce_sent(nbytes, state.world))


def _plain_hook(state: CommHookState, bucket):
    _count_bucket(state, bucket)
    return default_hooks.allreduce_hook(state.group, bucket)


def _fp16_hook(state: CommHookState, bucket):
    _count_bucket(state, bucket)
    return default_hooks.fp16_compress_hook(state.group, bucket)


def _bf16_hook(state: CommHookState, bucket):
    _count_bucket(state, bucket)
    return default_hooks.bf16_compress_hook(state.group, bucket)


def _powersgd_elements(ps: powerSGD_hook.PowerSGDState, grad: torch.Tensor) -> int:
    """What PowerSGD sends for one gradient: P and Q factors (n + m) x rank for a matrix worth
    compressing, the gradient itself otherwise (vectors, small matrices): torch's own test."""
    sizes = factor_sizes(ps, grad.shape)
    return grad.numel() if sizes is None else sum(sizes)


def _powersgd_hook(state: CommHookState, bucket):
    assert state.powersgd is not None and state.carry is not None
    _count_bucket(state, bucket)
    state.carry.fit(state.powersgd, bucket)
    fut = powerSGD_hook.powerSGD_hook(state.powersgd, bucket)
    if state.serial:
        # A compressed bucket is a chain of three all-reduces (uncompressed part, P, Q), the
        # later two started from future callbacks that block in wait(). Gloo runs callbacks on
        # its process group's worker threads (two by default), so with several buckets in
        # flight each rank issues collectives from several threads in its own order: the ranks
        # pair mismatched all-reduces (a size-mismatch abort), or both workers block in
        # callbacks on collectives queued behind them, a hang that no timeout ends, since the
        # queued collectives never start. Finishing the chain here, on the backward thread,
        # keeps one chain in flight, issued in DDP's bucket order on every rank. NCCL runs
        # callbacks inline at launch, so it keeps the overlap.
        fut.wait()
    return fut


def is_ddp(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def apply_data_parallel(
    model: nn.Module,
    device: torch.device,
    cfg: ParallelConfig,
    counter: CommCounter,
    group: dist.ProcessGroup | None = None,
    group_size: int = 1,
    ignore: list[str] | None = None,
    example: torch.Tensor | None = None,
) -> tuple[nn.Module, CommHookState | None]:
    """Wrap `model` in DDP over `group` (None: the world), leaving the parameters named in
    `ignore` to their layout (the hybrid's FC slices). A group of one rank needs no wrapper (and
    has no hook state). `example`, an input batch, settles DDP's buckets before the first step
    (`settle_buckets`; an exact resume needs it)."""
    if not (dist.is_available() and dist.is_initialized()) or group_size == 1:
        return model, None
    if ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
    )
    if example is not None:
        settle_buckets(ddp, example)
        counter.take()  # what the pass sent (the towers' exchanges) is no step's
        counter.take_seconds()
    return ddp, apply_comm_hook(ddp, cfg, counter, group, group_size)


def settle_buckets(ddp: nn.parallel.DistributedDataParallel, example: torch.Tensor) -> None:
    """One forward and backward pass of `example` through a fresh wrapper, in eval mode (no
    dropout draw), its gradients all-reduced by DDP's default hook and then dropped.

    DDP puts every parameter into one bucket for a wrapper's first step and rebuilds its buckets
    in the gradients' order before the second. Without this pass, each session's first step would
    all-reduce in that one bucket: with more than two ranks a ring all-reduce sums each value in
    an order that depends on its place in the bucket, so a resumed session's first step rounded
    differently from the uninterrupted run's (4 gloo ranks: weights 1.5e-8 apart three steps
    later), and PowerSGD, which keys its state by bucket, compressed another layout. After it
    every step of every session all-reduces the same buckets. With `static_graph` DDP rebuilds
    only after its second iteration (the first one records no gradient order): two passes then.
    Called before the comm hook is registered, so that PowerSGD counts no step and the byte
    counts see none."""
    was_training = ddp.training
    ddp.eval()
    try:
        for _ in range(2 if ddp.static_graph else 1):
            ddp(example).float().sum().backward()
    finally:
        ddp.train(was_training)
        # Kept as zeros where they are views of the buckets (no memory of their own), which the
        # rebuild re-points at the new buckets: set to None, the first step's batches under
        # no_sync() (gradient accumulation) summed into fresh tensors beside the buckets.
        ddp.module.zero_grad(set_to_none=not ddp.gradient_as_bucket_view)


def apply_comm_hook(
    ddp: nn.parallel.DistributedDataParallel,
    cfg: ParallelConfig,
    counter: CommCounter,
    group: dist.ProcessGroup | None,
    group_size: int,
) -> CommHookState:
    state = CommHookState(group, group_size, counter, None)
    if cfg.comm_hook == "none":
        ddp.register_comm_hook(state, _plain_hook)
    elif cfg.comm_hook == "fp16":
        state.wire_bytes_per_element = 2
        ddp.register_comm_hook(state, _fp16_hook)
    elif cfg.comm_hook == "bf16":
        state.wire_bytes_per_element = 2
        ddp.register_comm_hook(state, _bf16_hook)
    elif cfg.comm_hook == "powersgd":
        state.powersgd = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=cfg.powersgd_rank, start_powerSGD_iter=2
        )
        state.carry = PowerSGDCarry.for_module(ddp.module)
        reduced = [p.shape for n, p in ddp.module.named_parameters() if n not in ddp.parameters_to_ignore]
        problem = compression_problem(state.powersgd, reduced)
        if problem and dist.get_rank() == 0:
            log.warning(problem)
        state.serial = dist.get_backend(group) == dist.Backend.GLOO
        ddp.register_comm_hook(state, _powersgd_hook)
    return state
