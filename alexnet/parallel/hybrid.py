"""Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks".

Convolutions hold 4% of AlexNet's parameters and 92% of its compute (the 2014 paper: 90-95%):
they run data-parallel on every rank (gradients all-reduced over the world). The FC layers hold
the other 96%: each rank of an FC group of K ranks keeps 1/K of the neurons of fc6, fc7 and fc8
and computes them for the K batches of its group (all-gathered conv features), so FC weights
never cross the wire inside a group; only ranks holding the same slice in different groups
all-reduce its gradient.

Every rank's loss covers its own batch. Each gather's backward is a reduce-scatter, so a slice's
gradient sums over the K batches it served; summed again over the groups and divided by the
world size it equals the single-device gradient of the mean loss over the global batch.

The paper's FC layers took one worker's batch of 128 at a time, K FC updates per convolution
update (its schemes (b)/(c)); here they take all K batches at once (its scheme (a)), one update
per step for the whole model, so that hybrid computes exactly what data parallelism does and its
checkpoints and recipes carry over to the other layouts.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet.layers import CounterDropout, DropoutContext
from alexnet.model import head_dropout, head_pieces
from alexnet.parallel.comm import CommCounter, allreduce_sent, gather_cat, gather_plain, split_sizes
from alexnet.parallel.layout import Layout, Moved, State, StepSync, counted_if, gather_states, replace_module
from alexnet.parallel.mesh import Mesh

log = logging.getLogger("alexnet")


def _full_layer(model: nn.Module, pieces: list[str]) -> tuple[Tensor, Tensor]:
    mods = [model.get_submodule(p) for p in pieces]
    return torch.cat([m.weight.detach() for m in mods]), torch.cat([m.bias.detach() for m in mods])


class SlicedHead(nn.Module):
    """This rank's slice of fc6, fc7 and fc8, computed for the whole FC group's batches."""

    def __init__(self, model: nn.Module, mesh: Mesh, counter: CommCounter | None) -> None:
        super().__init__()
        self.group = mesh.model_group
        self.slice = mesh.shape.model_rank
        self.counter = counter
        k = mesh.shape.model_size
        self.sizes: dict[str, list[int]] = {}
        for name, pieces in head_pieces(model).items():
            weight, bias = _full_layer(model, pieces)
            sizes = split_sizes(weight.shape[0], k)
            start = sum(sizes[: self.slice])
            layer = nn.Linear(weight.shape[1], sizes[self.slice], device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight[start : start + sizes[self.slice]])
                layer.bias.copy_(bias[start : start + sizes[self.slice]])
            self.add_module(name, layer)
            self.sizes[name] = sizes
        # Keyed by the FC layer whose (whole, gathered) input they drop: the model's own placement.
        self.drops = nn.ModuleDict({k: CounterDropout(d.p, d.stream) for k, d in head_dropout(model).items()})

    def _exchange(self, h: Tensor, name: str) -> Tensor:
        return gather_cat(h, 1, self.group, self.sizes[name], self.counter)

    def forward(self, z: Tensor, sample_ids: Tensor | None) -> Tensor:
        """z: the group's gathered features [K*B, F]; returns logits for all K*B rows."""
        for drop in self.drops.values():
            if drop.context is not None and sample_ids is not None:
                drop.context = DropoutContext(drop.context.seed, drop.context.step, sample_ids)
        h = self._drop("fc6", z)
        h = self._drop("fc7", self._exchange(F.relu(self.fc6(h)), "fc6"))
        h = self._drop("fc8", self._exchange(F.relu(self.fc7(h)), "fc7"))
        return self._exchange(self.fc8(h), "fc8")

    def _drop(self, layer: str, h: Tensor) -> Tensor:
        """The input of `layer`, dropped where the model drops it."""
        return self.drops[layer](h) if layer in self.drops else h

    def dropout_context(self) -> DropoutContext | None:
        return next(iter(self.drops.values())).context


class HybridAlexNet(nn.Module):
    """`trunk`: the single-device model without its FC layers; `head`: this rank's FC slice."""

    def __init__(self, model: nn.Module, mesh: Mesh, counter: CommCounter | None) -> None:
        super().__init__()
        self.head = SlicedHead(model, mesh, counter)
        for pieces in head_pieces(model).values():
            for piece in pieces:
                replace_module(model, piece, Moved("the FC slices of the hybrid layout"))
        self.trunk = model
        self.group = mesh.model_group
        self.slice = mesh.shape.model_rank
        self.counter = counter

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk.forward_features(x)
        rows = z.shape[0]
        z_all = gather_cat(z, 0, self.group, counter=self.counter)
        ids = None
        context = self.head.dropout_context()
        if self.training and context is not None:
            ids = gather_plain(context.sample_ids.to(z.device), self.group)
        logits = self.head(z_all, ids)
        return logits[self.slice * rows : (self.slice + 1) * rows]


class HybridLayout(Layout):
    mode = "hybrid"

    def __init__(
        self,
        model: HybridAlexNet,
        mesh: Mesh,
        pieces: dict[str, list[str]],
        rows: dict[str, int],
        counter: CommCounter | None,
        fc_grad_wire: torch.dtype | None = None,
    ) -> None:
        super().__init__(model)
        self.mesh = mesh
        self.pieces = pieces  # FC layer -> single-device modules holding its rows, in order
        self.piece_rows = {name: [rows[p] for p in plist] for name, plist in pieces.items()}
        self.counter = counter
        self.fc_grad_wire = fc_grad_wire  # None: float32; bf16/fp16 under parallel.comm_hook=bf16/fp16

    def to_local(self, full: State) -> State:
        local: State = {}
        head = self.model.head
        for key, value in full.items():
            if self._fc_owner(key) is None:
                local[f"trunk.{key}"] = value
        for name, plist in self.pieces.items():
            for kind in ("weight", "bias"):
                keys = [f"{p}.{kind}" for p in plist]
                if not all(k in full for k in keys):
                    continue
                whole = torch.cat([full[k] for k in keys])
                sizes = head.sizes[name]
                start = sum(sizes[: head.slice])
                local[f"head.{name}.{kind}"] = whole[start : start + sizes[head.slice]]
        return local

    def _fc_owner(self, key: str) -> str | None:
        for name, plist in self.pieces.items():
            if any(key.startswith(p + ".") for p in plist):
                return name
        return None

    def to_full(self, local: State) -> State | None:
        if self.mesh.shape.model_group_index != 0:  # FC groups are replicas: group 0 speaks for all
            return None
        parts = gather_states({k: v for k, v in local.items() if k.startswith("head.")}, self.mesh.model_group)
        if self.mesh.shape.model_rank != 0:
            return None
        full: State = {k[len("trunk.") :]: v for k, v in local.items() if k.startswith("trunk.")}
        for name, plist in self.pieces.items():
            rows = self.piece_rows[name]
            for kind in ("weight", "bias"):
                key = f"head.{name}.{kind}"
                if not all(key in p for p in parts):
                    continue
                whole = torch.cat([p[key] for p in parts])
                for piece, chunk in zip(plist, whole.split(rows)):
                    full[f"{piece}.{kind}"] = chunk
        return full

    def after_backward(self) -> StepSync:
        head_params = list(self.model.head.parameters())
        mesh, counter = self.mesh, self.counter
        # FC group 0 counts the FC slices (the other groups hold the same slices, all-reduced);
        # the convolutions are replicated over the world (DDP): global rank 0 counts them.
        first_group = mesh.shape.model_group_index == 0
        counted = counted_if(first_group, head_params)
        counted += counted_if(first_group and mesh.shape.model_rank == 0, self.model.trunk.parameters())

        wire = self.fc_grad_wire

        def sync_fc_grads() -> None:
            grads = [p.grad for p in head_params if p.grad is not None]
            if mesh.fc_replicas == 1:  # one FC group: no other rank holds these slices
                for g in grads:
                    g.div_(mesh.world_size)
                return
            flat = torch.cat([g.reshape(-1) for g in grads])
            if wire is not None:  # divided before the sum, as DDP's half-precision hooks do: it stays in range
                flat = flat.div_(mesh.world_size).to(wire)
            with counter.timing("fc_grad_allreduce", flat.device) if counter is not None else nullcontext():
                dist.all_reduce(flat, group=mesh.fc_replica_group)
            if counter is not None:
                nbytes = flat.numel() * flat.element_size()
                counter.add("fc_grad_allreduce", nbytes, allreduce_sent(nbytes, mesh.fc_replicas))
            if wire is None:
                flat.div_(mesh.world_size)
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))  # float32 again

        return StepSync(counted, sync_fc_grads)


def fc_grad_wire_dtype(comm_hook: str, mesh: Mesh) -> torch.dtype | None:
    """The dtype of the FC slices' gradient all-reduce between FC groups under parallel.comm_hook.
    That all-reduce is most of hybrid's gradient bytes (ImageNet, 2 nodes of 8: 29 MB of FC slices
    per rank against 9.3 MB of convolutions), and it crosses the same slow links between nodes
    that the hook is chosen for, so bf16/fp16 halve it as DDP's hooks halve the convolutions'.
    PowerSGD is DDP's own scheme (per bucket, with error feedback): the FC slices stay float32."""
    if comm_hook == "powersgd" and mesh.fc_replicas > 1 and mesh.shape.data_rank == 0:
        log.warning("parallel.comm_hook=powersgd compresses hybrid's convolution gradients only; "
                    "its FC slices are all-reduced between FC groups in float32")  # fmt: skip
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(comm_hook)


def apply_hybrid(
    model: nn.Module, mesh: Mesh, counter: CommCounter | None = None, fc_grad_wire: torch.dtype | None = None
) -> tuple[HybridAlexNet, HybridLayout]:
    """Split `model`'s FC layers over the FC group (the model is changed in place and becomes the
    trunk of the returned module)."""
    pieces = head_pieces(model)
    rows = {p: model.get_submodule(p).out_features for plist in pieces.values() for p in plist}
    hybrid = HybridAlexNet(model, mesh, counter)
    return hybrid, HybridLayout(hybrid, mesh, pieces, rows, counter, fc_grad_wire)
