"""Numbers derived from the config and the environment, computed once (the Config stays as loaded)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from alexnet.config import Config, ConfigError, is_folder_name
from alexnet.model import build_model
from alexnet.optim import scaled_lr
from alexnet.parallel.env import DistEnv
from alexnet.parallel.mesh import Mesh


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    global_batch: int
    peak_lr: float
    channels_last: bool
    decoder: str  # "mixed" or "cpu"


def default_run_name(config_path: str | None) -> str:
    """The config file's name, plus the Slurm job id when there is one, so that a requeued job
    finds its own run folder again."""
    name = Path(config_path).stem if config_path else "demo"
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        name = f"{name}-{job}" + (f"_{task}" if task else "")
    return name


def with_run_name(cfg: Config, config_path: str | None) -> Config:
    """`cfg` with run.name resolved, so that the config.yaml written into the run folder names
    that folder: `train.py --config runs/<name>/config.yaml` then resumes the run (with the name
    left empty it started a new run in runs/config)."""
    if cfg.run.name:
        return cfg
    return replace(cfg, run=replace(cfg.run, name=run_name(cfg, config_path)))


def run_name(cfg: Config, config_path: str | None) -> str:
    """run.name, or the name made from the config file's when it is empty, checked as run.name is
    (validate_config): a file named `...yaml` (stem "..") would put the run outside run.root."""
    if cfg.run.name:
        return cfg.run.name
    name = default_run_name(config_path)
    if not is_folder_name(name):
        raise ConfigError(
            f"config key 'run.name' is empty and the config file's name {config_path!r} makes {name!r}, "
            "not a folder name inside run.root; set run.name"
        )
    return name


def build_plan(cfg: Config, env: DistEnv, mesh: Mesh, config_path: str | None) -> RunPlan:
    run_dir = Path(cfg.run.root).expanduser() / run_name(cfg, config_path)
    # An optimizer step's images: with gradient accumulation, accum_steps batches per replica.
    global_batch = cfg.data.batch_size * mesh.data_size * cfg.train.accum_steps
    on_cuda = env.device.type == "cuda"
    # NHWC suits cuDNN and oneDNN (CPU) convolutions alike: at 227 pixels the paper model's CPU
    # step is about 10% faster in it.
    channels_last = cfg.train.channels_last
    decoder = cfg.data.decoder if cfg.data.decoder != "auto" else ("mixed" if on_cuda else "cpu")
    # Both checked here, before the run folder exists: a value that cannot work on this machine
    # stops the run with its key's name, not with a traceback from deep in the setup.
    if decoder == "mixed" and not on_cuda:
        raise ConfigError(
            "config key 'data.decoder' is 'mixed' (GPU decoding) but no CUDA device is in use; use cpu or auto"
        )
    if cfg.train.amp == "fp16" and not on_cuda:
        raise ConfigError("config key 'train.amp' is 'fp16', which needs a CUDA device; use bf16 or off on the CPU")
    peak_lr = scaled_lr(cfg.optim, global_batch)
    if not math.isfinite(peak_lr):  # optim.lr is finite, but not once scaled (1.7e308 x 2)
        raise ConfigError(
            f"config key 'optim.lr' is {cfg.optim.lr:g}, which scaled to the global batch {global_batch} "
            f"(x {global_batch} / optim.lr_reference_batch {cfg.optim.lr_reference_batch}) is not a finite number",
            ("optim.lr",),
        )
    return RunPlan(run_dir, global_batch, peak_lr, channels_last, decoder)


def build_run_model(cfg: Config, num_classes: int, plan: RunPlan, device: torch.device, variant: str = "") -> nn.Module:
    """The single-device model every rank starts from, seeded alike on every rank (identical
    everywhere before any layout splits it), on `device` in the run's memory format. `variant`:
    another than model.variant (the step benchmark times both)."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = build_model(variant or m.variant, num_classes, m.dropout, cfg.data.crop, m.init, m.fc_width)  # type: ignore[arg-type]
    return model.to(device, memory_format=torch.channels_last if plan.channels_last else torch.contiguous_format)
