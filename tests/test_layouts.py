"""towers and hybrid compute the single-device function: logits, loss, gradients, trajectories;
their byte counters match the arithmetic of what they exchange."""

import json
import math
import sys

import pytest
from _helpers import REPO, launch_per_world

from alexnet.model import build_model
from alexnet.parallel.mesh import LayoutError, plan_mesh

sys.path.insert(0, str(REPO / "tests" / "dist"))
import layout_check as lc  # noqa: E402

pytestmark = pytest.mark.slow
# (mode, world, fc_group, memory format): every layout once in NCHW, and the two exchange-heavy
# ones in channels_last, the trainer's default.
CASES = [
    ("towers", 2, 0, "cl"),
    ("towers", 4, 0, "nchw"),
    ("hybrid", 2, 0, "nchw"),
    ("hybrid", 4, 0, "cl"),
    ("hybrid", 4, 2, "nchw"),
]
TORCHVISION_CASE = ("hybrid", 2, 0, "nchw", "torchvision")
# Checks of other scripts (layout_check.OTHER_CHECKS) by world size, run in the launch of the
# layouts' cases of that size: a launch's start took longer than each of them.
OTHER_CHECKS = {2: ["gloo_reduce_scatter"], 4: ["hybrid_hook"]}
SCRIPT = REPO / "tests" / "dist" / "layout_check.py"


def case_name(mode: str, world: int, fc_group: int, fmt: str, variant: str = "paper") -> str:
    """layout_check.py's name of a case given as a CASES tuple (the world size is the launch's)."""
    return f"{mode}:{fc_group}:{fmt}:{variant}"


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory):
    """The ranks' results of a case (or of an OTHER_CHECKS name); the cases of a world size share
    one launch."""
    cases = {world: list(names) for world, names in OTHER_CHECKS.items()}
    for case in (*CASES, TORCHVISION_CASE):
        cases.setdefault(case[1], []).append(case_name(*case))
    launches = launch_per_world(tmp_path_factory, SCRIPT, cases)

    def results(world: int, case: str) -> list[dict]:
        return [json.loads((launches(world) / case / f"rank{r}.json").read_text()) for r in range(world)]

    return results


def expected_bytes(mode: str, world: int, fc_group: int, rank: int) -> tuple[dict, dict]:
    """Per-rank bytes of one step, from the shapes alone (fp32). Conv2's pooled map is 5x5 and
    pool5 2x2 at 99 pixels."""
    b, f32, width = lc.PER_REPLICA, 4, lc.FC_WIDTH
    model = build_model("paper", lc.CLASSES, input_size=lc.SIZE, fc_width=width)
    conv = sum(p.numel() for n, p in model.named_parameters() if n.startswith("conv"))
    payload, sent = {}, {}
    if mode == "towers":
        tower = rank % 2
        parts = b * (128 * 5 * 5 + 128 * 2 * 2 + width // 2 + width // 2 + math.ceil(lc.CLASSES / 2)) * f32
        payload["activation_exchange"] = parts + 2 * parts  # all-gather own part, reduce-scatter the whole
        sent["activation_exchange"] = 2 * parts  # to the one peer, each way
        replicas = world // 2
        if replicas > 1:
            grads = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[1] == str(tower)) * f32
            payload["grad_allreduce"] = grads
            sent["grad_allreduce"] = 2 * grads * (replicas - 1) // replicas
        return payload, sent
    k = fc_group or world
    # features, fc6, fc7, logits; an all-gather pads each slice to the largest
    parts = (b * 1024 + 2 * k * b * math.ceil(width / k) + k * b * math.ceil(lc.CLASSES / k)) * f32
    payload["activation_exchange"] = parts * (1 + k)
    sent["activation_exchange"] = 2 * parts * (k - 1)
    payload["grad_allreduce"] = conv * f32
    sent["grad_allreduce"] = 2 * conv * f32 * (world - 1) // world
    groups = world // k
    if groups > 1:
        s = rank % k
        rows = {
            name: [n // k + (1 if i < n % k else 0) for i in range(k)][s]
            for name, n in (("fc6", width), ("fc7", width), ("fc8", lc.CLASSES))
        }
        slice_params = rows["fc6"] * (1024 + 1) + rows["fc7"] * (width + 1) + rows["fc8"] * (width + 1)
        payload["fc_grad_allreduce"] = slice_params * f32
        sent["fc_grad_allreduce"] = 2 * slice_params * f32 * (groups - 1) // groups
    return payload, sent


@pytest.mark.parametrize(("mode", "world", "fc_group", "fmt"), CASES)
def test_layout_computes_the_single_device_function(layout_results, mode, world, fc_group, fmt):
    results = layout_results(world, case_name(mode, world, fc_group, fmt))
    for r in results:
        # float32, one step: the only differences are summation orders (~1e-7 relative).
        assert r["logits"] <= 1e-5 * r["logit_scale"], r["rank"]
        assert r["loss"] <= 1e-5
        assert max(r["grads"].values()) <= 1e-5 * r["grad_scale"], r["rank"]
        # float64, 5 steps with dropout: the same trajectory.
        assert r["weights_moved"] > 1e-3  # the steps did change the weights
        assert r["weights_after_steps"] <= 1e-10, r["rank"]
        # The same steps as accumulated one-row batches (train.accum_steps=2): the same weights,
        # and one step's bytes (one gradient all-reduce: DDP's deferred by no_sync, the FC slices'
        # once per step), the activations sent row by row; in float64, twice float32's bytes.
        assert r["weights_after_accumulated_steps"] <= 1e-10, r["rank"]
        payload, sent = expected_bytes(mode, world, fc_group, r["rank"])
        assert r["accumulated_payload"] == {k: 2 * v for k, v in payload.items()}, r["rank"]
        # DDP (the hybrid's convolutions, towers of 2 replicas) accumulates in its buckets.
        assert r["in_buckets"] is (None if (mode, world) == ("towers", 2) else True), r["rank"]
        assert r["payload"] == payload, r["rank"]
        assert r["sent"] == sent, r["rank"]
    owner = results[0]
    assert owner["full_state_keys_match"] and owner["full_state_diff"] <= 1e-10
    if mode == "towers":  # each rank holds exactly its own tower
        assert all(n.split(".")[1] == str(r["rank"] % 2) for r in results for n in r["local_names"])


def test_hybrid_splits_the_torchvision_variant_as_one_device_computes_it(layout_results):
    """The hybrid head drops where each variant drops (torchvision: the inputs of fc6 and fc7;
    the paper model: the outputs of fc6 and fc7, the case above): one step and five float64
    steps with dropout, against the single-device torchvision variant."""
    for rank, r in enumerate(layout_results(2, case_name(*TORCHVISION_CASE))):
        assert r["logits"] <= 1e-5 * r["logit_scale"] and max(r["grads"].values()) <= 1e-5 * r["grad_scale"]
        assert r["weights_moved"] > 1e-3 and r["weights_after_steps"] <= 1e-10, rank
        assert any(name.startswith("trunk.features.") for name in r["local_names"])  # the torchvision trunk


def test_hybrid_fc_slices_go_over_the_wire_in_the_comm_hooks_half_precision(layout_results):
    """4 ranks in 2 FC groups: each FC slice is all-reduced between the groups. Under
    comm_hook=bf16/fp16 that all-reduce hands over half the bytes (it sent float32 whatever the
    hook) and the gradients stay within half precision's rounding; powersgd, which is DDP's own
    scheme, leaves it float32 and says so once (tests/dist/hybrid_hook.py)."""
    for rank, r in enumerate(layout_results(4, "hybrid_hook")):
        fp32 = r["none"]["payload"]["fc_grad_allreduce"]
        assert fp32 > 0 and r["powersgd"]["payload"]["fc_grad_allreduce"] == fp32
        for hook, eps in (("bf16", 2**-8), ("fp16", 2**-11)):
            assert r[hook]["payload"]["fc_grad_allreduce"] * 2 == fp32, (rank, hook)
            assert r[hook]["payload"]["grad_allreduce"] * 2 == r["none"]["payload"]["grad_allreduce"]  # DDP's
            assert 0 < r[hook]["fc_grad_diff"] <= 2 * eps * r[hook]["fc_grad_scale"], (rank, hook, r[hook])
        assert r["none"]["fc_grad_diff"] == 0 and r["none"]["warnings"] == r["bf16"]["warnings"] == []
        expected = ["parallel.comm_hook=powersgd compresses hybrid's convolution gradients only; its FC slices "
                    "are all-reduced between FC groups in float32"] if rank == 0 else []  # fmt: skip
        assert r["powersgd"]["warnings"] == expected, rank


def test_reduce_scatter_where_gloo_lacks_it_gives_the_same_sums(layout_results):
    """gloo has dist.reduce_scatter only from torch 2.8 (setup.cfg admits 2.6): towers and hybrid
    stopped at their first backward on the CPU ("ProcessGroupGloo does not support
    reduce_scatter"). Here that error is raised on purpose and the fallback's sums are compared
    (on torch 2.8 and later; before, both are the fallback's, and the layout tests above check it)
    (tests/dist/gloo_reduce_scatter.py)."""
    results = layout_results(2, "gloo_reduce_scatter")
    assert all(r["equal"] and r["norm"] > 0 for r in results), results


def test_world_sizes_a_layout_cannot_use_show_the_arithmetic():
    with pytest.raises(LayoutError, match=r"towers .* 3 ranks: 3 = 1 x 2 \+ 1"):
        plan_mesh("towers", 0, 3, 3)
    with pytest.raises(LayoutError, match=r"each node runs 3 processes: 3 = 1 x 2 \+ 1"):
        plan_mesh("towers", 0, 6, 3)
    with pytest.raises(LayoutError, match=r"fc_group=4 .* 6 ranks: 6 = 1 x 4 \+ 2"):
        plan_mesh("hybrid", 0, 6, 6, fc_group=4)
    with pytest.raises(LayoutError, match=r"hybrid splits the FC layers over several ranks, but the world has 1 rank"):
        plan_mesh("hybrid", 0, 1, 1)  # its FC collectives need a group: it crashed at the first step
    with pytest.raises(LayoutError, match=r"the world has 1 rank: 1 = 0 x 2 \+ 1"):  # not "1 ranks"
        plan_mesh("towers", 0, 1, 1)
    shape = plan_mesh("towers", 5, 8, 8)
    assert (shape.data_rank, shape.data_size, shape.model_rank) == (2, 4, 1)
    shape = plan_mesh("hybrid", 5, 8, 4)  # two nodes of 4: FC group = the node
    assert (shape.data_rank, shape.data_size, shape.model_rank, shape.model_size) == (5, 8, 1, 4)


def test_settings_the_layout_has_no_use_for_are_named(caplog):
    """fc_group outside hybrid, and a comm hook with one replica (towers on 2 ranks, one process),
    ran without a word; a hook with replicas to average over and fc_group in hybrid say nothing."""
    from alexnet.config import ParallelConfig
    from alexnet.parallel.apply import warn_of_unused_settings
    from alexnet.parallel.mesh import Mesh

    towers = Mesh(plan_mesh("towers", 0, 2, 2), grad_group_size=1, world_size=2)
    with caplog.at_level("WARNING", logger="alexnet"):
        warn_of_unused_settings(ParallelConfig(mode="towers", fc_group=7, comm_hook="powersgd"), towers)
    assert "parallel.fc_group=7 applies to parallel.mode=hybrid only: ignored in towers" in caplog.text
    assert "parallel.comm_hook=powersgd has no gradient all-reduce to compress (one replica: towers on 2" in caplog.text
    caplog.clear()
    hybrid = Mesh(plan_mesh("hybrid", 0, 4, 4, 2), grad_group_size=4, world_size=4)
    with caplog.at_level("WARNING", logger="alexnet"):
        warn_of_unused_settings(ParallelConfig(mode="hybrid", fc_group=2, comm_hook="bf16"), hybrid)
    assert caplog.text == ""
