"""Where a rank sits in the layout: its data-parallel coordinate and the process groups it uses.

Data is indexed by the data-parallel coordinate, never by LOCAL_RANK: on two nodes, local rank 0
exists twice and would read the same shard twice.

* dp: every rank is a whole replica; gradients are all-reduced over the world.
* towers: ranks (2d, 2d+1) form replica d, one tower each (the paper's two-GPU split); the tower
  is the innermost axis so that a pair shares a node's fast link. Each tower's gradients are
  all-reduced with the same tower of the other replicas.
* hybrid (Krizhevsky 2014): every rank reads its own data and holds all conv layers (all-reduced
  over the world); K consecutive ranks (an FC group) share the FC layers, 1/K of the neurons
  each, and the ranks holding the same slice in different groups all-reduce it.
"""

from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass

import torch.distributed as dist

from alexnet.model import TOWERS
from alexnet.parallel.agree import gather_from_ranks, ranks_text, share_setup_failure
from alexnet.parallel.env import DistEnv

TOWER_DEGREE = len(TOWERS)  # a replica's ranks under parallel.mode=towers: one per tower (section 3.2)


class LayoutError(ValueError):
    """The world size does not fit the chosen layout; the message shows the arithmetic."""


@dataclass(frozen=True)
class MeshShape:
    """The arithmetic of a layout, checked before any process group exists."""

    mode: str
    data_rank: int
    data_size: int
    model_rank: int  # tower index (towers) or FC slice index (hybrid); 0 for dp
    model_size: int  # ranks sharing one model: 2 (towers), K (hybrid), 1 (dp)
    model_group_index: int  # which pair / FC group this rank belongs to


@dataclass(frozen=True)
class Mesh:
    shape: MeshShape
    # Ranks whose (correct, count) sums make up the whole dataset exactly once; None = the world.
    metric_group: dist.ProcessGroup | None = None
    # Gradient all-reduce group of this rank's DDP-managed parameters; None = the world.
    grad_group: dist.ProcessGroup | None = None
    grad_group_size: int = 1
    # Pair (towers) or FC group (hybrid): where activations are exchanged.
    model_group: dist.ProcessGroup | None = None
    # hybrid: the ranks that hold the same FC slice in other groups.
    fc_replica_group: dist.ProcessGroup | None = None
    fc_replicas: int = 1
    world_size: int = 1

    @property
    def mode(self) -> str:
        return self.shape.mode

    @property
    def data_rank(self) -> int:
        return self.shape.data_rank

    @property
    def data_size(self) -> int:
        return self.shape.data_size

    def describe(self) -> str:
        s = self.shape
        if s.mode == "towers":
            return f"towers: replica {s.data_rank} of {s.data_size}, tower {s.model_rank}"
        if s.mode == "hybrid":
            return f"hybrid: data shard {s.data_rank} of {s.data_size}, FC slice {s.model_rank} of {s.model_size}"
        return f"dp: data shard {s.data_rank} of {s.data_size}"


def plan_mesh(mode: str, rank: int, world: int, local_world: int, fc_group: int = 0) -> MeshShape:
    """Check that `world` ranks fit `mode` and place `rank`; errors show the arithmetic."""
    if mode == "dp":
        return MeshShape(mode, rank, world, 0, 1, rank)
    if mode == "towers":
        if world % TOWER_DEGREE:
            raise LayoutError(
                f"parallel.mode=towers splits every replica over {TOWER_DEGREE} ranks, but the world has {world} "
                f"rank{'s' if world != 1 else ''}: "
                f"{world} = {world // TOWER_DEGREE} x {TOWER_DEGREE} + {world % TOWER_DEGREE}; "
                f"use an even number of processes"
            )
        if local_world % TOWER_DEGREE:
            raise LayoutError(
                f"parallel.mode=towers keeps both towers of a replica on one node, but each node runs {local_world} "
                f"processes: {local_world} = {local_world // TOWER_DEGREE} x {TOWER_DEGREE} + "
                f"{local_world % TOWER_DEGREE}; use an even --nproc_per_node"
            )
        return MeshShape(
            mode, rank // TOWER_DEGREE, world // TOWER_DEGREE, rank % TOWER_DEGREE, TOWER_DEGREE, rank // TOWER_DEGREE
        )
    if mode == "hybrid":
        if world == 1:  # its FC slices exchange activations with collectives over at least 2 ranks
            raise LayoutError(
                "parallel.mode=hybrid splits the FC layers over several ranks, but the world has 1 rank; "
                "with one process use parallel.mode=dp (the same computation)"
            )
        k = fc_group or local_world
        if k < 1 or world % k:
            raise LayoutError(
                f"parallel.mode=hybrid shares the FC layers among parallel.fc_group={k} ranks, but the world has "
                f"{world} ranks: {world} = {world // max(k, 1)} x {k} + {world % max(k, 1)}; choose fc_group "
                f"dividing {world} (default: the processes of one node)"
            )
        return MeshShape(mode, rank, world, rank % k, k, rank // k)
    raise LayoutError(f"parallel.mode must be dp, towers or hybrid; got {mode!r}")


def _new_groups(member_lists: list[list[int]], env: DistEnv) -> dist.ProcessGroup | None:
    """Every rank creates every group (a collective requirement) and keeps the one it is in. The
    groups get parallel.timeout_s, as the world has: a dead or frozen peer of a towers pair or an
    FC group otherwise held the other rank for torch's 30-minute default."""
    mine = None
    for members in member_lists:
        group = dist.new_group(members, timeout=datetime.timedelta(seconds=env.timeout_s))
        if env.rank in members:
            mine = group
    return mine


def agreed_shape(env: DistEnv, mode: str, fc_group: int = 0) -> MeshShape:
    """plan_mesh on every rank, agreed on before any process group is made. Each rank plans from
    its own node's process count: where the nodes run different numbers, a rank whose arithmetic
    failed stopped alone while the others waited in new_group for 30 minutes, and ranks that all
    passed could plan FC groups of different sizes. Only the hybrid's default groups (a node's
    processes) depend on that count, so the counts are compared for it first; towers pairs and
    an explicit fc_group are the same size on every rank."""
    if env.distributed and mode == "hybrid" and not fc_group:
        # Each node's own count is its FC group size: said first, as the cause, where one rank's
        # arithmetic would fail ("fc_group=2 ... the world has 3 ranks", of a key never set).
        counts = gather_from_ranks(env.local_world_size)
        if len(set(counts)) > 1:
            found = "; ".join(f"{n} per node for {ranks_text(counts, n)}" for n in sorted(set(counts)))
            raise LayoutError(
                "parallel.mode=hybrid shares the FC layers among the processes of a node (parallel.fc_group=0), "
                f"but the nodes run different numbers of processes ({found}); run the same --nproc_per_node on "
                "every node, or set parallel.fc_group"
            )
    try:
        shape, failure = plan_mesh(mode, env.rank, env.world_size, env.local_world_size, fc_group), None
    except LayoutError as exc:
        shape, failure = None, exc
    share_setup_failure(failure, (LayoutError,))
    assert shape is not None  # else that raised
    return shape


def release_mesh(mesh: Mesh, env: DistEnv) -> None:
    """Destroy the groups build_mesh made, where the world group outlives the run (one its caller
    started: shutdown_distributed destroys every group with the world's): a worker that trains
    many times kept two more gloo or NCCL groups per run."""
    if env.owns_group or not env.distributed:
        return
    groups = (mesh.metric_group, mesh.grad_group, mesh.model_group, mesh.fc_replica_group)
    gc.collect()  # the DDP wrappers that use them first (as shutdown_distributed does)
    for group in {id(g): g for g in groups if g is not None}.values():
        dist.destroy_process_group(group)


def build_mesh(env: DistEnv, mode: str, fc_group: int = 0) -> Mesh:
    shape = agreed_shape(env, mode, fc_group)
    world = env.world_size
    if mode == "dp" or not env.distributed:
        return Mesh(shape, grad_group_size=world, world_size=world)
    k = shape.model_size
    model_groups = [list(range(g * k, (g + 1) * k)) for g in range(world // k)]
    slice_groups = [list(range(s, world, k)) for s in range(k)]
    model_group = _new_groups(model_groups, env)
    across = _new_groups(slice_groups, env)
    if mode == "towers":
        # Each tower all-reduces with the same tower of the other replicas; the same groups
        # hold one rank per data shard, so they also count every sample once.
        return Mesh(
            shape,
            metric_group=across,
            grad_group=across,
            grad_group_size=world // k,
            model_group=model_group,
            world_size=world,
        )
    return Mesh(
        shape,
        grad_group=None,
        grad_group_size=world,
        model_group=model_group,
        fc_replica_group=across,
        fc_replicas=world // k,
        world_size=world,
    )
