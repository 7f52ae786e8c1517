"""One uninterrupted 2-rank run that every recovery test compares its final weights with.

The recovery tests (SIGKILL under torchrun --max-restarts, Slurm preemption and requeue, the
Slurm jobs on one and two nodes) all train RECIPE for 14 steps with 2 data-parallel ranks; only
keys that do not change the weights (checkpoint interval, logging, run folder) differ. The run is
made once per pytest session and cached in its base temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _helpers import TINY_TRAIN, TRAIN, check, launch

# 120 training images, 2 ranks of batch 8: 7 steps per epoch, 14 in all.
RECIPE = [*TINY_TRAIN, "train.epochs=2", "train.log_every=1"]
TOTAL_STEPS = 14


def reference_run(base_temp: Path, tiny_data: Path) -> Path:
    """The uninterrupted run's folder (made on first use): checkpoints/last.pt at the end and
    checkpoints/previous.pt at the end of epoch 1."""
    run = base_temp / "reference-run" / "ref"
    if not (run / "checkpoints" / "last.pt").exists():
        check(launch([TRAIN, *RECIPE, f"data.root={tiny_data}", f"run.root={run.parent}", "run.name=ref"]))
    return run


def reference_weights(base_temp: Path, tiny_data: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(reference_run(base_temp, tiny_data) / "checkpoints" / "last.pt", weights_only=True)
    assert payload["progress"]["step"] == TOTAL_STEPS
    return payload["model"]


def assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of every tensor of the checkpoint at `path` with the reference."""
    model = torch.load(path, weights_only=True)["model"]
    assert set(model) == set(reference)
    differ = [name for name in reference if not torch.equal(model[name], reference[name])]
    assert not differ, f"{path}: weights differ from the uninterrupted run in {differ[:5]}"
