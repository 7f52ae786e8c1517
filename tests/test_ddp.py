"""DDP over 2 gloo ranks computes the same step as one process on the concatenated batch, also
under torch's distributed debug mode."""

import sys

import pytest
import torch
import torch.distributed as dist
from _helpers import REPO, check, launch

from alexnet.parallel.env import GLOO_DETAIL_NOTE, apply_debug_level

sys.path.insert(0, str(REPO / "tests" / "dist"))
import ddp_step  # noqa: E402


@pytest.mark.parametrize("debug", ["OFF", "DETAIL"])
def test_two_rank_step_equals_single_process_step(tmp_path, debug):
    """TORCH_DISTRIBUTED_DEBUG=DETAIL, what torch's documentation suggests for a hang, made every
    DDP construction on gloo die of SIGSEGV (torch 2.14.1): the ranks now run it as INFO, and say so."""
    out = tmp_path / "ddp.pt"
    proc = launch([REPO / "tests" / "dist" / "ddp_step.py", out], nproc=2, env={"TORCH_DISTRIBUTED_DEBUG": debug})
    check(proc)
    assert (GLOO_DETAIL_NOTE in proc.stderr) == (debug == "DETAIL")
    ddp_weights = torch.load(out, weights_only=True)

    model = ddp_step.fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = ddp_step.global_batch(world=2)
    ddp_step.one_step(model, images, labels, torch.arange(len(labels)))
    single = model.state_dict()

    changed = 0
    for name, value in single.items():
        # float32 sums in another order: 1e-6 relative plus a tiny absolute floor
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-5, atol=1e-7, msg=name)
        changed += int(not torch.equal(value, before[name]))
    assert changed == len(single)  # every parameter moved, so the comparison means something


@pytest.mark.parametrize(("backend", "after"), [("gloo", dist.DebugLevel.INFO), ("nccl", dist.DebugLevel.DETAIL)])
def test_detail_is_lowered_on_gloo_only(caplog, backend, after):
    """NCCL's DDP takes another branch of the code that crashes on gloo, and keeps DETAIL's
    collective checks; rank 0 alone says what it changed."""
    level = dist.get_debug_level()
    try:
        for rank in (1, 0):
            dist.set_debug_level(dist.DebugLevel.DETAIL)
            apply_debug_level(backend, rank)
            assert dist.get_debug_level() == after
    finally:
        dist.set_debug_level(level)
    notes = [r for r in caplog.records if r.getMessage() == GLOO_DETAIL_NOTE]
    assert len(notes) == (backend == "gloo")
