"""What a checkpoint holds for a training run, and how a run is put back where it stopped.

The model and the momentum go through the layout (single-device names in the file, this rank's
part in memory); every data rank's loader position is gathered, so the loaders resume exactly
when the number of data shards is unchanged. Under another number (or batch), the interrupted
epoch's position is converted by the samples it consumed, later epochs are whole, and the learning
rate follows the epoch progress, not the global step.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
import torch.distributed as dist
from torch import nn

from alexnet.checkpoint import (
    FORMAT_VERSION,
    LAST,
    PREVIOUS,
    CheckpointError,
    CheckpointUnusableHere,
    checkpoint_in,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    optimizer_hyperparams,
    optimizer_momentum,
    same_file,
)
from alexnet.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    ModelConfig,
    ScheduleConfig,
    config_to_dict,
    existing_file,
    naming_key,
)
from alexnet.engine import AmpPolicy
from alexnet.optim import LrSchedule, scaled_lr
from alexnet.parallel.layout import Layout, is_first_rank
from alexnet.parallel.mesh import Mesh
from alexnet.weights import recorded_weights
from pipelines.base import EpochLayout, Loader, convert_position, train_steps
from pipelines.index import DataError, some_names
from pipelines.steps import accum_steps_of, describe_step_batch

log = logging.getLogger("alexnet")


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    # The steps of epoch `epoch` are all taken and only its validation is left: a stop during that
    # validation checkpoints here, and the resumed run validates the epoch without training it.
    epoch_trained: bool = False
    step: int = 0  # optimizer steps taken in total (also the dropout and lr counter)
    images: int = 0  # training images processed in total
    train_seconds: float = 0.0  # wall time of all sessions of this run
    # None until the first validation: a run stopped before it has no accuracy to report
    best_top1: float | None = None
    best_top5: float | None = None
    # Whether the best validation averaged ten crops: a run may change data.val_ten_crop on resume,
    # and the paper comparison names the kind of figure it holds (None: a checkpoint from before
    # this was kept, or no validation yet).
    best_ten_crop: bool | None = None
    best_epoch: int | None = None  # the epoch (1-based) of the best validation
    last_top1: float | None = None
    last_top5: float | None = None
    skipped_steps: int = 0  # steps whose update was not applied (fp16's overflows, non-finite), in total
    nonfinite_streak: int = 0
    nonfinite_losses: int = 0  # the streak's steps whose loss was not finite (the others': the gradient)
    # For summary.json, over all sessions: bytes handed to / sent by this rank's collectives in
    # the logged steps, by kind, and the steps they cover; and GPU-seconds (each session's world
    # size x its wall seconds on CUDA; None in checkpoints written before it was counted).
    comm_payload: dict[str, int] = field(default_factory=dict)
    comm_sent: dict[str, int] = field(default_factory=dict)
    comm_steps: int = 0
    gpu_seconds: float | None = None
    # What the comm totals were counted under (trainer.comm_setup): bytes per step belong to a
    # layout, so a session under another one starts them afresh instead of averaging the two.
    comm_setup: str | None = None
    # metrics.jsonl records rank 0 could not write (a full disk): the resumed session writes them
    # first, so that each step is recorded once also then.
    unwritten_records: list[dict[str, Any]] = field(default_factory=list)
    # The setup (world size, layout, batch, ...) of the last session that took a step: summary.json
    # reports it, not that of a later session that found nothing left to train (None in
    # checkpoints written before it was kept: then the session's own).
    trained_under: dict[str, Any] | None = None

    def record_validation(self, top1: float, top5: float, loss: float, ten_crop: bool, epoch: int) -> None:
        """The latest validation, and the best one: the highest top-1, a tie going to the higher
        top-5 (both figures of one validation, as the paper's are of one model; the first
        validation of a tied top-1 used to keep its top-5, however much better a later one was).
        A validation with a non-finite loss is never the best: its top-1 is the share of the
        class that NaN logits pick (whichever topk returns for a row of NaN), and a diverged run
        reported it."""
        self.last_top1, self.last_top5 = top1, top5
        if not math.isfinite(loss):
            return
        if self.best_top1 is None or self.best_top5 is None or (top1, top5) > (self.best_top1, self.best_top5):
            self.best_top1, self.best_top5, self.best_ten_crop, self.best_epoch = top1, top5, ten_crop, epoch


def with_plateau_multiplier(state: dict[str, Any], saved_config: dict[str, Any] | None) -> dict[str, Any]:
    """The schedule's state with the plateau's multiplier, which checkpoints written before it
    was kept lack: the checkpoint's own factor to the power of its reductions (this run's factor
    would apply a changed schedule.factor to the reductions already made, and say nothing)."""
    if "multiplier" in state:
        return state
    schedule = (saved_config or {}).get("schedule") or {}
    factor = float(schedule.get("factor", ScheduleConfig().factor))
    return {**state, "multiplier": factor ** int(state.get("reductions", 0))}


def progress_from_checkpoint(saved: dict[str, Any], path: Path) -> Progress:
    """The saved progress; fields this version does not know (a checkpoint written by a newer
    one) are named and left out instead of failing the resume with a TypeError."""
    known = {f.name for f in fields(Progress)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning("checkpoint %s has progress fields this version does not know (written by a newer "
                    "version?), left out: %s", path, ", ".join(unknown))  # fmt: skip
    return Progress(**{k: v for k, v in saved.items() if k in known})


def resume_candidates(cfg: CheckpointConfig, ckpt_dir: Path) -> list[Path]:
    if cfg.resume == "none":
        return []
    if cfg.resume == "auto":
        # A link whose target is not there (storage not mounted) is a checkpoint all the same.
        return [p for p in (ckpt_dir / LAST, ckpt_dir / PREVIOUS) if p.exists() or p.is_symlink()]
    return [Path(cfg.resume).expanduser()]


# What restore_training reads; a checkpoint without one of them cannot continue a run.
TRAINING_SECTIONS = ("model", "optimizer", "schedule", "progress", "loaders", "config")


def check_training_sections(payload: dict[str, Any], path: Path) -> None:
    missing = [key for key in TRAINING_SECTIONS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: it cannot continue a training run")


def load_resume_checkpoint(
    cfg: CheckpointConfig,
    ckpt_dir: Path,
    model: nn.Module,
    settings: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> tuple[dict, Path] | None:
    """Load the newest usable checkpoint's weights into the single-device `model`. With
    `resume=auto`, a checkpoint that cannot be used (truncated, another model) gives way to the
    previous one, with a warning naming both. `settings`: this run's config as a dict; weights
    that do not fit the model then name the settings that shape it and differ. `classes`: the
    training data's class folders (None for synthetic data), which must be the checkpoint's."""
    candidates = resume_candidates(cfg, ckpt_dir)
    for i, path in enumerate(candidates):
        try:
            if cfg.resume == "auto" and path.is_dir():  # the run's first write would fail on it
                raise CheckpointUnusableHere(f"{path} is a folder, where the run writes its checkpoint file")
            payload = _load_training_checkpoint(path, named=cfg.resume != "auto")
            check_same_classes(payload, path, classes)  # the data's fault, not the file's: no fallback
            try:
                load_model_state(model, payload["model"], path)
            except CheckpointError as exc:
                changes = _shape_changes(payload, settings)
                if changes:  # the command's fault, not the file's: no fallback to previous.pt
                    raise ConfigError(
                        f"{exc} (this run changes {', '.join(changes)}; a resume keeps the checkpoint's model: "
                        "resume with the checkpoint's settings, or start a new run with run.name=<new name>)",
                        tuple(dict.fromkeys(change.split(":")[0] for change in changes)),
                    ) from exc
                raise
            return payload, path
        except CheckpointUnusableHere as exc:
            if cfg.resume != "auto" or i == len(candidates) - 1:
                raise
            # Its run's next checkpoint would replace it: rolled back a whole checkpoint interval.
            raise CheckpointUnusableHere(
                f"{exc}; not resuming from {candidates[i + 1]} instead, whose run would replace it at its next "
                f"checkpoint: make it usable, or move it aside to resume from {candidates[i + 1].name}"
            ) from exc
        except CheckpointError as exc:
            if cfg.resume != "auto" or i == len(candidates) - 1:
                raise
            log.warning("%s; falling back to %s", exc, candidates[i + 1])
    return None


def kept_on_resume(cfg: Config, saved: Any, ckpt_dir: Path) -> Config:
    """`cfg` with what a resume of the run's own checkpoint (`saved`: its config) keeps whatever
    the command says, so that config.yaml and the next checkpoints describe the run trained:
    model.weights and model.init, how its weights began (the checkpoint's weights replace both;
    a config.yaml saying otherwise would, run again under a new name, start another model), and,
    in a session resuming `auto`, the other run's checkpoint the run started from: recorded
    as `auto`, the run's own start command, given again (a requeue), was refused as a new run."""
    model = saved.get("model") if isinstance(saved, dict) else None
    init = model.get("init") if isinstance(model, dict) else None
    if init not in get_args(get_type_hints(ModelConfig)["init"]):  # a hand-edited or older record
        init = cfg.model.init
    elif init != cfg.model.init:
        log.info("model.init=%s is not applied: a resume continues the checkpoint's weights (model.init=%s)",
                 cfg.model.init, init)  # fmt: skip
    kept = replace(cfg, model=replace(cfg.model, weights=recorded_weights(saved), init=init))
    section = saved.get("checkpoint") if isinstance(saved, dict) else None
    start = section.get("resume") if isinstance(section, dict) else None
    if (
        cfg.checkpoint.resume == "auto"
        and isinstance(start, str)
        and start not in ("auto", "none")
        and not same_file(start, ckpt_dir / Path(start).name)  # not one of the run's own
    ):
        kept = replace(kept, checkpoint=replace(cfg.checkpoint, resume=start))
    return kept


def _load_training_checkpoint(path: Path, named: bool) -> dict[str, Any]:
    """The checkpoint at `path`, which can continue a run. `named`: the user named the file
    (checkpoint.resume=<file>): a file that is not there is a wrong value (a ConfigError), and one
    that cannot continue a run names the key as well."""
    if named:
        existing_file(
            "checkpoint.resume", str(path), "checkpoint", f"; name a checkpoint file in it (e.g. {checkpoint_in(path)})"
        )
    with naming_key("checkpoint.resume", CheckpointError) if named else nullcontext():
        payload = load_checkpoint(path)
        check_training_sections(payload, path)
    return payload


def check_same_classes(payload: dict[str, Any], path: Path, classes: list[str] | None) -> None:
    """Each output of the model stands for one class folder, in sorted order: a class folder
    renamed, added or removed since the checkpoint shifts every label after it. Resumed on
    such data, a run trained on swapped labels without a word (a renamed folder) or named only a
    shape mismatch of fc8 (an added one), and wrote the new folders' names into its checkpoints.
    Checkpoints written before class names were stored are not checked."""
    saved = payload.get("classes")
    if classes is None or not isinstance(saved, list) or saved == classes:
        return
    new, gone = [c for c in classes if c not in saved], [c for c in saved if c not in classes]
    differences = [f"{label}: {some_names(names)}" for label, names in (("new", new), ("missing", gone)) if names]
    raise DataError(
        f"the training data's {len(classes)} class folders are not the {len(saved)} that checkpoint {path} was "
        f"trained on ({'; '.join(differences)}): each of the model's outputs stands for one class, so the "
        "labels would change their meaning; resume with the run's own class folders, or start a new run "
        "(run.name=<new name>)"
    )


# The settings that decide the model's parameter shapes (data.crop: the paper model's fc6 fan-in).
SHAPE_SETTINGS = ("model.variant", "model.num_classes", "model.fc_width", "data.crop")


def _shape_changes(payload: dict[str, Any], settings: dict[str, Any] | None) -> list[str]:
    """'key: saved -> current' for each setting of SHAPE_SETTINGS this run changes."""
    saved = payload.get("config")
    if settings is None or not isinstance(saved, dict):
        return []
    return [c for c in changed_settings(saved, settings) if c.split(":")[0] in SHAPE_SETTINGS]


def changed_settings(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[str]:
    """'key: saved -> current' for every setting of the checkpoint's config that this run changes
    (checkpoint.resume aside: it names this very checkpoint; model.init too: the weights come
    from the checkpoint, and configs written before model.init had "auto" say "paper"; run.name
    too: it names the run's folder, and configs written before it was resolved say ""). A key
    that the checkpoint's config lacks (written before the key existed) had its default."""
    if defaults is None:
        defaults = config_to_dict(Config())
    changes = []
    for key, value in current.items():
        dotted = f"{prefix}{key}"
        default = defaults.get(key) if isinstance(defaults, dict) else None
        old = saved.get(key, default) if isinstance(saved, dict) else default
        if isinstance(value, dict):
            changes.extend(changed_settings(old if isinstance(old, dict) else {}, value, f"{dotted}.", default))
        elif old != value and dotted not in ("checkpoint.resume", "model.init", "run.name"):
            changes.append(f"{dotted}: {old!r} -> {value!r}")
    return changes


def batch_change(
    trained_under: dict[str, Any] | None, saved_config: dict[str, Any] | None, cfg: Config, global_batch: int
) -> list[str]:
    """The global batch and the peak learning rate scaled with it, when a resume changes them:
    under another world size or layout no config key names that change (2 -> 4 towers ranks
    doubled both, and only the data shards' line gave it away). The line names the causes: the
    number of data-parallel replicas, data.batch_size, train.accum_steps. The peak before is the
    checkpoint's own: its optim.lr at its batch (this run's optim.lr, where it changed too, made
    the line name a peak the run never had). `trained_under`: the setup of the run's last steps
    (Progress.trained_under; a session that took none, its config saved all the same, did not
    change it)."""
    under = trained_under if isinstance(trained_under, dict) else {}
    before = under.get("global_batch")
    if not isinstance(before, int) or before == global_batch:
        return []
    saved = saved_config if isinstance(saved_config, dict) else {}
    saved_optim, saved_data, saved_train = (saved.get(k) if isinstance(saved.get(k), dict) else {}
                                            for k in ("optim", "data", "train"))  # fmt: skip
    optim, batch, accum = cfg.optim, cfg.data.batch_size, cfg.train.accum_steps
    reference = saved_optim.get("lr_reference_batch", optim.lr_reference_batch)
    lr_before = scaled_lr(replace(optim, lr=saved_optim.get("lr", optim.lr), lr_reference_batch=reference), before)
    batch_before = under.get("batch_size", saved_data.get("batch_size", batch))
    # A setup recorded before accumulation existed (a batch_size and no accum_steps) had none.
    accum_before = under.get("accum_steps", 1 if "batch_size" in under else saved_train.get("accum_steps", 1))
    causes = []
    if before // (batch_before * accum_before) != global_batch // (batch * accum):
        causes.append(f"{before // (batch_before * accum_before)} -> {global_batch // (batch * accum)} "
                      "data-parallel replicas")  # fmt: skip
    if batch_before != batch:
        causes.append(f"data.batch_size {batch_before} -> {batch}")
    if accum_before != accum:
        causes.append(f"train.accum_steps {accum_before} -> {accum}")
    return [f"global batch: {before} -> {global_batch} ({', '.join(causes)}), "
            f"its peak learning rate {lr_before:.4g} -> {scaled_lr(optim, global_batch):.4g}"]  # fmt: skip


def restore_training(
    payload: dict[str, Any],
    path: Path,
    layout: Layout,
    local_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    amp: AmpPolicy,
    train_loader: Loader,
    mesh: Mesh,
) -> Progress:
    """Everything but the weights (already in the model before the layout split it)."""
    optim = payload["optimizer"]
    momentum = layout.to_local(optim["momentum"])
    load_optimizer_state(optimizer, optim["groups"], momentum, dict(local_model.named_parameters()))
    schedule.load_state_dict(with_plateau_multiplier(payload["schedule"], payload.get("config")))
    if amp.scaler is not None and payload.get("scaler"):
        amp.scaler.load_state_dict(payload["scaler"])
    saved_batch = payload.get("config", {}).get("data", {}).get("batch_size")
    progress = progress_from_checkpoint(payload["progress"], path)
    # torch's global generator, as every rank has it (seeded alike, drawn from alike: the model's
    # init). The run's own randomness comes from seeds and counters (dropout, the loaders); this
    # keeps anything else that draws from it after a resume on the uninterrupted run's numbers.
    rng = payload.get("rng", {}).get("torch")
    if isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8:
        torch.set_rng_state(rng)
    pos = restore_loader(train_loader, payload["loaders"]["train"], mesh, path, saved_batch)
    if pos is not None:
        # Epochs of another length: the global step no longer says how far into the run we are,
        # the epoch progress does (the same fraction of the run before and after the change). An
        # epoch trained but not yet validated (a stop during its validation) is behind the loader,
        # whose position already counts from the next epoch.
        trained = progress.epoch + int(progress.epoch_trained)
        schedule.realign(progress.step, trained * len(train_loader) + pos)
    return progress


def restore_loader(
    loader: Loader, states: dict[str, Any], mesh: Mesh, path: Path, saved_batch: int | None = None
) -> int | None:
    """Put the loader where the checkpoint's loaders stopped. Returns None when it is restored
    exactly (the same data shards, batch and number of files), else the position it was
    converted to."""
    mine = states.get(str(mesh.data_rank))
    current = loader.state_dict()
    new = current_layout(loader, current, mesh, saved_batch)
    # Every data rank stops at the same position in its epoch: any rank's state gives it.
    any_state = next(iter(states.values()))
    old = saved_layout(any_state, len(states), saved_batch or new.batch_size, loader.num_samples)
    saved_samples = int(any_state.get("num_samples", loader.num_samples))  # older states lack it
    # Older states lack the list's fingerprint too; the synthetic loader has no list.
    same_files = any_state.get("files", current.get("files")) == current.get("files")
    same_list = saved_samples == loader.num_samples and same_files
    # Another data.seed orders every epoch differently too, and a DALI reader's checkpoint holds
    # the old seed's random state (crops and mirrors went on drawing from it for good).
    saved_seed = any_state.get("seed", current.get("seed"))  # older states lack it
    same_order = same_list and saved_seed == current.get("seed")
    # A DALI reader's checkpoint is one of batches of its size: the same step of other batches is converted.
    old_accum, new_accum = accum_steps_of(any_state), accum_steps_of(current)
    if mine is not None and len(states) == mesh.data_size and old == new and old_accum == new_accum and same_order:
        loader.load_state_dict(mine)
        return None
    saved_pos = int(any_state["pos"])
    pos = convert_position(saved_pos, old, new)
    if saved_pos > 0 and is_first_rank():  # an epoch was interrupted (not ended by the checkpoint): rank 0 says so
        if not same_list:
            # Each epoch's order is a permutation of the whole list: another list (bad files left
            # out, files added, renamed or moved) orders every epoch differently, so the saved
            # position no longer names the samples already trained, and the DALI reader's
            # checkpoint belongs to the old list. Counted by samples consumed instead, as under
            # another layout.
            written = (
                f"{saved_samples} training images" if saved_samples != loader.num_samples
                else f"another list of {saved_samples} training images (files renamed, moved or replaced)"
            )  # fmt: skip
            log.warning(
                "checkpoint %s was written with %s, this run has %d: the interrupted epoch goes on after its step %d "
                "of %d with the new list's order (some of its images are trained twice this epoch, others not "
                "at all); later epochs are whole",
                path, written, loader.num_samples, pos, new.steps,
            )  # fmt: skip
        elif not same_order:
            log.warning(
                "checkpoint %s was written with data.seed %s, this run has %s: the interrupted epoch goes on "
                "after its step %d of %d in the new seed's order (some of its images are trained twice this "
                "epoch, others not at all); later epochs are whole",
                path, saved_seed, current.get("seed"), pos, new.steps,
            )  # fmt: skip
        else:
            _log_converted_position(path, loader, old, new, (old_accum, new_accum), saved_pos, pos)
    # No DALI checkpoint: a reader's state belongs to its shard. The loader advances a fresh
    # reader to `pos` itself, so that its epochs and the reader's coincide from then on.
    loader.load_state_dict({**current, "epoch": int(any_state["epoch"]), "pos": pos, "dali": None})
    return pos


def _log_converted_position(
    path: Path, loader: Loader, old: EpochLayout, new: EpochLayout, accums: tuple[int, int], saved_pos: int, pos: int
) -> None:
    """What a position converted to another layout costs the interrupted epoch, for the pipeline in
    use: nothing where the torchvision loader's order goes on at a whole step (an info line), the
    images of less than one step trained twice where it does not, and for DALI's fresh reader some
    images trained twice and others not at all. The same global batch said "trained twice" and
    spoke of both pipelines, of a resume that went on exactly."""
    shards = f"{old.num_shards} data shard{'s' if old.num_shards != 1 else ''}"
    # Of the images the old layout had trained this epoch, those the new one trains again; none
    # where the converted position ends the new layout's (shorter) epoch, or the epoch was whole.
    again = max(0, min(saved_pos * old.global_batch, new.steps * new.global_batch) - pos * new.global_batch)
    if not loader.keeps_epoch_order:
        cost = "DALI's reader starts afresh, so some of its images are trained twice and others not at all"
    elif again:
        cost = f"in the epoch's order, {again} images trained twice"
    else:
        cost = "in the epoch's order, no image trained twice"
    (log.info if loader.keeps_epoch_order and not again else log.warning)(
        "checkpoint %s was written with %s of batch %s (%d steps per epoch), this run has %d of batch %s "
        "(%d steps): the interrupted epoch goes on after its step %d of %d (%d of %d before; the run's step "
        "count goes on), %s; later epochs are whole",
        path, shards, describe_step_batch(old.batch_size // accums[0], accums[0]), old.steps, new.num_shards,
        describe_step_batch(new.batch_size // accums[1], accums[1]), new.steps, pos, new.steps, saved_pos, old.steps,
        cost,
    )  # fmt: skip


def current_layout(loader: Loader, state: dict[str, Any], mesh: Mesh, saved_batch: int | None) -> EpochLayout:
    """This run's epoch layout. A loader whose state does not name its batch (every one of this
    project's does) is taken to keep the checkpoint's."""
    batch = int(state.get("batch_size") or saved_batch or 1)
    return EpochLayout(int(state.get("num_shards", mesh.data_size)), batch, len(loader))


def saved_layout(state: dict[str, Any], data_ranks: int, batch: int, num_samples: int) -> EpochLayout:
    """The epoch layout a saved loader state counts its position in. States written before they
    recorded it lack the batch (then `batch`: the checkpoint's config, else unchanged) and the
    steps (then the batching rule's)."""
    shards = int(state.get("num_shards", data_ranks))
    batch = int(state.get("batch_size", batch))
    steps = int(state["steps"]) if "steps" in state else train_steps(num_samples, shards, batch)
    return EpochLayout(shards, batch, steps)


def gather_loader_states(loader: Loader, mesh: Mesh) -> dict[str, Any]:
    """Every data rank's loader position (a collective over the world)."""
    state = (mesh.data_rank, loader.state_dict())
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, state)
    else:
        gathered = [state]
    return {str(rank): s for rank, s in gathered}


def build_payload(
    cfg: Config,
    layout: Layout,
    local_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    amp: AmpPolicy,
    train_loader: Loader,
    mesh: Mesh,
    progress: Progress,
    classes: list[str] | None = None,
) -> dict[str, Any] | None:
    """The checkpoint's contents on global rank 0 (None elsewhere). Collective: every rank calls it.
    `classes`: the training split's class folders in output order (evaluation labels another
    folder's images by these names; None for synthetic data)."""
    loaders = gather_loader_states(train_loader, mesh)
    names = {p: n for n, p in local_model.named_parameters()}
    model = layout.to_full({k: v.detach().cpu() for k, v in local_model.state_dict().items()})
    momentum = layout.to_full({k: v.cpu() for k, v in optimizer_momentum(optimizer, names).items()})
    if model is None:
        return None
    return {
        "format": FORMAT_VERSION,
        "model": model,
        "optimizer": {"groups": optimizer_hyperparams(optimizer), "momentum": momentum},
        "schedule": schedule.state_dict(),
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else {},
        "progress": asdict(progress),
        "loaders": {"train": loaders},
        "rng": {"torch": torch.get_rng_state()},
        "config": config_to_dict(cfg),
        "world": {"world_size": mesh.world_size, "data_size": mesh.data_size, "mode": mesh.mode},
        **({"classes": list(classes)} if classes is not None else {}),
    }
