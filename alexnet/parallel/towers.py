"""The paper's two-GPU split (Krizhevsky et al. 2012, section 3.2 and figure 2) as a
transformation of the single-device model.

Each rank of a pair keeps one tower's modules (conv1..conv5 halves, half of fc6's and fc7's
neurons, half of the logits) under their single-device names, and the model's `exchange` points
become an all-gather inside the pair (backward: reduce-scatter). Both ranks compute the same
logits and the same loss; the output's gradient is halved so that the reduce-scatter of the
logits sums the two copies back to one.
"""

from __future__ import annotations

from alexnet.model import EXCHANGE_POINTS, TOWERS, PaperAlexNet
from alexnet.parallel.comm import CommCounter, gather_cat, scale_grad
from alexnet.parallel.layout import Layout, Moved, State, StepSync, counted_if, gather_states, replace_module
from alexnet.parallel.mesh import Mesh

TOWER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


class TowerLayout(Layout):
    mode = "towers"

    def __init__(self, model: PaperAlexNet, mesh: Mesh) -> None:
        super().__init__(model)
        self.mesh = mesh
        self.local_names = set(model.state_dict())

    def to_local(self, full: State) -> State:
        return {k: v for k, v in full.items() if k in self.local_names}

    def to_full(self, local: State) -> State | None:
        if self.mesh.shape.model_group_index != 0:  # replicas are identical: pair 0 speaks for all
            return None
        merged: State = {}
        for part in gather_states(local, self.mesh.model_group):
            merged.update(part)
        return merged if self.mesh.shape.model_rank == 0 else None

    def after_backward(self) -> StepSync:
        # A tower is this rank's alone within its pair; the same tower in the other replicas
        # holds the same gradient (all-reduced), so pair 0 counts the towers for everyone.
        return StepSync(counted_if(self.mesh.shape.model_group_index == 0, self.model.parameters()))


def apply_towers(model: PaperAlexNet, mesh: Mesh, counter: CommCounter | None = None) -> TowerLayout:
    """Keep this rank's tower of `model` (in place) and wire its exchanges to the pair."""
    if not isinstance(model, PaperAlexNet):
        raise ValueError("parallel.mode=towers splits the paper variant's two towers; set model.variant=paper")
    mine = mesh.shape.model_rank
    other = [t for t in TOWERS if t != mine]
    # Channel/feature counts per tower at each exchange point, read before the other tower goes.
    widths = {point: None for point in EXCHANGE_POINTS}
    widths["logits"] = [model.fc8[t].out_features for t in TOWERS]  # 500 + 500, or 5 + 4 at 9 classes
    for name in TOWER_LAYERS:
        for t in other:
            replace_module(model, f"{name}.{t}", Moved(f"the rank holding tower {t}"))
    group = mesh.model_group

    def exchange(parts, point):
        (local,) = parts
        return gather_cat(local, 1, group, widths[point], counter)

    model.towers = (mine,)
    model.exchange = exchange
    # Both ranks hold the same logits and the same loss: each owns half of the output's gradient.
    model.register_forward_hook(lambda module, args, out: scale_grad(out, 1.0 / len(TOWERS)))
    return TowerLayout(model, mesh)
