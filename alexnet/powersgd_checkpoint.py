"""PowerSGD's state in the checkpoints: one file per rank beside the run's checkpoint.

PowerSGD's error-feedback residual is each rank's own (its gradients minus what compression
sent of them), as large as the gradients it covers (244 MB per rank for ImageNet AlexNet in
fp32), so every rank writes its own `checkpoints/powersgd/rank<R>/last.pt` (atomically, as
`alexnet.checkpoint.atomic_save` writes last.pt) before rank 0 writes the checkpoint. A resume
takes them only when every rank finds its file written at the checkpoint's step by the same
layout; otherwise every rank starts PowerSGD afresh (two plain all-reduces, a zero residual,
new factors), with a warning that says why. The files beside a checkpoint are those of the last
write, so a resume from previous.pt starts afresh too.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from alexnet.checkpoint import FORMAT_VERSION, LAST, CheckpointError, atomic_save, load_checkpoint
from alexnet.parallel.agree import gather_from_ranks, rank_groups
from alexnet.parallel.data_parallel import CommHookState

log = logging.getLogger("alexnet")

FOLDER = "powersgd"


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / FOLDER / f"rank{rank}" / LAST


def save_powersgd_state(hook: CommHookState | None, ckpt_dir: Path, step: int, rank: int, setup: dict) -> None:
    """Collective where PowerSGD runs (on every rank alike): this rank's PowerSGD state at `step`.
    `setup`: what must be the same for a resume to take it (`Trainer._rank_setup`). A
    write that fails on any rank stops every rank with that rank's reason (instead of leaving the
    others waiting in the checkpoint's gather)."""
    if hook is None or hook.powersgd is None or hook.carry is None:
        return
    payload = {"format": FORMAT_VERSION, "step": step, "setup": setup, "state": hook.carry.state_dict(hook.powersgd)}
    why = ""
    try:
        atomic_save(payload, rank_file(ckpt_dir, rank).parent, rotate=False)
    except (CheckpointError, OSError) as exc:  # whatever it is, every rank must reach the gather below
        why = str(exc)
    failed = [f"rank {r}: {w}" for r, w in enumerate(gather_from_ranks(why)) if w]
    if failed:
        raise CheckpointError(f"PowerSGD's state could not be written ({'; '.join(failed)})")


def remove_stale_powersgd_state(ckpt_dir: Path, world_size: int, in_use: bool) -> None:
    """After a checkpoint is written (rank 0): the state files of ranks beyond this world (a run
    shrunk from 8 ranks to 4), or all of them where PowerSGD is off, each as large as the
    gradients (244 MB per rank at ImageNet shapes). A resume takes the files only when every rank
    finds its own at the checkpoint's step: the ranks beyond the world never can again (the
    others wrote theirs at the new step); with PowerSGD off, only a fallback to previous.pt with
    PowerSGD back on could, and without them it starts PowerSGD afresh, as any resume it cannot
    serve."""
    folder = ckpt_dir / FOLDER
    try:
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            number = entry.name.removeprefix("rank")
            if not (entry.name.startswith("rank") and number.isdigit() and entry.is_dir()):
                continue  # not a rank's state
            if not in_use or int(number) >= world_size:
                shutil.rmtree(entry, ignore_errors=True)
        if not in_use:
            with contextlib.suppress(OSError):
                folder.rmdir()  # empty unless a user keeps something there
    except OSError as exc:  # a tidy-up: the checkpoint is written, the run goes on
        log.warning("could not remove PowerSGD state files no resume can take in %s: %s", folder, exc)


def _read(
    hook: CommHookState, path: Path, step: int, setup: dict, older_amp: str | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The state in `path` if it belongs to the checkpoint of `step` under `setup` and fits
    `hook`'s model, else why not. `older_amp`: the precision the checkpoint's steps were taken
    in, for a state file written before its setup recorded one."""
    assert hook.powersgd is not None and hook.carry is not None
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        return None, str(exc)
    if payload.get("step") != step:
        return None, f"{path} is of step {payload.get('step')}, the checkpoint of step {step}"
    saved = payload.get("setup")
    if isinstance(saved, dict) and "amp" not in saved:
        saved = _older_setup(saved, setup, older_amp)
    if saved != setup:
        return None, _setup_change(saved, setup)
    problem = hook.carry.problem(hook.powersgd, payload.get("state"))
    return (None, f"{path} does not fit this model: {problem}") if problem else (payload["state"], "")


def _older_setup(saved: dict, setup: dict, older_amp: str | None) -> dict:
    """A setup written before the precision and the resolved FC group were kept, in today's
    terms: its precision is the one the checkpoint's steps were taken in (unknown: this run's),
    and its fc_group the configured one, 0 meaning a node's processes (this run resolves it, as
    that run did on the same world) and ignored outside the hybrid (today's setup says 0)."""
    older = {**saved, "amp": older_amp or setup.get("amp")}
    if saved.get("mode") != "hybrid" or saved.get("fc_group") == 0:
        older["fc_group"] = setup.get("fc_group")
    return older


def _setup_change(saved: Any, setup: dict) -> str:
    """'written under fc_group 0 and amp 'fp16'; this run has 2 and 'off'': the keys that differ,
    the same words on every rank whose setup changed (they are said once for all of them)."""
    if not isinstance(saved, dict):
        return f"its state was written under {saved!r}"
    keys = [k for k in dict.fromkeys([*saved, *setup]) if saved.get(k) != setup.get(k)]
    return (f"its state was written under {' and '.join(f'{k} {saved.get(k)!r}' for k in keys)}; this run has "
            f"{' and '.join(repr(setup.get(k)) for k in keys)}")  # fmt: skip


def _by_reason(reasons: list[str]) -> str:
    """Each rank's reason, ranks with the same one named together ("every rank" where all share it)."""
    if len(reasons) > 1 and reasons.count(reasons[0]) == len(reasons):
        return f"every rank: {reasons[0]}"
    return "; ".join(f"{ranks}: {reasons[r]}" for r, ranks in rank_groups(reasons) if reasons[r])


def restore_powersgd_state(
    hook: CommHookState | None,
    checkpoint: Path,
    step: int,
    rank: int,
    setup: dict,
    device: torch.device,
    older_amp: str | None = None,
) -> bool:
    """Collective where PowerSGD runs (on every rank alike): put back every rank's PowerSGD state
    saved beside `checkpoint` (of `step`), or none of them. Returns whether they were restored.
    `older_amp`: the precision the checkpoint's steps were taken in (see _read)."""
    if hook is None or hook.powersgd is None or hook.carry is None:
        return False
    state, why = _read(hook, rank_file(checkpoint.parent, rank), step, setup, older_amp)
    reasons = gather_from_ranks(why)
    if any(reasons):
        # The warm-start factors must be the same on every rank (each step all-reduces products
        # with them), so one rank without its state restarts every rank's.
        if rank == 0:
            log.warning("PowerSGD starts afresh (not an exact resume: two plain all-reduces, then a zero "
                        "error-feedback residual and new factors): %s", _by_reason(reasons))  # fmt: skip
        return False
    assert state is not None
    hook.carry.load_state_dict(hook.powersgd, state, device)  # `problem` found nothing it could fail on
    return True
