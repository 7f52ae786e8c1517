"""Layers shared by both AlexNet variants.

`CounterDropout` draws its mask from a counter-based hash of (seed, step, layer, sample, feature)
instead of a stateful generator. The mask of a sample therefore does not depend on which rank
computes it, how the global batch is split, or how a layer's neurons are spread over devices:
a data-parallel, tower-split or hybrid run drops exactly the same units as one process on the
whole global batch, and a resumed run drops the same units as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values < 2**32.

    Products are taken modulo 2**64 by int64 wrap-around and then masked, so the low 32 bits are
    exact on every backend.
    """
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _mix_scalar(h: int, value: int) -> int:
    """Python-int twin of one hashing round, for the per-step constants."""
    h = (h ^ (value & _MASK32)) * 0x01000193 & _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def counter_uniform_bits(
    seed: int, step: int, stream: int, sample_ids: Tensor, num_features: int, feature_offset: int = 0
) -> Tensor:
    """32-bit hash for every (sample, feature) pair: shape [len(sample_ids), num_features]."""
    base = _mix_scalar(_mix_scalar(_mix_scalar(0x811C9DC5, seed), step), stream)
    rows = _fmix32((sample_ids.to(torch.int64) * _GOLDEN + base) & _MASK32)
    cols = torch.arange(feature_offset, feature_offset + num_features, device=sample_ids.device, dtype=torch.int64)
    return _fmix32(rows[:, None] ^ ((cols[None, :] * 0x27D4EB2F) & _MASK32))


@dataclass(frozen=True)
class DropoutContext:
    """What makes a dropout mask reproducible: the run's seed, the optimizer step, and the
    position of each row of the batch in the step's global batch."""

    seed: int
    step: int
    sample_ids: Tensor


def step_sample_rows(batch: int, data_rank: int, accum_steps: int, device: torch.device) -> list[Tensor]:
    """This data rank's rows of each of a step's `accum_steps` batches in the step's global batch
    (DropoutContext.sample_ids): the same rows as one batch accum_steps times as large."""
    first = torch.arange(batch, device=device) + data_rank * batch * accum_steps
    return [first + i * batch for i in range(accum_steps)]


class CounterDropout(nn.Module):
    """Inverted dropout (Krizhevsky et al. 2012, section 4.2) with a layout-independent mask.

    Without a context (a model used on its own) it falls back to `F.dropout`.
    """

    def __init__(self, p: float, stream: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.stream = stream
        self.context: DropoutContext | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        ctx = self.context
        if ctx is None:
            return F.dropout(x, self.p, training=True)
        if ctx.sample_ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"dropout context has {ctx.sample_ids.shape[0]} sample ids for a batch of {x.shape[0]}")
        flat = x.reshape(x.shape[0], -1)
        bits = counter_uniform_bits(ctx.seed, ctx.step, self.stream, ctx.sample_ids.to(x.device), flat.shape[1])
        keep = bits >= int(self.p * 2**32)
        return (flat * keep.to(flat.dtype) * (1.0 / (1.0 - self.p))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"


def channels_innermost(t: Tensor) -> bool:
    """Whether the channels of an NCHW-shaped tensor are its innermost axis in memory (channels_last,
    also after slicing channels)."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def _window_sum_shifted(t: Tensor, size: int, groups: int, base: float = 0.0, out: Tensor | None = None) -> Tensor:
    """`base` plus the sum over `size` neighbouring channels within each of `groups` channel groups
    (nothing past a group's edge, as in the paper's sum bounds), written to `out` if given.

    Each channel starts from `base` plus its own term, then adds its neighbours' at distance 1, 2,
    ... (the lower one first) where they lie in its group: one in-place add of two shifted views
    per neighbour, in the input's memory format (PyTorch runs each in memory order). The terms
    are added in the same order whatever `groups` is, so the towers run separately and fused as
    one grouped network get bitwise the same sums. (An earlier version added views of a
    zero-padded copy: filling and copying that copy took a third of the CPU LRN's time.)"""
    total = torch.add(t, base, out=out) if out is not None else t + base
    width = t.shape[1] // groups
    source, target = t.unflatten(1, (groups, width)), total.unflatten(1, (groups, width))
    for d in range(1, min(size // 2, width - 1) + 1):
        target.narrow(2, d, width - d).add_(source.narrow(2, 0, width - d))
        target.narrow(2, 0, width - d).add_(source.narrow(2, d, width - d))
    return total


def build_window_band(width: int, size: int, like: Tensor) -> Tensor:
    """`width` x `width` matrix of ones where |i - j| <= size // 2: multiplying a group's channels by
    it sums each channel's window, with zeros past the group's edge."""
    half = size // 2
    return torch.ones(width, width, dtype=like.dtype, device=like.device).triu_(-half).tril_(half)


def _window_sum_banded(t: Tensor, band: Tensor, groups: int) -> Tensor:
    """The window sum as one matrix product per channel group (`band` from build_window_band).

    On a GPU this is one read and one write of the tensor on the tensor cores, with the five
    terms accumulated in float32, where the shifted adds are five strided passes: the two LRN
    layers of the paper's model took about 30% of an H200's bf16 step that way."""
    width = band.shape[0]
    with torch.autocast(t.device.type, enabled=False):  # sum in t's own dtype, as the adds do
        if channels_innermost(t):
            rows = t.movedim(1, -1).unflatten(-1, (groups, width))  # [N, H, W, groups, width], a view
            return (rows @ band).flatten(-2).movedim(-1, 1)
        cols = t.unflatten(1, (groups, width)).flatten(3)  # [N, groups, width, H*W]
        return (band @ cols).reshape(t.shape)


def _window_sum(t: Tensor, size: int, groups: int, band: Tensor | None) -> Tensor:
    return _window_sum_shifted(t, size, groups) if band is None else _window_sum_banded(t, band, groups)


def _pow_neg(s: Tensor, beta: float, out: Tensor | None = None) -> Tensor:
    """s ** -beta; for the paper's beta = 0.75 as rsqrt(s * sqrt(s)), cheap vector ops instead of
    pow's exp/log (the same value to float rounding). In float16, s * sqrt(s) overflows from
    s = 65504^(2/3), about 1625 (a window of five activations of about 2000), and the output would
    be 0: there it is rsqrt(s) * sqrt(rsqrt(s)), whose parts stay in range (one temporary more)."""
    if beta != 0.75:
        return torch.pow(s, -beta, out=out)
    if s.dtype == torch.float16:
        r = torch.rsqrt(s, out=out)
        return r.mul_(r.sqrt())
    return torch.sqrt(s, out=out).mul_(s).rsqrt_()


@dataclass(frozen=True)
class LRNConstants:
    """Section 3.3's n (size), alpha, beta and k."""

    size: int
    alpha: float
    beta: float
    k: float

    @property
    def root_alpha(self) -> float:
        """sqrt(alpha): squares of x * sqrt(alpha) sum to alpha * (sum of x^2) directly, and stay
        in half precision's range for |x| up to about 11,000 (x^2 itself overflows float16 from
        |x| = 256, a five-channel window of them from about 114: activations the paper's k = 2
        and alpha = 1e-4 are meant for); _pow_neg keeps s^-beta in range there too."""
        return math.sqrt(self.alpha)


def _lrn_scale(
    x: Tensor, c: LRNConstants, groups: int, band: Tensor | None, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """s = k + alpha * (window sum of x^2), and s^-beta (into `out` if given)."""
    s_out, inv_out = out if out is not None else (None, None)
    scaled_sq = torch.mul(x, c.root_alpha).square_()  # alpha * x^2 without overflowing half precision
    if band is None:
        s = _window_sum_shifted(scaled_sq, c.size, groups, base=c.k, out=s_out)
    else:
        s = torch.add(_window_sum_banded(scaled_sq, band, groups), c.k, out=s_out)
    return s, _pow_neg(s, c.beta, out=inv_out)


def _lrn_out_of_place(x: Tensor, c: LRNConstants, groups: int, band: Tensor | None) -> Tensor:
    """x * s^-beta by _lrn_scale's operations in its order (so the same values), without its
    in-place steps and out= arguments: what a tracer recording with gradients on can take
    (torch.jit.trace recorded _LRNFunction's batch-dependent loop and could not save its Python
    call; torch.export refused out= under autograd)."""
    scaled_sq = (x * c.root_alpha).square()
    if band is None:
        width = x.shape[1] // groups
        source = scaled_sq.unflatten(1, (groups, width))
        s = source + c.k
        for d in range(1, min(c.size // 2, width - 1) + 1):  # _window_sum_shifted's adds, zero-padded
            s = s + F.pad(source.narrow(2, 0, width - d), (0, 0, 0, 0, d, 0))
            s = s + F.pad(source.narrow(2, d, width - d), (0, 0, 0, 0, 0, d))
        s = s.flatten(1, 2)
    else:
        s = _window_sum_banded(scaled_sq, band, groups) + c.k
    if c.beta != 0.75:
        return x * s.pow(-c.beta)
    if s.dtype == torch.float16:
        r = s.rsqrt()
        return x * (r * r.sqrt())
    return x * (s.sqrt() * s).rsqrt()


def _tracing() -> bool:
    """Whether torch.jit.trace or torch.export is recording (torch.compiler.is_exporting: torch 2.5+)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or (is_exporting is not None and is_exporting())


# Samples per LRN chunk on a CPU: as many as fit in about this many bytes per tensor, so a chunk's
# intermediate tensors stay in the cache between the element-wise passes instead of each pass
# streaming the whole batch through memory (the conv1 LRN input is 37 MB at batch 32). Measured
# with `python launch/microbench.py lrn-chunks [--batch 128]` on a 2-core EPYC (2 MiB of L2,
# 32 MiB of L3), forward + backward of both LRN layers, 227 px, channels_last, three runs at
# batch 32: 2 MiB 47-53 ms, the best or within 3 ms of the best of 0.5-8 MiB; the whole batch at
# once 56-86 ms. Batch 128, two runs: 2 MiB 176-193 ms, 4 MiB 159-213, whole batch 221-351.
CPU_CHUNK_BYTES = 2 << 20


def lrn_batch_chunk(x: Tensor) -> int:
    """Samples per LRN chunk: a cache-sized slice of the batch on a CPU; the whole batch on an
    accelerator (one launch per pass; on CUDA the banded window sum makes one read and one write)."""
    if x.device.type != "cpu" or x.shape[0] == 0:
        return max(x.shape[0], 1)
    return max(1, CPU_CHUNK_BYTES // max(x[0].numel() * x.element_size(), 1))


class _LRNFunction(torch.autograd.Function):
    """b = a * s^-beta with s = k + alpha * sum of a^2 over `size` neighbouring channels.

    Backward, with the window W symmetric:
        da_c = g_c s_c^-beta - 2 alpha beta a_c sum_{j in W(c)} g_j a_j s_j^(-beta-1).
    Written out with in-place steps it makes about half the memory passes of torch's
    LocalResponseNorm (avg_pool3d on squares, differentiated op by op): LRN is memory-bound.
    Both directions run over the batch `chunk` samples at a time (see lrn_batch_chunk); every
    element gets the same operations in the same order whatever the chunk, so the result does
    not depend on it."""

    @staticmethod
    def forward(ctx, x: Tensor, c: LRNConstants, groups: int, band: Tensor | None, chunk: int) -> Tensor:
        y, s, inv = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        for lo in range(0, x.shape[0], chunk):
            part = slice(lo, lo + chunk)
            _lrn_scale(x[part], c, groups, band, out=(s[part], inv[part]))
            torch.mul(x[part], inv[part], out=y[part])
        ctx.save_for_backward(x, s, inv)
        ctx.args = (c, groups, band, chunk)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, s, inv = ctx.saved_tensors
        c, groups, band, chunk = ctx.args
        grad = torch.empty_like(x)
        for lo in range(0, x.shape[0], chunk):
            part = slice(lo, lo + chunk)
            g_part, x_part, inv_part = g[part], x[part], inv[part]
            # x s^-1.75 first (at most about 15 for k = 2, alpha = 1e-4), then g: in float16 g * x
            # overflowed where the whole term is small, g * s^-beta / s underflowed, and (x / s) * g,
            # with x / s up to 35, overflowed for the upstream gradients a loss scale makes.
            around = _window_sum((x_part / s[part]).mul_(inv_part).mul_(g_part), c.size, groups, band)
            torch.mul(g_part, inv_part, out=grad[part]).addcmul_(x_part, around, value=-2 * c.alpha * c.beta)
        return grad, None, None, None, None


class LocalResponseNorm(nn.Module):
    """Section 3.3's normalization, b = a / (k + alpha * sum a^2)^beta over n neighbouring kernels,
    with alpha not divided by n (torch.nn.LocalResponseNorm divides it), within each of `groups`
    channel groups (the towers' kernels when both towers run as one grouped convolution)."""

    def __init__(self, size: int, alpha: float, beta: float, k: float) -> None:
        super().__init__()
        if size < 1 or size % 2 == 0:
            # the window is centred on its channel (and backward relies on that symmetry)
            raise ValueError(f"LRN size must be odd and at least 1, got {size}")
        self.constants = LRNConstants(size, alpha, beta, k)
        self._bands: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def window_band(self, x: Tensor, groups: int) -> Tensor | None:
        """On CUDA, the window as a matrix (see _window_sum_banded), built once per width, dtype and
        device. Elsewhere None, for the shifted adds: on a CPU they beat the product at 256
        channels (oneDNN, 6 vs 18 ms at batch 32) and keep the fused and the split towers bitwise
        equal."""
        if not x.is_cuda:
            return None
        key = (x.shape[1] // groups, x.dtype, x.device)
        if key not in self._bands:
            self._bands[key] = build_window_band(key[0], self.constants.size, x)
        return self._bands[key]

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        band = self.window_band(x, groups)
        if _tracing():
            return _lrn_out_of_place(x, self.constants, groups, band)
        if not (torch.is_grad_enabled() and x.requires_grad):
            # Inference (evaluation): the same arithmetic as _LRNFunction.forward, the whole batch
            # at once and without the tensors backward keeps; the Function only serves backward.
            return x * _lrn_scale(x, self.constants, groups, band)[1]
        return _LRNFunction.apply(x, self.constants, groups, band, lrn_batch_chunk(x))

    def extra_repr(self) -> str:
        c = self.constants
        return f"size={c.size}, alpha={c.alpha}, beta={c.beta}, k={c.k}"


def apply_dropout_context(model: nn.Module, context: DropoutContext | None) -> None:
    """Point every CounterDropout in `model` at `context` (None restores plain dropout)."""
    for module in model.modules():
        if isinstance(module, CounterDropout):
            module.context = context
