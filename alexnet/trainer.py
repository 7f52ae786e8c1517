"""Builds the parts of a run from its config and runs the epochs. No argparse, no globals."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alexnet.checkpoint import (
    LAST,
    PREVIOUS,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_model_state,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    unwrap,
)
from alexnet.config import Config, config_to_dict, write_config
from alexnet.data import DataSplits, build_loader, build_splits
from alexnet.engine import AmpPolicy, build_amp, eval_step, train_step
from alexnet.layers import DropoutContext
from alexnet.metrics import MetricsWriter, Tally, Throughput
from alexnet.model import build_model
from alexnet.optim import LrSchedule, build_optimizer
from alexnet.parallel.data_parallel import apply_data_parallel
from alexnet.parallel.env import DistEnv
from alexnet.parallel.mesh import Mesh
from alexnet.plan import RunPlan
from alexnet.stop import StopRequest

log = logging.getLogger("alexnet")


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken in total (also the dropout and lr counter)
    images: int = 0  # training images processed in total
    train_seconds: float = 0.0  # wall time spent in earlier sessions of this run
    best_top1: float = 0.0
    best_top5: float = 0.0
    last_top1: float = 0.0
    last_top5: float = 0.0
    nonfinite_streak: int = 0
    lr_reductions_logged: int = 0


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, mesh: Mesh, plan: RunPlan) -> None:
        self.cfg = cfg
        self.env = env
        self.mesh = mesh
        self.plan = plan
        self.progress = Progress()
        torch.manual_seed(cfg.train.seed)
        self.splits: DataSplits = build_splits(cfg.data, cfg.model.num_classes)
        num_classes = cfg.model.num_classes or len(self.splits.classes)
        memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.model: nn.Module = build_model(
            cfg.model.variant, num_classes, cfg.model.dropout, cfg.data.crop, cfg.model.init
        ).to(env.device, memory_format=memory_format)
        self.train_loader = build_loader(
            cfg.data, "train", self.splits, mesh, env.device, plan.decoder, plan.channels_last
        )
        self.val_loader = build_loader(cfg.data, "val", self.splits, mesh, env.device, plan.decoder, plan.channels_last)
        self.optimizer = build_optimizer(list(self.model.named_parameters()), cfg.optim, plan.peak_lr)
        self.schedule = LrSchedule(cfg.schedule, plan.peak_lr, len(self.train_loader), cfg.train.epochs)
        self.amp: AmpPolicy = build_amp(cfg.train.amp, env.device)
        self.ckpt_dir = plan.run_dir / "checkpoints"
        self._prepare_run_dir()
        self.resumed_from = self._resume()
        self.ddp = apply_data_parallel(self.model, env.device, cfg.parallel)
        self.writer = MetricsWriter(plan.run_dir, cfg.run.tensorboard) if env.is_main else None
        self.stop = StopRequest.from_environment(env.device)
        self.stop.install()
        self._session_start = time.perf_counter()
        self._seconds_before = self.progress.train_seconds
        self._sample_base = torch.arange(cfg.data.batch_size, device=env.device) + mesh.data_rank * cfg.data.batch_size

    # ---- run folder and checkpoints -------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        resume = self.cfg.checkpoint.resume
        has_ckpt = (self.ckpt_dir / LAST).exists()
        if resume == "none" and has_ckpt:
            raise CheckpointError(
                f"run folder {self.plan.run_dir} already holds checkpoints; set checkpoint.resume=auto to "
                "continue it, or run.name=<new name> to start another run (nothing was overwritten)"
            )
        if self.env.is_main:
            self.plan.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.cfg, self.plan.run_dir / "config.yaml")
        self._barrier()

    def _resume_candidates(self) -> list[Path]:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return []
        if resume == "auto":
            return [p for p in (self.ckpt_dir / LAST, self.ckpt_dir / PREVIOUS) if p.exists()]
        return [Path(resume).expanduser()]

    def _resume(self) -> Path | None:
        candidates = self._resume_candidates()
        for i, path in enumerate(candidates):
            try:
                payload = load_checkpoint(path)
                self._restore(payload, path)
                log.info("resumed from %s at epoch %d, step %d", path, self.progress.epoch, self.progress.step)
                return path
            except CheckpointError as exc:
                if self.cfg.checkpoint.resume != "auto" or i == len(candidates) - 1:
                    raise
                log.warning("%s; falling back to %s", exc, candidates[i + 1])
        return None

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        load_model_state(self.model, payload["model"], path)
        params = dict(self.model.named_parameters())
        load_optimizer_state_by_name(self.optimizer, payload["optimizer"], params)
        self.schedule.load_state_dict(payload["schedule"])
        if self.amp.scaler is not None and payload.get("scaler"):
            self.amp.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        loader_states = payload["loaders"]["train"]
        mine = loader_states.get(str(self.mesh.data_rank))
        if (
            mine is not None
            and mine.get("num_shards", self.mesh.data_size) == self.mesh.data_size
            and len(loader_states) == self.mesh.data_size
        ):
            self.train_loader.load_state_dict(mine)
        else:
            # Another data-parallel size: the interrupted epoch restarts under the new sharding,
            # for its remaining steps only; exact replay needs the same number of data shards.
            log.warning(
                "checkpoint %s was written with %d data shards, this run has %d: the data order of the "
                "interrupted epoch is not replayed exactly",
                path,
                len(loader_states),
                self.mesh.data_size,
            )
            any_state = next(iter(loader_states.values()))
            self.train_loader.load_state_dict({**any_state, "dali": None, "num_shards": self.mesh.data_size})

    def _gather_loader_states(self) -> dict[str, Any]:
        state = (self.mesh.data_rank, self.train_loader.state_dict())
        if self.env.distributed:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, state)
        else:
            gathered = [state]
        return {str(rank): s for rank, s in gathered}

    def _update_clock(self) -> None:
        self.progress.train_seconds = self._seconds_before + time.perf_counter() - self._session_start

    def save_checkpoint(self) -> None:
        self._update_clock()
        loaders = self._gather_loader_states()  # a collective: every rank calls it
        if self.env.is_main:
            names = {p: n for n, p in self.model.named_parameters()}
            payload = {
                "format": 1,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": optimizer_state_by_name(self.optimizer, names),
                "schedule": self.schedule.state_dict(),
                "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else {},
                "progress": asdict(self.progress),
                "loaders": {"train": loaders},
                "rng": {"torch": torch.get_rng_state()},
                "config": config_to_dict(self.cfg),
                "world": {"world_size": self.env.world_size, "data_size": self.mesh.data_size, "mode": self.mesh.mode},
            }
            atomic_save(payload, self.ckpt_dir)
        self._barrier()

    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._log_start()
        stop_reason = ""
        for epoch in range(self.progress.epoch, cfg.train.epochs):
            stop_reason = self._train_epoch(epoch)
            if stop_reason:
                break
            last = epoch + 1 == cfg.train.epochs
            if last or (epoch + 1) % cfg.train.eval_every == 0:
                self._validate(epoch)
            self.progress.epoch = epoch + 1
            self.save_checkpoint()
        if stop_reason:
            self.save_checkpoint()
        self._update_clock()
        summary = self._summary(stop_reason, time.perf_counter() - self._session_start)
        if self.env.is_main:
            (self.plan.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._log_summary(summary)
        if self.writer is not None:
            self.writer.close()
        return summary

    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.progress.step

    def _train_epoch(self, epoch: int) -> str:
        """Run the rest of this epoch; returns why it stopped early ("" when it did not)."""
        if self._reached_max_steps():
            return "max_steps"
        cfg, p = self.cfg, self.progress
        self.ddp.train()
        tally = Tally(self.env.device)
        meter = Throughput()
        batches = self._progress_bar(self.train_loader, epoch)
        waited = time.perf_counter()
        for images, labels in batches:
            data_wait = time.perf_counter() - waited
            lr = self.schedule.apply(self.optimizer, p.step)
            dropout = DropoutContext(cfg.train.seed, p.step, self._sample_base[: labels.shape[0]])
            result = train_step(self.ddp, images, labels, self.optimizer, self.amp, dropout, cfg.train.grad_clip)
            p.step += 1
            p.images += labels.shape[0] * self.mesh.data_size
            p.nonfinite_streak = 0 if result.applied else p.nonfinite_streak + 1
            if p.nonfinite_streak >= cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{p.nonfinite_streak} consecutive steps with a non-finite loss at step {p.step} (lr {lr:.3g}); "
                    "lower optim.lr or use train.amp=bf16/off. The last good checkpoint is kept."
                )
            tally.add(result.loss_sum, result.correct, result.count)
            meter.add(labels.shape[0] * self.mesh.data_size, data_wait)
            if p.step % cfg.train.log_every == 0:
                self._log_train(epoch, lr, tally, meter, batches)
            if cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            if self._reached_max_steps():
                return "max_steps"
            if self.stop.agreed():
                log.warning("stopping at step %d on %s: writing a checkpoint", p.step, self.stop.reason())
                return "preempted"
            waited = time.perf_counter()
        return ""

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        model = unwrap(self.ddp)
        model.eval()
        tally = Tally(self.env.device)
        start = time.perf_counter()
        for images, labels in self.val_loader:
            result = eval_step(model, images, labels, self.amp)
            tally.add(result.loss_sum, result.correct, result.count)
        stats = tally.reduce(self.mesh.metric_group)
        if stats["count"] != self.val_loader.num_samples:
            raise RuntimeError(
                f"validation counted {stats['count']} images but the split has {self.val_loader.num_samples}"
            )
        elapsed = time.perf_counter() - start
        p = self.progress
        p.last_top1, p.last_top5 = stats["top1"], stats["top5"]
        if stats["top1"] > p.best_top1:
            p.best_top1, p.best_top5 = stats["top1"], stats["top5"]
        if self.schedule.observe_validation(stats["top1"]):
            log.info(
                "validation top-1 stopped improving: learning rate divided (reduction %d)",
                self.schedule.plateau.reductions,
            )
        record = {
            "split": "val",
            "epoch": epoch + 1,
            "step": p.step,
            "loss": stats["loss"],
            "top1": stats["top1"],
            "top5": stats["top5"],
            "count": stats["count"],
            "images_per_sec": stats["count"] / max(elapsed, 1e-9),
            "lr": self.schedule.lr_at(p.step),
        }
        self._emit(record)
        log.info(
            "epoch %d/%d  val loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d images)",
            epoch + 1,
            self.cfg.train.epochs,
            stats["loss"],
            stats["top1"],
            stats["top5"],
            stats["count"],
        )
        return stats

    # ---- reporting ------------------------------------------------------------------------
    def _progress_bar(self, loader, epoch: int):
        mode = self.cfg.run.progress
        show = self.env.is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        if not show:
            return loader
        from tqdm import tqdm

        return tqdm(
            loader,
            total=len(loader),
            desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            leave=False,
            dynamic_ncols=True,
        )

    def _emit(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def _log_train(self, epoch: int, lr: float, tally: Tally, meter: Throughput, batches) -> None:
        stats = tally.reduce(self.mesh.metric_group)
        speed = meter.read()
        record = {
            "split": "train",
            "epoch": epoch + 1,
            "step": self.progress.step,
            "loss": stats["loss"],
            "top1": stats["top1"],
            "top5": stats["top5"],
            "images_per_sec": speed["images_per_sec"],
            "data_wait_share": speed["data_wait_share"],
            "lr": lr,
        }
        self._emit(record)
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(
                loss=f"{stats['loss']:.3f}", top1=f"{stats['top1']:.1f}", img_s=f"{speed['images_per_sec']:.0f}"
            )
        else:
            log.info(
                "epoch %d  step %d  loss %.4f  top-1 %.2f%%  lr %.4g  %.0f img/s  data wait %.0f%%",
                epoch + 1,
                self.progress.step,
                stats["loss"],
                stats["top1"],
                lr,
                speed["images_per_sec"],
                100 * speed["data_wait_share"],
            )
        tally.reset()
        meter.reset()

    def _log_start(self) -> None:
        cfg, plan = self.cfg, self.plan
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "run %s: %s AlexNet (%s parameters, %d classes), %s, world %d on %s (%s), amp %s",
            plan.run_dir,
            cfg.model.variant,
            f"{n_params:,}",
            len(self.splits.classes) if not cfg.model.num_classes else cfg.model.num_classes,
            self.mesh.describe(),
            self.env.world_size,
            self.env.device.type,
            self.env.backend,
            self.amp.name,
        )
        log.info(
            "data: %s pipeline (%s decoding), %d train / %d val images, batch %d per replica (global %d), "
            "%d steps per epoch, peak lr %.4g",
            cfg.data.pipeline,
            plan.decoder,
            self.train_loader.num_samples,
            self.val_loader.num_samples,
            cfg.data.batch_size,
            plan.global_batch,
            len(self.train_loader),
            plan.peak_lr,
        )

    def _summary(self, stop_reason: str, session_seconds: float) -> dict[str, Any]:
        p = self.progress
        return {
            "run_dir": str(self.plan.run_dir),
            "completed": not stop_reason and p.epoch >= self.cfg.train.epochs,
            "stop_reason": stop_reason or "completed",
            "epochs": p.epoch,
            "steps": p.step,
            "best_top1": p.best_top1,
            "best_top5": p.best_top5,
            "final_top1": p.last_top1,
            "final_top5": p.last_top5,
            "train_images": p.images,
            "wall_seconds": p.train_seconds,
            "session_seconds": session_seconds,
            "images_per_sec": p.images / max(p.train_seconds, 1e-9),
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "amp": self.amp.name,
            "pipeline": self.cfg.data.pipeline,
        }

    def _log_summary(self, s: dict[str, Any]) -> None:
        state = "finished" if s["completed"] else "stopped (resume with the same command)"
        log.info(
            "%s after %d epochs / %d steps: best val top-1 %.2f%% (top-5 %.2f%%), final top-1 %.2f%%, "
            "%.0f s of training, %.0f images/s; run folder %s",
            state,
            s["epochs"],
            s["steps"],
            s["best_top1"],
            s["best_top5"],
            s["final_top1"],
            s["wall_seconds"],
            s["images_per_sec"],
            s["run_dir"],
        )
