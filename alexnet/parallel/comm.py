"""Collectives that know what they cost: an autograd-aware all-gather and a byte counter.

Bytes are counted two ways for every collective a rank starts:
* payload: the size of the tensor this rank hands to the collective (what "244 MB of fp32
  gradients per step" means for plain data parallelism);
* sent: what this rank puts on the wire under the ring algorithms NCCL and gloo use:
  all-reduce of N bytes over P ranks sends 2N(P-1)/P; all-gather of a part of S bytes sends
  S(P-1); reduce-scatter with a result of S bytes sends S(P-1).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet.layers import channels_innermost


def allreduce_sent(nbytes: int, world: int) -> int:
    return 2 * nbytes * (world - 1) // world


@dataclass
class CommCounter:
    """Bytes per kind ("grad_allreduce", "activation_exchange", ...) since the last take().

    With `timed`, the blocking exchanges also add up their seconds (after synchronizing the
    device, which costs overlap: for benchmarks, not for training)."""

    timed: bool = False
    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, payload: int, sent: int) -> None:
        self.payload[kind] += payload
        self.sent[kind] += sent

    def take(self) -> tuple[dict[str, int], dict[str, int]]:
        payload, sent = dict(self.payload), dict(self.sent)
        self.payload.clear()
        self.sent.clear()
        return payload, sent

    def take_seconds(self) -> dict[str, float]:
        seconds = dict(self.seconds)
        self.seconds.clear()
        return seconds

    @contextmanager
    def timing(self, kind: str, device: torch.device):
        if not self.timed:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[kind] += time.perf_counter() - start


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `parts` nearly equal slices of n (the first n % parts get one more)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _dense(x: Tensor) -> Tensor:
    """x as a dense tensor in its own memory format: channels_last activations stay
    channels_last, so the layers after an exchange run with the same kernels (and the same
    tie-breaking in max-pooling's gradient) as on one device."""
    return x.contiguous(memory_format=torch.channels_last if channels_innermost(x) else torch.contiguous_format)


def _pad_to(x: Tensor, dim: int, size: int) -> Tensor:
    if x.shape[dim] == size:
        return _dense(x)
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return _dense(torch.cat([x, x.new_zeros(pad_shape)], dim=dim))


class _GatherCat(torch.autograd.Function):
    """Forward: concatenate every rank's part along `dim` (all-gather). Backward: each rank's part
    receives the sum over ranks of the gradient for it (reduce-scatter), because every rank's
    downstream computation used every part."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, sizes: Sequence[int], group, counter: CommCounter | None, kind: str):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if x.shape[dim] != sizes[rank]:
            raise RuntimeError(f"gather along dim {dim}: local part has {x.shape[dim]}, expected {sizes[rank]}")
        ctx.dim, ctx.sizes, ctx.group, ctx.counter, ctx.kind, ctx.rank = dim, list(sizes), group, counter, kind, rank
        biggest = max(sizes)
        local = _pad_to(x, dim, biggest)
        parts = [torch.empty_like(local) for _ in range(world)]
        with counter.timing(kind, x.device) if counter is not None else nullcontext():
            dist.all_gather(parts, local, group=group)
        if counter is not None:
            nbytes = local.numel() * local.element_size()
            counter.add(kind, nbytes, nbytes * (world - 1))
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        dim, sizes = ctx.dim, ctx.sizes
        biggest = max(sizes)
        chunks = [_pad_to(g, dim, biggest) for g in grad.split(sizes, dim=dim)]
        out = torch.empty_like(chunks[ctx.rank])
        with ctx.counter.timing(ctx.kind, grad.device) if ctx.counter is not None else nullcontext():
            reduce_scatter(out, chunks, ctx.group)
        if ctx.counter is not None:
            nbytes = out.numel() * out.element_size()
            ctx.counter.add(ctx.kind, nbytes * len(sizes), nbytes * (len(sizes) - 1))
        return out.narrow(dim, 0, sizes[ctx.rank]), None, None, None, None, None


def reduce_scatter(out: Tensor, chunks: list[Tensor], group) -> None:
    """dist.reduce_scatter: `out` = the sum over the group's ranks of their chunks[this rank]. The
    gloo backend (CPU runs) has it only from torch 2.8; before, each rank raises at once, without
    communicating, and the chunks (all of `out`'s shape) go laid end to end through
    reduce_scatter_tensor, which gloo had (torch 2.14 deprecates it, and reaches the first form)."""
    try:
        dist.reduce_scatter(out, chunks, group=group)
    except RuntimeError as exc:
        if "does not support reduce_scatter" not in str(exc):
            raise
        part = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        dist.reduce_scatter_tensor(part, torch.cat([c.reshape(-1) for c in chunks]), group=group)
        out.copy_(part.view(out.shape))


def gather_cat(
    x: Tensor,
    dim: int,
    group,
    sizes: Sequence[int] | None = None,
    counter: CommCounter | None = None,
    kind: str = "activation_exchange",
) -> Tensor:
    """All ranks of `group` get the concatenation of their parts along `dim`; autograd-aware."""
    world = dist.get_world_size(group)
    if sizes is None:
        sizes = [x.shape[dim]] * world
    return _GatherCat.apply(x, dim, tuple(sizes), group, counter, kind)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; gradient multiplied by `factor` on the way back."""
    return _ScaleGrad.apply(x, factor)


def gather_plain(x: Tensor, group) -> Tensor:
    """Concatenate every rank's (equal-sized) tensor along dim 0, outside autograd."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)
