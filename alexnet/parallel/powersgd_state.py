"""PowerSGD's per-rank state, kept by parameter name so that it survives DDP's bucket changes and
a resume.

torch's PowerSGD hook keys its state by DDP bucket index: each bucket's error-feedback residual
(a flat copy of the bucket) and its warm-start Q factors (the compressed matrices' Qs, flat, in
the hook's own order). Bucket layouts change: DDP puts every parameter into one bucket for a
fresh wrapper's first step and rebuilds its buckets by gradient order after it (the trainer
settles them before its first step, `settle_buckets`, but a wrapper without that pass does
not), and a resume may set another `parallel.bucket_cap_mb`. `PowerSGDCarry` holds the state
by parameter between layouts, so it fits any of them: it cuts each bucket's tensors into
per-parameter pieces when the layout changes (or to save them), and assembles a bucket's tensors
from the pieces the first time that bucket is seen. Within one layout it only compares names.
The pieces are in the gradients' memory order (NHWC for channels_last weights): a resume under
another `train.channels_last` does not take them (`alexnet/powersgd_checkpoint.py`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

Pieces = dict[str, Tensor]  # parameter name -> its flat piece of a bucket's tensor


def factor_sizes(ps: PowerSGDState, shape: torch.Size) -> tuple[int, int] | None:
    """The lengths of the P and Q factors PowerSGD compresses a gradient of `shape` (an n x m
    matrix) to, n x rank and m x rank; None where it all-reduces the gradient whole (vectors,
    and matrices that the factors would not make smaller): torch's own test."""
    if len(shape) < 2:
        return None
    n = shape[0]
    m = shape.numel() // n
    rank = min(n, m, ps.matrix_approximation_rank)
    return (n * rank, m * rank) if (n + m) * rank * ps.min_compression_rate < n * m else None


def compression_problem(ps: PowerSGDState, shapes: list[torch.Size]) -> str:
    """Why PowerSGD would send every one of these gradients whole ("" when it compresses one, or
    none is a matrix): a `parallel.powersgd_rank` so high that no matrix's factors are smaller."""
    matrices = [shape for shape in shapes if len(shape) >= 2]
    if not matrices or any(factor_sizes(ps, shape) for shape in matrices):
        return ""
    return (
        f"parallel.powersgd_rank={ps.matrix_approximation_rank} compresses none of the gradients: PowerSGD sends a "
        f"matrix whole unless its factors are {ps.min_compression_rate:g}x smaller, so every step sends what "
        "parallel.comm_hook=none sends (the default rank is 4)"
    )


def q_order(ps: PowerSGDState, names: tuple[str, ...], shapes: dict[str, torch.Size]) -> list[tuple[str, int, int]]:
    """(name, Q length, P length) of a bucket's compressed gradients in the order the hook lays
    its Q and P memories out: grouped by matrix shape, in the order each shape first appears."""
    by_shape: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    for name in names:
        shape = shapes[name]
        sizes = factor_sizes(ps, shape)
        if sizes is not None:
            p, q = sizes
            by_shape[(shape[0], shape.numel() // shape[0])].append((name, q, p))
    return [entry for group in by_shape.values() for entry in group]


def _cut(flat: Tensor, lengths: list[tuple[str, int]]) -> Pieces:
    if flat.numel() != sum(n for _, n in lengths):
        raise RuntimeError(f"PowerSGD state of {flat.numel()} values does not fit its bucket's {lengths}")
    return dict(zip((name for name, _ in lengths), flat.split([n for _, n in lengths])))


def _rng_state(saved: dict) -> tuple:
    """numpy's RandomState.get_state() tuple from its saved form (`PowerSGDCarry.state_dict`)."""
    keys = saved["keys"].numpy().astype(np.uint32)
    return saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]


@dataclass
class PowerSGDCarry:
    """What `ps` holds, by parameter name, across bucket layouts (see the module's docstring)."""

    names: dict[int, str]  # id(parameter) -> its name in the wrapped module
    shapes: dict[str, torch.Size]
    layout: dict[int, tuple[str, ...]] = field(default_factory=dict)  # bucket index -> its parameters
    error: Pieces = field(default_factory=dict)  # pieces not yet assembled into a bucket
    q: Pieces = field(default_factory=dict)
    # Whether the hook has made its factor memories since the state began: a bucket without a
    # compressed matrix then gets an empty one back, else the hook would take it for a new
    # bucket and draw from PowerSGD's generator again (moving it, unlike an uninterrupted run).
    warm: bool = False

    @classmethod
    def for_module(cls, module: torch.nn.Module) -> PowerSGDCarry:
        params = list(module.named_parameters())
        return cls({id(p): n for n, p in params}, {n: p.shape for n, p in params})

    def fit(self, ps: PowerSGDState, bucket: dist.GradBucket) -> None:
        """Before the hook sees `bucket`: where its index or parameters belong to another
        layout's bucket, cut the whole state into pieces; then build this bucket's entries
        from the pieces."""
        index = bucket.index()
        names = tuple(self.names[id(p)] for p in bucket.parameters())
        if self.layout.get(index) == names:
            return
        if index in self.layout or any(n in taken for taken in self.layout.values() for n in names):
            self._cut_all(ps)  # another layout; a new bucket index alone is one more of this one
        self.layout[index] = names
        self._assemble(ps, index, names, bucket.buffer())

    def forget(self, ps: PowerSGDState) -> None:
        ps.error_dict.clear()
        ps.p_memory_dict.clear()
        ps.q_memory_dict.clear()
        self.layout.clear()
        self.error.clear()
        self.q.clear()
        self.warm = False

    def _cut_all(self, ps: PowerSGDState) -> None:
        """Move every bucket's state into the pieces (a layout change: the first bucket seen
        with other parameters starts it; the buckets before it kept theirs and are cut too)."""
        if self.layout:  # else the state is in the pieces already
            self.warm = bool(ps.p_memory_dict)
        for index, names in self.layout.items():
            if index in ps.error_dict:
                self.error.update(_cut(ps.error_dict[index], [(n, self.shapes[n].numel()) for n in names]))
            if index in ps.q_memory_dict:
                self.q.update(_cut(ps.q_memory_dict[index], [(n, q) for n, q, _ in q_order(ps, names, self.shapes)]))
        ps.error_dict.clear()
        ps.p_memory_dict.clear()
        ps.q_memory_dict.clear()
        self.layout.clear()

    def _assemble(self, ps: PowerSGDState, index: int, names: tuple[str, ...], buffer: Tensor) -> None:
        """A bucket's residual where every one of its parameters has a piece (else the hook starts
        it at zero), and its Qs where every compressed one has (else the hook draws new ones)."""
        if names and all(n in self.error for n in names):
            ps.error_dict[index] = torch.cat([self.error.pop(n) for n in names])
        order = q_order(ps, names, self.shapes)
        if not order and self.warm:  # nothing to compress here, but the hook has seen the bucket
            ps.q_memory_dict[index] = buffer.new_empty(0)
            ps.p_memory_dict[index] = buffer.new_empty(0)
        elif order and all(n in self.q for n, _, _ in order):
            q = torch.cat([self.q.pop(n) for n, _, _ in order])
            ps.q_memory_dict[index] = q
            ps.p_memory_dict[index] = q.new_empty(sum(p for _, _, p in order))  # the hook overwrites P

    def state_dict(self, ps: PowerSGDState) -> dict:
        """The state by parameter name, on the CPU (`weights_only`-loadable: no numpy objects)."""
        self._cut_all(ps)  # the next hook call assembles each bucket again
        kind, keys, pos, has_gauss, cached = ps.rng.get_state()
        rng = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
        return {
            "iter": int(ps.iter),
            "rng": rng,
            "warm": self.warm,
            "error": {n: t.detach().cpu().clone() for n, t in self.error.items()},
            "q": {n: t.detach().cpu().clone() for n, t in self.q.items()},
        }

    def problem(self, ps: PowerSGDState, state: Any) -> str:
        """Why `state` (from `state_dict`) cannot be loaded into this model's PowerSGD, or "":
        checked before any rank loads, so that no rank fails alone after the others went on."""
        try:
            int(state["iter"]), bool(state["warm"])
            rng = state["rng"]
            np.random.RandomState().set_state(_rng_state(rng))
            bad = [f"residual of {n}: {t.numel()} values, not {self.shapes[n].numel()}"
                   for n, t in state["error"].items() if t.numel() != self.shapes[n].numel()]  # fmt: skip
            for n, t in state["q"].items():
                sizes = factor_sizes(ps, self.shapes[n])
                if sizes is None:
                    bad.append(f"a Q factor of {n}, which PowerSGD does not compress")
                elif t.numel() != sizes[1]:
                    bad.append(f"Q factor of {n}: {t.numel()} values, not {sizes[1]}")
        except KeyError as exc:
            return f"no {exc} in it, or a parameter this model does not have"
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            return f"a malformed state ({type(exc).__name__}: {exc})"
        return "; ".join(bad[:3])

    def load_state_dict(self, ps: PowerSGDState, state: dict, device: torch.device) -> None:
        """`state` from `state_dict`, checked with `problem`."""
        self.forget(ps)
        ps.iter = int(state["iter"])
        ps.rng.set_state(_rng_state(state["rng"]))
        self.warm = bool(state["warm"])
        self.error = {n: t.to(device) for n, t in state["error"].items()}
        self.q = {n: t.to(device) for n, t in state["q"].items()}
