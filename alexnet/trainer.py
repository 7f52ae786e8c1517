"""Builds the parts of a run from its config and runs the epochs. No argparse, no globals."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml
from torch import nn

from alexnet.checkpoint import LAST, PREVIOUS, CheckpointError, atomic_save, same_file
from alexnet.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    config_yaml,
    write_config,
)
from alexnet.data import DataSplits, build_loader, build_splits, build_train_loader
from alexnet.engine import AmpPolicy, MicroBatch, StepResult, accumulated_step, build_amp
from alexnet.evaluate import eval_batch
from alexnet.layers import DropoutContext, step_sample_rows
from alexnet.metrics import Tally, Throughput
from alexnet.model import FC_WIDTH
from alexnet.optim import LrSchedule, build_optimizer, rate_change, schedule_problems
from alexnet.parallel.agree import (
    SETUP_ERRORS,
    LoaderError,
    check_same_checkpoint,
    check_same_contents,
    check_same_files,
    describe_error,
    fetch_each,
    least_on_any_rank,
    share_setup_failure,
)
from alexnet.parallel.apply import apply_parallelism, ddp_settings, example_batch
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import DistEnv
from alexnet.parallel.mesh import Mesh
from alexnet.parallel.shared_root import check_probe_seen, make_probe, remove_probe
from alexnet.plan import RunPlan, build_run_model
from alexnet.powersgd_checkpoint import remove_stale_powersgd_state, restore_powersgd_state, save_powersgd_state
from alexnet.report import draw_run_curves, session_gpu_seconds, summarize_run
from alexnet.reporting import MetricsWriteError, Reporter, comm_per_step
from alexnet.resume import (
    Progress,
    batch_change,
    build_payload,
    changed_settings,
    kept_on_resume,
    load_resume_checkpoint,
    restore_training,
)
from alexnet.runlock import HOLDER_ELSEWHERE_WAIT_S, RunFolderLock, lock_run_folder
from alexnet.stop import StopRequest
from alexnet.weights import StartWeights, apply_start_weights, check_resumed_weights, describe_start
from pipelines.filecheck import stopped_by
from pipelines.index import DataError
from pipelines.outputs import write_bytes_atomic
from pipelines.steps import StepBatches, describe_step_batch

log = logging.getLogger("alexnet")
R = TypeVar("R")  # what a piece of work on the main rank returns


class NonFiniteLossError(RuntimeError):
    pass


def _recorded_resume(config_yaml: Path) -> str | None:
    """checkpoint.resume as the run's config.yaml (its latest session) recorded it."""
    try:
        recorded = yaml.safe_load(config_yaml.read_bytes())  # bytes: whatever they hold, a YAMLError at worst
    except (OSError, yaml.YAMLError):
        return None
    section = recorded.get("checkpoint") if isinstance(recorded, dict) else None
    value = section.get("resume") if isinstance(section, dict) else None  # a hand-edited file may hold anything
    return value if isinstance(value, str) and value not in ("auto", "none") else None


def _resume_of(checkpoint: Path) -> str | None:
    """checkpoint.resume as the session that wrote `checkpoint` had it (None where it cannot be
    read: the resume itself then says why). Memory-mapped: the weights are not read."""
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        value = payload["config"]["checkpoint"]["resume"]
    except Exception:  # any file that does not load, or a payload without the key
        return None
    return value if isinstance(value, str) else None


def comm_setup(cfg: Config, env: DistEnv, mesh: Mesh, amp: str) -> str:
    """What decides the bytes a step communicates: summary.json's totals carry over from earlier
    sessions only while it stays the same. The towers' and the hybrid's exchanges grow with a
    step's images (data.batch_size x train.accum_steps), the hybrid's with the ranks of its FC
    groups. Those ranks and the precision (`amp`) are the ones in use: parallel.fc_group=0 and
    train.amp=auto mean other ones on other machines, whose totals were averaged together."""
    par = cfg.parallel
    # Written as before accumulation existed where it is off. (A checkpoint keyed by the configured
    # fc_group and amp, as earlier versions keyed it, restarts its totals once.)
    accum = f"x{cfg.train.accum_steps}" if cfg.train.accum_steps > 1 else ""
    return (
        f"{mesh.mode} world {env.world_size} data {mesh.data_size} fc_group {mesh.shape.model_size} "
        f"hook {par.comm_hook}/{par.powersgd_rank} batch {cfg.data.batch_size}{accum} crop {cfg.data.crop} "
        f"amp {amp} model {cfg.model.variant}/{cfg.model.num_classes}"
    )


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, mesh: Mesh, plan: RunPlan, stop: StopRequest) -> None:
        """`stop`: the run's stop request, its handlers installed before this setup (which can
        take minutes: indexing ImageNet, loading a checkpoint), so that a signal during it is
        heard and served after the first step, as any other, not a traceback or death by it."""
        self.cfg, self.env, self.mesh, self.plan, self.stop = cfg, env, mesh, plan, stop
        self.ckpt_dir = plan.run_dir / "checkpoints"
        self._lock = RunFolderLock(None)  # the main rank's hold on the run folder
        # Each rank waits in a collective for its own parallel.timeout_s (a node's own tuning):
        # rank 0's waits for the folder's lock stay inside the shortest.
        self._shortest_timeout_s = least_on_any_rank(cfg.parallel.timeout_s, env.device)
        self._agree_on_run_root()
        self._on_main_rank(self._lock_existing_run_folder)  # before its checkpoints are read
        try:
            self._build()
        except BaseException:
            self._lock.release()  # a failed setup frees the folder (for a caller that goes on)
            raise

    def _build(self) -> None:
        cfg, env, mesh, plan = self.cfg, self.env, self.mesh, self.plan
        failure: Exception | None = None
        try:
            full, resumed = self._read_data_and_checkpoint()
        except SETUP_ERRORS as exc:  # one rank's alone, maybe: a data folder its node lacks
            full, resumed, failure = None, None, exc
        share_setup_failure(failure)
        assert full is not None  # else that raised
        self._agree_on_data()
        self._agree_on_resume(resumed)
        self._agree_on_start_weights()
        if resumed is not None and self._resumes_own(resumed):
            # config.yaml and the checkpoints go on naming how the run began (a command that
            # resumes may leave model.weights out, or spell it its own way).
            self.cfg = cfg = kept_on_resume(cfg, resumed[0].get("config"), self.ckpt_dir)
        self._write_run_config()  # after the data and checkpoint checks: a run that cannot start leaves no trace
        # After a last.pt that did not load, the first write replaces it instead of rotating it
        # into previous.pt, which holds the good checkpoint this run resumed from.
        self._rotate_previous = resumed is None or not same_file(resumed[1], self.ckpt_dir / PREVIOUS)
        self._saved_step: int | None = None  # the step of the last checkpoint this session wrote or resumed
        self._saved_position: tuple[int, int, bool] | None = None  # and its _position
        self.comm = CommCounter()
        example = example_batch(cfg.data.crop, env.device, plan.channels_last)
        ddp = ddp_settings(cfg.parallel, cfg.train.accum_steps, env.is_main and mesh.grad_group_size > 1)
        self.par = apply_parallelism(full, env, mesh, ddp, self.comm, example)
        self.model = self.par.local
        self.optimizer = build_optimizer(list(self.model.named_parameters()), cfg.optim, plan.peak_lr)
        self.schedule = LrSchedule(cfg.schedule, plan.peak_lr, len(self.train_loader), cfg.train.epochs)
        self.amp: AmpPolicy = build_amp(cfg.train.amp, env.device)
        self.progress = Progress()
        if resumed is not None:
            payload, path = resumed
            self.progress = restore_training(payload, path, self.par.layout, self.model, self.optimizer,
                                             self.schedule, self.amp, self.train_loader, mesh)  # fmt: skip
            self._log_resume(payload, path)
            self._saved_step = self.progress.step
            if same_file(path, self.ckpt_dir / LAST):  # else last.pt is another's, or damaged: written anew
                self._saved_position = self._position()
            restore_powersgd_state(self.par.comm_hook, path, self.progress.step, env.rank, self._rank_setup(),
                                   env.device, (self.progress.trained_under or {}).get("amp"))  # fmt: skip
        self.after_backward = self.par.layout.after_backward()
        p = self.progress
        # A checkpoint of another run (checkpoint.resume=<its file>) continues none of this folder's records.
        history_here = resumed is None or self._resumes_own(resumed)
        self.reporter = Reporter(plan.run_dir, env.is_main, cfg.run.tensorboard, cfg.run.progress, cfg.train.epochs,
                                 (p.step, p.epoch), p.unwritten_records, history_here, cfg.run.plot)  # fmt: skip
        self._on_main_rank(self.reporter.open)
        self._session_start = time.perf_counter()
        self._seconds_before = p.train_seconds
        self._first_step = p.step  # where this session started: has it trained since?
        self._window_skipped = 0  # steps of the open log window not applied (fp16 overflow, non-finite)
        if p.gpu_seconds is None:  # a checkpoint from before GPU-seconds were counted: as this session
            p.gpu_seconds = session_gpu_seconds(env.world_size, env.device.type, p.train_seconds)
        self._gpu_seconds_before = p.gpu_seconds
        self._comm_setup = comm_setup(cfg, env, mesh, self.amp.name)
        self._sample_rows = step_sample_rows(cfg.data.batch_size, mesh.data_rank, cfg.train.accum_steps, env.device)

    def _read_data_and_checkpoint(self) -> tuple[nn.Module, tuple[dict, Path] | None]:
        """Each rank's own reading: the data folders, its loaders, and the checkpoint to resume
        from (loaded into the single-device model, identical on every rank: same seed, or the same
        checkpoint, before the layout takes this rank's part of it)."""
        cfg, env, plan = self.cfg, self.env, self.plan
        resume_from = self._check_run_dir()
        self._resume_setting = resume_from.resume  # "auto" where the run continues its own checkpoints
        self.splits: DataSplits = build_splits(cfg.data, cfg.model.num_classes, warn_unread=env.is_main)
        self.num_classes = cfg.model.num_classes or len(self.splits.classes)
        loader_args = (self.splits, self.mesh, env.device, plan.decoder, plan.channels_last)
        self.train_loader = build_train_loader(cfg.data, *loader_args, cfg.train.accum_steps)
        self.val_loader = build_loader(cfg.data, "val", *loader_args)
        full = build_run_model(cfg, self.num_classes, plan, env.device)
        self.full_parameters = sum(p.numel() for p in full.parameters())
        resumed = load_resume_checkpoint(
            resume_from, self.ckpt_dir, full, config_to_dict(cfg), self.splits.folder_classes
        )
        self.start_weights: StartWeights | None = None
        if resumed is not None:  # a resume continues the run's own weights, whatever model.weights names
            if env.is_main and self._resumes_own(resumed):  # the path config.yaml records is rank 0's
                check_resumed_weights(resumed[0].get("config"), cfg.model.weights, plan.run_dir)
        elif cfg.model.weights:
            normalisation = (cfg.data.mean, cfg.data.std)
            path = Path(cfg.model.weights).expanduser()
            self.start_weights = apply_start_weights(full, path, self.splits.folder_classes, normalisation)
        return full, resumed

    # ---- run folder and checkpoints -------------------------------------------------------
    def _check_run_dir(self) -> CheckpointConfig:
        """Where to resume from. A run folder that holds checkpoints is continued or refused: a
        fresh start, or another run's checkpoint, would overwrite its checkpoints. A run started
        from another run's checkpoint and restarted with the same arguments (a Slurm requeue, a
        torchrun restart) continues its own checkpoints."""
        ckpt = self.cfg.checkpoint
        resume = ckpt.resume
        last = self.ckpt_dir / LAST
        if not (last.exists() or last.is_symlink()) or resume == "auto":  # a link to storage not mounted counts
            return ckpt
        # Both refusals are of the command (exit 2): its checkpoint.resume and run.name disagree.
        if resume == "none":
            raise ConfigError(
                f"run folder {self.plan.run_dir} already holds checkpoints; set checkpoint.resume=auto to "
                "continue it, or run.name=<new name> to start another run (nothing was overwritten)",
                ("checkpoint.resume",),
            )
        recorded = _recorded_resume(self.plan.run_dir / "config.yaml")
        if same_file(resume, self.ckpt_dir / Path(resume).name):  # one of the run's own checkpoints
            if same_file(resume, _resume_of(last)):
                # The latest checkpoint was written by a session sent back to that file: this is a
                # restart of it (torchrun's, a Slurm requeue), which went back again every time.
                log.info("the run's latest checkpoint was written after going back to %s; continuing from it",
                         resume)  # fmt: skip
                return dataclasses.replace(ckpt, resume="auto")
            return ckpt
        if same_file(resume, recorded):
            log.info("this run started from %s; continuing from its own checkpoints", resume)
            return dataclasses.replace(ckpt, resume="auto")
        raise ConfigError(
            f"run folder {self.plan.run_dir} already holds checkpoints of its own; to start from "
            f"checkpoint.resume={resume}, give this run a folder of its own with run.name=<new name> "
            "(nothing was overwritten)",
            ("checkpoint.resume",),
        )

    def _on_main_rank(self, work: Callable[[], R]) -> R | None:
        """Collective: `work` runs on the main rank, and every rank raises its error, so that the
        others stop with it instead of in a broken collective; else every rank gets what it
        returned (None from most: it is sent to every rank)."""
        failure: Exception | None = None
        result: R | None = None
        if self.env.is_main:
            try:
                result = work()
            except OSError as exc:
                named = exc.filename2 or exc.filename  # a rename's target, not its temporary file
                where = f"{named}: " if named else ""
                failure = ConfigError(
                    f"config key 'run.root': cannot write the run folder {self.plan.run_dir} ({where}{exc.strerror})"
                )
            except (ConfigError, CheckpointError, DataError, MetricsWriteError) as exc:
                failure = exc
            except Exception as exc:  # unforeseen: shared all the same, so that no rank waits for it
                log.exception("rank 0 failed")
                failure = RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")
        if self.env.distributed:
            shared: list[Any] = [failure, result]
            dist.broadcast_object_list(shared, src=0)
            failure, result = shared
        if failure is not None:
            raise failure
        return result

    def _agree_on_run_root(self) -> None:
        """Collective, before anything is read from the run folder or trained: every rank sees
        the folder rank 0 writes (alexnet.parallel.shared_root)."""
        if not self.env.distributed:
            return
        probe = self._on_main_rank(lambda: make_probe(self.plan.run_dir))
        assert probe is not None  # else that raised
        try:
            check_probe_seen(probe, self.plan.run_dir)
        finally:
            if self.env.is_main:
                remove_probe(probe)

    def _lock_existing_run_folder(self) -> None:
        """A folder that exists may be another session's: its lock comes before its checkpoints
        are read (a session that ended meanwhile would have written a newer one). A new folder is
        locked when it is made, with config.yaml."""
        if self.plan.run_dir.is_dir():
            self._lock = self._lock_run_folder()

    def _lock_run_folder(self) -> RunFolderLock:
        # The other ranks wait in a collective meanwhile: the wait stays well inside their timeouts.
        wait = min(HOLDER_ELSEWHERE_WAIT_S, self._shortest_timeout_s / 2)
        return lock_run_folder(self.plan.run_dir, wait_elsewhere_s=wait)

    def _write_run_config(self) -> None:
        """config.yaml is the configuration of the latest session; an earlier session's differing
        one is kept beside it as config.<n>.yaml."""
        self._on_main_rank(self._take_run_folder)

    def _take_run_folder(self) -> None:
        path = self.plan.run_dir / "config.yaml"
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        if not self._lock.checked:  # the folder was new when this session started
            self._lock = self._lock_run_folder()
            if (self.ckpt_dir / LAST).exists():  # another session made it and trained meanwhile
                raise CheckpointError(
                    f"run folder {self.plan.run_dir} was started by another session while this one was setting "
                    "up, and holds its checkpoints now; set run.name=<new name> for another run, or "
                    "checkpoint.resume=auto to continue that one (nothing was overwritten)"
                )
        # Made and probed now: a file named `checkpoints`, or a read-only folder, failed at the
        # first checkpoint, maybe an epoch in.
        self.ckpt_dir.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=self.ckpt_dir):  # nameless where it can be: a kill leaves nothing
            pass
        before = path.read_bytes() if path.exists() else None  # bytes: kept as they are, whatever they hold
        if before is not None and config_yaml(self.cfg).encode("utf-8") != before:
            n = 1
            while (self.plan.run_dir / f"config.{n}.yaml").exists():
                n += 1
            write_bytes_atomic(self.plan.run_dir / f"config.{n}.yaml", before)  # kept before it is replaced
            log.info("this session's config differs from the run's earlier one, kept as config.%d.yaml", n)
        write_config(self.cfg, path)

    def _agree_on_resume(self, resumed: tuple[dict, Path] | None) -> None:
        """Every rank must continue from the same checkpoint. Ranks that read it from disks of
        their own (each node's copy of checkpoint.resume's file; a run.root of their own is
        stopped before, by _agree_on_run_root) would each find another one, or none, and train on
        from different steps until their collectives stop matching. The same checkpoint is told
        by its progress, not by its path: nodes may spell a path their own way (a symbolic link,
        a relative path)."""
        resume = self._resume_setting
        advice = f"run.root ({self.cfg.run.root}) must be a folder that every rank sees (a shared file system)"
        if resume not in ("auto", "none"):
            advice = (f"checkpoint.resume ({resume}) must lead every rank to the same checkpoint (each node's "
                      "copy the same file)")  # fmt: skip
        check_same_checkpoint(
            None if resumed is None else (resumed[1], resumed[0]["progress"]),
            "found different checkpoints to resume from",
            advice,
            may_be_written=resumed is not None and not self._resumes_own(resumed),  # another run's, maybe live
        )

    def _resumes_own(self, resumed: tuple[dict, Path]) -> bool:
        """Whether the checkpoint resumed is one of this run folder's (not another run's, named
        by checkpoint.resume=<file>)."""
        return same_file(resumed[1].parent, self.ckpt_dir)

    def _agree_on_data(self) -> None:
        """Collective: every node's data (data.root may name each node's own copy) holds the same
        class folders and files. Nothing compared them: with a class folder missing on one node
        the labels meant other classes on each rank (one rank warned), and a copy short of a few
        files had the ranks take different numbers of steps until a collective broke an epoch later."""
        s = self.splits
        if s.train is not None and s.val is not None:  # synthetic data: generated alike from the seeds
            check_same_files(self.cfg.data.root or "the demo data", {"train": s.train, "val": s.val})
        self._agree_on_lighting()

    def _agree_on_lighting(self) -> None:
        """Collective: every rank lights its images with the same PCA statistics (section 4.1).
        Each reads <data root>/pca_lighting.json (or data.lighting_stats) on its own: a node whose
        copy lacked the file, or a file measured while the run started, gave the ranks different
        statistics without a word."""
        lighting = self.splits.lighting
        stats = None if lighting is None else lighting.stats
        found = None
        if stats is not None:
            found = (
                stats.source,
                (stats.eigval, stats.eigvec),
                "eigenvalues " + ", ".join(f"{v:.1f}" for v in stats.eigval),
            )
        check_same_contents(
            found,
            "read different PCA lighting statistics",
            "every node needs the same statistics: the same <data root>/pca_lighting.json, or data.lighting_stats",
            DataError,
        )
        if stats is not None and self.env.is_main:
            log.info("PCA lighting (alpha std %g): %s", lighting.alpha_std, stats.source)

    def _agree_on_start_weights(self) -> None:
        """A new run's ranks start from the same model.weights, read from each node's own path."""
        start = self.start_weights
        check_same_contents(
            None if start is None else (str(start.path), start.digest, f"weights {start.digest[:12]}"),
            "read different model.weights",
            "every node needs the same file",
            ConfigError,
        )
        if start is not None:
            log.info(describe_start(start))
            if start.other_inputs:
                log.warning("model.weights: %s was trained on images normalised with %s: its weights expect other "
                            "inputs than this run gives them", start.path, start.other_inputs)  # fmt: skip

    def _log_resume(self, payload: dict[str, Any], path: Path) -> None:
        p = self.progress
        # Completed epochs, not "epoch 0" before progress lines that count from 1.
        log.info(
            "resumed from %s after step %d (%d epoch%s completed)", path, p.step, p.epoch, "" if p.epoch == 1 else "s"
        )
        if not self.env.is_main:  # the same on every rank: said once
            return
        changes = changed_settings(payload["config"], config_to_dict(self.cfg)) + batch_change(
            p.trained_under, payload["config"], self.cfg, self.plan.global_batch
        )
        if changes:
            log.warning("this run changes the checkpoint's settings (the new values apply from here on): %s",
                        "; ".join(changes))  # fmt: skip
            self._log_rate_change(payload)
        before = (p.trained_under or {}).get("amp")
        if before and before != self.amp.name and not any(c.startswith("train.amp:") for c in changes):
            why = "resolves to what this machine runs best" if self.cfg.train.amp == "auto" else "set"
            log.warning("the run trained in precision %s, this session in %s (train.amp=%s %s)", before,
                        self.amp.name, self.cfg.train.amp, why)  # fmt: skip
        self._log_fc_group_change(p.trained_under or {}, changes)
        if p.epoch >= self.cfg.train.epochs:
            log.warning("the run in %s has already trained its %d epochs: nothing to train (raise "
                        "train.epochs to go on, or set run.name=<new name> for a new run)",
                        self.plan.run_dir, self.cfg.train.epochs)  # fmt: skip

    def _log_fc_group_change(self, under: dict[str, Any], changes: list[str]) -> None:
        """The hybrid's FC layers split over another number of ranks than the run's last steps,
        where no key changed (parallel.fc_group=0 follows the processes per node: a requeue onto
        another node shape): the run goes on, to float32 rounding, where it was exact."""
        before, now = under.get("fc_group"), self.mesh.shape.model_size
        if (
            self.mesh.mode != "hybrid"
            or under.get("parallel_mode") != "hybrid"
            or not isinstance(before, int)
            or before == now
            or any(c.startswith(("parallel.fc_group:", "parallel.mode:")) for c in changes)
        ):
            return
        log.warning("the run's FC layers were split over %d ranks, this session's over %d (parallel.fc_group=0 "
                    "follows the processes per node): the run goes on to float32 rounding, not bit for bit; set "
                    "parallel.fc_group=%d to keep a resume exact", before, now, before)  # fmt: skip

    def _log_rate_change(self, payload: dict[str, Any]) -> None:
        """Where the changed settings move the learning rate itself (train.epochs raised on a cosine
        run, another warm-up or schedule), its value before and after: the key's change alone did
        not tell that the rate jumps, e.g. 200-fold back up on a finished cosine run extended."""
        try:
            saved = config_from_dict(payload["config"], "the checkpoint")
        except (ConfigError, TypeError):  # a config this version cannot build: the changes are listed
            return
        step = self.progress.step
        moved = rate_change(saved.schedule, saved.train.epochs, self.schedule, step)
        if moved:
            why = " (a cosine spreads over train.epochs)" if self.cfg.schedule.name == "cosine" else ""
            log.warning("the learning rate of step %d is %.4g under these settings, %.4g under the checkpoint's%s",
                        step + 1, moved[1], moved[0], why)  # fmt: skip

    def _update_clock(self) -> None:
        elapsed = time.perf_counter() - self._session_start
        self.progress.train_seconds = self._seconds_before + elapsed
        self.progress.gpu_seconds = self._gpu_seconds_before + session_gpu_seconds(
            self.env.world_size, self.env.device.type, elapsed
        )

    def save_checkpoint(self) -> None:
        """Collective: every rank calls it; rank 0 writes.

        Nothing is written during a run of skipped non-finite steps (the streak is the same on
        every rank): the weights are still those from before it, and a write would rotate
        previous.pt away, which is the file to go back to when the loss exploded before it turned
        non-finite. A second write at the same step (an epoch's end right after a periodic
        checkpoint, then a stop) replaces last.pt without rotating, so that previous.pt keeps an
        earlier step instead of becoming a copy of last.pt. Nothing is written where the
        checkpoint this session resumed or wrote holds the run as it is (`_saved_position`)."""
        p = self.progress
        if self._saved_position == self._position():
            return
        if p.nonfinite_streak:
            log.warning("step %d: no checkpoint during %d non-finite step(s) in a row", p.step, p.nonfinite_streak)
            return
        if not self._weights_finite():  # a checkpoint of them would be the one a resume loads
            raise NonFiniteLossError(self._poisoned_message())
        self._update_clock()
        self._note_training_setup()
        # Each rank's own state first: rank 0 writes last.pt after build_payload's gather, which
        # every rank enters after its own write, so a last.pt never goes ahead of them.
        save_powersgd_state(self.par.comm_hook, self.ckpt_dir, p.step, self.env.rank, self._rank_setup())
        payload = build_payload(self.cfg, self.par.layout, self.model, self.optimizer, self.schedule, self.amp,
                                self.train_loader, self.mesh, p, self.splits.folder_classes)  # fmt: skip
        rotate = self._rotate_previous and p.step != self._saved_step
        # Rank 0's write, shared: no rank goes on before last.pt is written, and where it could not
        # be (a full disk), every rank stops with the reason instead of in a broken collective.
        self._on_main_rank(lambda: self._write_checkpoint(payload, rotate))
        self._rotate_previous = True
        self._saved_step, self._saved_position = p.step, self._position()

    def _position(self) -> tuple[int, int, bool]:
        """Where the run stands: its step, epoch, and whether that epoch's steps are all taken.
        A session that moved none of them (a rerun past train.max_steps, a stop before its first
        step) rewrote last.pt with its own settings, which the next resume reported as the
        checkpoint's (a learning rate no step was taken at)."""
        p = self.progress
        return p.step, p.epoch, p.epoch_trained

    def _write_checkpoint(self, payload: dict[str, Any], rotate: bool) -> None:
        """Rank 0's part: last.pt, then the PowerSGD state files no resume can take any more."""
        atomic_save(payload, self.ckpt_dir, rotate=rotate)
        hook = self.par.comm_hook
        in_use = hook is not None and hook.powersgd is not None
        remove_stale_powersgd_state(self.ckpt_dir, self.env.world_size, in_use)

    def _rank_setup(self) -> dict[str, Any]:
        """What a rank's own checkpoint state (PowerSGD's) belongs to: a resume under another
        world, layout, factor rank, memory format (PowerSGD's residual is in the gradients'
        memory order) or precision starts that state afresh. The precision in use, not
        train.amp: under fp16 the hook compresses the loss-scaled gradients, so the residual is
        scaled too (by 1024 to 65536), and resumed under bf16 or off it made the first step's
        updates 12-200 times too large. The FC group is the hybrid's resolved one (0 = a node's
        ranks; other layouts have none), so that parallel.fc_group=2 on a node of 2 is no change."""
        fc_group = self.mesh.shape.model_size if self.mesh.mode == "hybrid" else 0
        return {"world_size": self.env.world_size, "mode": self.mesh.mode, "fc_group": fc_group,
                "powersgd_rank": self.cfg.parallel.powersgd_rank, "channels_last": self.plan.channels_last,
                "amp": self.amp.name}  # fmt: skip

    def _count_skips(self, result: StepResult, lr: float) -> None:
        """The run of skipped steps, and its end of the run at train.max_nonfinite."""
        p = self.progress
        if result.applied:
            p.nonfinite_streak = p.nonfinite_losses = 0
            return
        p.skipped_steps += 1
        self._window_skipped += 1
        self.par.forget_skipped_step()
        if not result.overflow:  # the scaler's own back-off is not a diverging run
            p.nonfinite_streak += 1
            p.nonfinite_losses += not result.loss_finite
            if p.nonfinite_streak == 1 and not self._weights_finite():
                raise NonFiniteLossError(self._poisoned_message())  # no later step can recover
        if p.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(self._nonfinite_message(lr))

    def _weights_finite(self) -> bool:
        """Collective: whether every rank's part of the model is finite. Gradients are checked
        every step only under fp16's scaler or with train.grad_clip: without either, a
        non-finite gradient whose loss was finite is applied and turns the weights non-finite.
        This check, at each checkpoint and at the first skipped step of a streak, keeps such
        weights out of every checkpoint (a pass over the weights now and then, where a gradient
        check would be a pass over the gradients at every step)."""
        bad = torch.stack([~torch.isfinite(w).all() for w in self.model.parameters()]).any().float().reshape(1)
        if self.env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bad.item()

    def _kept_checkpoints(self, why: str) -> str:
        if (self.ckpt_dir / LAST).is_file():
            return f"The checkpoints in {self.ckpt_dir} hold weights from before these steps ({why})."
        return "No checkpoint was written before these steps."

    def _nonfinite_message(self, lr: float) -> str:
        """Names what was not finite: with train.grad_clip (or fp16's scaler) a step whose losses
        were all finite is skipped on its gradients (their global norm, squared in float32,
        overflows above about 1.8e19, as clip_grad_norm_'s does); "a non-finite loss" and "set
        train.grad_clip", with it set, misled there."""
        p, train = self.progress, self.cfg.train
        if p.nonfinite_losses == p.nonfinite_streak:
            what = "a non-finite loss"
        elif p.nonfinite_losses == 0:
            what = "finite losses but non-finite gradients"
        else:
            what = f"non-finite losses ({p.nonfinite_losses}) or gradients ({p.nonfinite_streak - p.nonfinite_losses})"
        levers = ["lower optim.lr"]
        if train.grad_clip <= 0:
            levers.append("set train.grad_clip")
        if self.amp.dtype == torch.float16:
            levers.append("use train.amp=bf16/off")
        advice = levers[0] if len(levers) == 1 else f"{', '.join(levers[:-1])} or {levers[-1]}"
        return (
            f"{p.nonfinite_streak} consecutive steps with {what} at step {p.step} (lr {lr:.3g}); {advice}. "
            + self._kept_checkpoints("a skipped step changes nothing, and no checkpoint is written during them")
        )

    def _poisoned_message(self) -> str:
        return (
            f"the weights are not finite at step {self.progress.step}: a step applied a non-finite "
            "gradient whose loss was finite (gradients are checked only with train.grad_clip > 0 "
            "or fp16's loss scaler, which skip such steps); set train.grad_clip, or lower optim.lr. "
            + self._kept_checkpoints("non-finite weights are never written")
        )

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        except BaseException as exc:  # a second Ctrl-C too: summary.json went on saying "running"
            if self.env.is_main:
                self._summarize_failure(exc)
            raise
        finally:
            try:
                self._close_reporter()  # a failed run left TensorBoard's writer thread running
                for loader in (self.train_loader, self.val_loader):
                    loader.close()
            finally:
                self._lock.release()

    def _close_reporter(self) -> None:
        try:
            self.reporter.close()
        except Exception as exc:  # never in place of the run's own error
            log.warning("the run's TensorBoard writer could not be closed: %s", exc)

    def _fit(self) -> dict[str, Any]:
        self._log_start()
        self._on_main_rank(self._summarize_start)
        stop_reason = self._run_epochs()
        if stop_reason:
            self.save_checkpoint()
            requests = self.stop.requests()  # every rank's, where only some were asked
            if self.env.is_main:
                self.stop.served(self.progress.step, requests)
        elif self.progress.nonfinite_streak:
            # Its last steps were skipped and are in no checkpoint (none is written during them):
            # a run that "finished" there reported itself completed with nothing to resume from.
            last_lr = self.schedule.lr_at(max(self.progress.step - 1, 0))
            raise NonFiniteLossError(f"the run's epochs ended inside {self._nonfinite_message(last_lr)}")
        self._on_main_rank(self._raise_report_failure)  # after the checkpoint: it keeps the steps
        if self._saved_step != self.progress.step:
            # Else the clock stays as the last checkpoint has it: the figures below are the ones
            # the next session resumes with (a rerun of a finished run reports the same time).
            self._update_clock()
        self._note_training_setup()
        summary = self._summary(stop_reason, time.perf_counter() - self._session_start)
        p = self.progress
        # The world and device of the session that took the run's latest steps, as summary.json's
        # (a rerun with nothing to train said "on 1 process(es)" about steps 2 processes took).
        final = summarize_run(p.best_top1, p.best_top5, p.train_seconds, p.images, summary["world_size"],
                              summary["device"], self.splits.validated_classes, p.gpu_seconds,
                              synthetic=self.cfg.data.pipeline == "synthetic",
                              ten_crop=self._best_ten_crop())  # fmt: skip
        summary.update(wall_hours=final.wall_hours, gpu_hours=final.gpu_hours, paper=final.paper)
        self._on_main_rank(lambda: self.reporter.summary(summary, final))
        self.reporter.close()
        if stop_reason != "preempted" and self.env.is_main:
            self.stop.mark_completed(self.progress.step)  # a Slurm job does not requeue it
        return summary

    def _run_epochs(self) -> str:
        """The remaining epochs, each validated and checkpointed; why they stopped early, or ""."""
        cfg, p = self.cfg, self.progress
        for epoch in range(p.epoch, cfg.train.epochs):
            if not p.epoch_trained:  # else a stop came during its validation: the steps are taken
                stop_reason = self._train_epoch(epoch)
                if stop_reason:
                    return stop_reason
            if epoch + 1 == cfg.train.epochs or (epoch + 1) % cfg.train.eval_every == 0:
                p.epoch_trained = True
                if self._validate(epoch) is None:
                    return "preempted"
            p.epoch, p.epoch_trained = epoch + 1, False
            self.save_checkpoint()
        return ""

    def _agreed_batches(self, batches: Iterable[StepBatches]) -> Iterator[tuple[StepBatches, bool, float]]:
        """(batches, stop, seconds waited for them) for each optimizer step's batches (the
        StepLoader's items), agreed on by every rank before they are used, in the one all-reduce a
        step has for it: a stop request on any rank or rank 0's records failing (stop: every rank
        stops, training after this step, with a checkpoint, validation before this step), or a
        rank that could not read its batches (every rank raises at once that rank's DataError, or
        a LoaderError naming it: the other ranks' loaders have moved on, so no checkpoint of a
        training step can follow)."""
        for fetched in fetch_each(batches):
            stop = self.stop.agreed_on(fetched, failed_here=self.reporter.failure is not None)
            yield fetched.batch, stop, fetched.seconds  # type: ignore[misc] - a batch where no error

    def _raise_report_failure(self) -> None:
        if self.reporter.failure is not None:
            raise MetricsWriteError(
                f"{self.reporter.failure}; training stopped at step {self.progress.step} {self._checkpoint_said()}: "
                "the same command resumes from it once the file can be written"
            )

    def _checkpoint_said(self) -> str:
        """Whether the step at hand is in a checkpoint (none is written during non-finite steps)."""
        if self._saved_step == self.progress.step:
            return f"with a checkpoint in {self.ckpt_dir}"
        last = "there is none yet" if self._saved_step is None else f"the last is of step {self._saved_step}"
        return f"without a checkpoint of it ({last})"

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.progress.step

    def _epoch_done(self, epoch: int) -> bool:
        """Whether the steps taken complete `epoch`: the schedule counts epoch progress in steps of
        the loader's epochs, also after a resume under another number of steps per epoch."""
        return self.schedule.position(self.progress.step) >= (epoch + 1) * len(self.train_loader)

    def _train_epoch(self, epoch: int) -> str:
        """Run the rest of this epoch; returns why it stopped early ("" when it did not)."""
        if self._reached_max_steps() and not self._epoch_done(epoch):
            # A run that stopped (or crashed) at the epoch's last step still validates and counts
            # it: its loader yields nothing more for this epoch.
            return "max_steps"
        self.par.module.train()
        self.comm.take()  # forget what validation sent
        try:
            return self._train_steps(epoch)
        except (DataError, LoaderError) as exc:  # the loaders do not know who reads them: say what stopped
            raise stopped_by(exc, "Training stopped; no checkpoint was written after this batch.") from exc

    def _train_steps(self, epoch: int) -> str:
        cfg, p = self.cfg, self.progress
        tally, meter = Tally(self.env.device), Throughput()
        window, stop_reason = 0, ""
        steps = len(self.train_loader)
        done = min(max(self.schedule.position(p.step) - epoch * steps, 0), steps)  # a resume mid-epoch
        batches = self.reporter.wrap_epoch(self.train_loader, epoch, done)
        for step_batches, stop, data_wait in self._agreed_batches(batches):
            lr = self.schedule.apply(self.optimizer, p.step)
            micro = [
                MicroBatch(images, labels, DropoutContext(cfg.train.seed, p.step, rows[: labels.shape[0]]))
                for (images, labels), rows in zip(step_batches, self._sample_rows)
            ]
            result = accumulated_step(self.par.module, micro, self.optimizer, self.amp, cfg.train.grad_clip,
                                      self.after_backward)  # fmt: skip
            p.step += 1
            p.images += result.count * self.mesh.data_size
            tally.add(result.loss_sum, result.correct, result.count)
            meter.add(result.count * self.mesh.data_size, data_wait)
            window += 1
            try:
                self._count_skips(result, lr)
            except NonFiniteLossError:
                self._log_window_before_error(epoch, lr, tally, meter, window, batches)
                raise
            if p.step % cfg.train.log_every == 0:
                self._log_train(epoch, lr, tally, meter, window, batches)
                window = 0
            if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0:
                if window:  # a resume from this checkpoint keeps the records up to it: close the window
                    self._log_train(epoch, lr, tally, meter, window, batches)
                    window = 0
                saving = time.perf_counter()
                self.save_checkpoint()
                meter.exclude(time.perf_counter() - saving)
            if self._reached_max_steps() and not self._epoch_done(epoch):
                stop_reason = "max_steps"  # at the epoch's last step the epoch ends first: validated, counted
                break
            if stop:
                log.warning("stopping at step %d on %s: writing a checkpoint", p.step,
                            self.reporter.failure or self.stop.reason())  # fmt: skip
                stop_reason = "preempted"  # a report failure is raised after the checkpoint
                break
        if window:  # the last steps of the epoch (or before a stop) that did not fill a log window
            self._log_train(epoch, lr, tally, meter, window, batches)
        return stop_reason

    def _log_window_before_error(self, epoch: int, lr: float, tally: Tally, meter: Throughput, steps: int,
                                 batches) -> None:  # fmt: skip
        """The open window's record before an error that every rank raises at the same step (the
        non-finite losses: the skip and the weights' check are agreed), so that its steps are in
        the records as summary.json counts them. Its own failure is logged, not raised: the
        error the run reports is the one that stopped it."""
        try:
            self._log_train(epoch, lr, tally, meter, steps, batches)
        except Exception:
            log.exception("the record of steps %d-%d could not be written", self.progress.step - steps + 1,
                          self.progress.step)  # fmt: skip

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float] | None:
        """The validation's figures, recorded; None when a stop request came during it."""
        self.model.eval()
        start = time.perf_counter()
        tally = self._validation_tally(epoch)
        if tally is None:
            return None
        stats = tally.reduce(self.mesh.metric_group)
        if stats["count"] != self.val_loader.num_samples:
            raise RuntimeError(
                f"validation counted {stats['count']} images but the split has {self.val_loader.num_samples}"
            )
        self._record_validation(epoch, stats, time.perf_counter() - start)
        return stats

    def _validation_tally(self, epoch: int) -> Tally | None:
        """This rank's sums over its validation shard; None when a stop request came during it."""
        tally = Tally(self.env.device)
        # Every rank has as many validation batches (the shards are padded alike), so every rank
        # agrees at the same batches. A validation can outlast a stop's deadline (torchrun's
        # --shutdown-timeout after Ctrl-C, a scheduler's grace time): a stop ends it before its
        # next batch, and the resumed run validates the epoch again.
        try:
            for (images, labels), stop, _ in self._agreed_batches(self.val_loader):
                if stop:
                    log.warning("stopping during the validation of epoch %d on %s: writing a checkpoint (a "
                                "resumed run validates the epoch)", epoch + 1,
                                self.reporter.failure or self.stop.reason())  # fmt: skip
                    return None
                result = eval_batch(self.model, images, labels, self.amp)  # one crop, or ten averaged
                tally.add(result.loss_sum, result.correct, result.count)
        except LoaderError as exc:
            # A loader that failed in a way nobody foresaw (memory run out) may have left its rank
            # unable to write a checkpoint, which all ranks write together or none: none.
            said = f"Validation stopped at step {self.progress.step}, {self._checkpoint_said()}"
            raise stopped_by(exc, f"{said}.") from exc
        except DataError as exc:
            # The epoch's steps are all taken and every training loader stands at its end: they
            # are kept, as a stop during the validation keeps them.
            try:
                self.save_checkpoint()
            except (CheckpointError, ConfigError) as unsaved:  # the bad file stays named
                said = f"Validation stopped, and the epoch's training could not be saved: {unsaved}"
                raise stopped_by(exc, said) from unsaved
            said = f"Validation stopped at step {self.progress.step}, {self._checkpoint_said()}"
            raise stopped_by(exc, f"{said}; the resumed run validates the epoch again.") from exc
        return tally

    def _best_ten_crop(self) -> bool:
        """Whether the run's best validation averaged ten crops; for a checkpoint from before that
        was kept, this session's setting."""
        kept = self.progress.best_ten_crop
        return self.cfg.data.val_ten_crop if kept is None else kept

    def _record_validation(self, epoch: int, stats: dict[str, float], elapsed: float) -> None:
        """Progress, the metrics file and then the plateau schedule take the validation's figures.
        The record's lr is the rate of the step before it, as a training record's is (it was the
        next step's, after the plateau's decision, and a cosine run's last validation said 0)."""
        p = self.progress
        ten_crop = self.cfg.data.val_ten_crop
        p.record_validation(stats["top1"], stats["top5"], stats["loss"], ten_crop, epoch + 1)
        self.reporter.validation(
            {
                "split": "val",
                "epoch": epoch + 1,
                "step": p.step,
                "loss": stats["loss"],
                "top1": stats["top1"],
                "top5": stats["top5"],
                "count": stats["count"],
                "ten_crop": ten_crop,
                "images_per_sec": stats["count"] / max(elapsed, 1e-9),
                "lr": self.schedule.lr_at(max(p.step - 1, 0)),
            }
        )
        # The plateau counts the validations of its cadence (every train.eval_every epochs) only:
        # the last epoch's, also run off it, had a 10-epoch run at eval_every=3 count epoch 10's
        # validation one epoch after epoch 9's, so that the run extended to 12 epochs trained its
        # last two at a tenth of the rate of a 12-epoch run.
        if (epoch + 1) % self.cfg.train.eval_every == 0 and self.schedule.observe_validation(stats["top1"]):
            log.info(
                "validation top-1 stopped improving: learning rate divided (reduction %d of %d)%s",
                self.schedule.plateau.reductions,
                self.cfg.schedule.max_reductions,
                ", for the epochs of a longer run" if epoch + 1 == self.cfg.train.epochs else "",
            )

    # ---- reporting ------------------------------------------------------------------------
    def _log_train(self, epoch: int, lr: float, tally: Tally, meter: Throughput, steps: int, batches) -> None:
        stats = tally.reduce(self.mesh.metric_group)
        speed = meter.read()
        payload, sent = self.comm.take()
        p = self.progress
        if p.comm_setup != self._comm_setup:  # another layout, world or batch sends other bytes per step
            # Reset at this session's first logged steps, not at its start: a session that
            # trains nothing keeps the figures of the steps the run took.
            p.comm_payload, p.comm_sent, p.comm_steps, p.comm_setup = {}, {}, 0, self._comm_setup
        for kind, value in payload.items():
            p.comm_payload[kind] = p.comm_payload.get(kind, 0) + value
        for kind, value in sent.items():
            p.comm_sent[kind] = p.comm_sent.get(kind, 0) + value
        p.comm_steps += steps
        self.reporter.train(
            {
                "split": "train",
                "epoch": epoch + 1,
                "step": self.progress.step,
                "steps": steps,  # those since the last record: train.log_every, fewer at a checkpoint or an epoch's end
                "count": stats["count"],
                "loss": stats["loss"],
                "top1": stats["top1"],
                "top5": stats["top5"],
                "images_per_sec": speed["images_per_sec"],
                "data_wait_share": speed["data_wait_share"],
                "lr": lr,
                # Of `steps`, those whose update was not applied: fp16's overflows (the scaler backs
                # off) and non-finite ones; counted as steps all the same (the lr and dropout counters).
                "skipped_steps": self._window_skipped,
                "comm_payload_mb": comm_per_step(payload, steps),
                "comm_sent_mb": comm_per_step(sent, steps),
            },
            batches,
        )
        tally.reset()
        meter.reset()
        self._window_skipped = 0

    def _log_start(self) -> None:
        cfg, plan = self.cfg, self.plan
        local = sum(p.numel() for p in self.model.parameters())
        width = "" if cfg.model.fc_width == FC_WIDTH else f", fc6/fc7 {cfg.model.fc_width} wide"
        log.info(
            "run %s: %s AlexNet, %d classes%s, %s parameters (%s on this rank); %s; world %d on %s (%s), amp %s",
            plan.run_dir,
            cfg.model.variant,
            self.num_classes,
            width,
            f"{self.full_parameters:,}",
            f"{local:,}",
            self.mesh.describe(),
            self.env.world_size,
            self.env.device.type,
            self.env.backend,
            self.amp.name,
        )
        log.info(
            "data: %s pipeline (%s), %d train / %d val images, batch %s per replica (global %d), "
            "%d steps per epoch, peak lr %.4g",
            cfg.data.pipeline,
            "no decoding" if cfg.data.pipeline == "synthetic" else f"{plan.decoder} decoding",
            self.train_loader.num_samples,
            self.val_loader.num_samples,
            describe_step_batch(cfg.data.batch_size, cfg.train.accum_steps),
            plan.global_batch,
            len(self.train_loader),
            plan.peak_lr,
        )
        if self.env.is_main:
            for problem in schedule_problems(cfg.schedule, cfg.train.epochs, plan.peak_lr, cfg.train.eval_every):
                log.warning("%s", problem)

    def _training_setup(self) -> dict[str, Any]:
        return {
            "world_size": self.env.world_size,
            "batch_size": self.cfg.data.batch_size,  # per replica
            "accum_steps": self.cfg.train.accum_steps,
            "global_batch": self.plan.global_batch,
            "parallel_mode": self.mesh.mode,
            "device": self.env.device.type,
            "amp": self.amp.name,
            "pipeline": self.cfg.data.pipeline,
            # the hybrid's parallel.fc_group as resolved (0: the processes per node); a resume compares it
            **({"fc_group": self.mesh.shape.model_size} if self.mesh.mode == "hybrid" else {}),
        }

    def _note_training_setup(self) -> None:
        """Once this session has taken a step, its setup is the one the run's latest steps were
        taken under: a rerun of a finished run under another world size or layout rewrote
        summary.json with its own, which had trained nothing."""
        if self.progress.step > self._first_step:
            self.progress.trained_under = self._training_setup()

    def _summarize_start(self) -> None:
        """Rank 0: summary.json says that a session runs, with the figures it starts from. The
        session before's stayed until this one's end: a rerun with more epochs killed by SIGKILL
        (the OOM killer, a node lost) left "completed": true beside its new epochs' records, and
        a scheduler reading it did not requeue the run."""
        self.reporter.write_summary(self._summary("running", 0.0))

    def _summarize_failure(self, exc: BaseException) -> None:
        """Rank 0: summary.json of a session that ended in an error says so. It kept the session
        before's "completed", next to the failed session's records in metrics.jsonl. The figures
        are this session's at the failure (the steps after the last checkpoint included: the
        metrics file holds them until a resume drops them)."""
        try:
            self._update_clock()
            summary = self._summary("error", time.perf_counter() - self._session_start)
            summary["error"] = describe_error(exc)
            self.reporter.write_summary(summary)
        except Exception as unwritten:  # the error itself is what the run reports
            log.warning("summary.json could not be updated after the error (%s)", unwritten)
        if self.cfg.run.plot:
            draw_run_curves(self.plan.run_dir)  # its failures are warnings

    def _summary(self, stop_reason: str, session_seconds: float) -> dict[str, Any]:
        p = self.progress
        return {
            "run_dir": str(self.plan.run_dir),
            "completed": not stop_reason and p.epoch >= self.cfg.train.epochs,
            "stop_reason": stop_reason or "completed",
            "epochs": p.epoch,
            "steps": p.step,
            "skipped_steps": p.skipped_steps,  # of `steps`, not applied (fp16 overflows, non-finite)
            "best_top1": p.best_top1,
            "best_top5": p.best_top5,
            "best_ten_crop": p.best_ten_crop,  # None: no validation, or one from before this was kept
            "best_epoch": p.best_epoch,  # the epoch of the best validation (None: as best_ten_crop)
            "final_top1": p.last_top1,
            "final_top5": p.last_top5,
            "train_images": p.images,
            "wall_seconds": p.train_seconds,
            "session_seconds": session_seconds,
            "images_per_sec": p.images / max(p.train_seconds, 1e-9),
            **(p.trained_under or self._training_setup()),
            "comm_payload_mb_per_step": comm_per_step(p.comm_payload, p.comm_steps),
            "comm_sent_mb_per_step": comm_per_step(p.comm_sent, p.comm_steps),
        }
