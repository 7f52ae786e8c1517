"""Training on real files, next to the same training on synthetic data, interleaved.

Why not run alexnet.trainer.Trainer and read its metrics.jsonl? Its throughput windows include
the pipeline's start-up at each epoch, its data-wait share is all it can say about where a step's
time goes, and two runs (real, synthetic) would be minutes apart on a machine whose
load drifts. So this builds the trainer's parts with the trainer's own builders (the config,
alexnet.data.build_splits/build_loader, the model, apply_parallelism, the optimizer, train_step)
and times the same step on each batch source in turns: the ratio of real to synthetic images/s is
paired round by round, and the split of a step is the one the step benchmark measures. One model
serves every contender (same layout; its weights do not change the time of a step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from alexnet.bench.envinfo import collect_environment
from alexnet.bench.flops import count_train_flops
from alexnet.bench.output import Report
from alexnet.bench.step_bench import (
    SPLIT_NOTES,
    ContenderInfo,
    build_full_model,
    build_train_parts,
    progress_printer,
    synthetic_batches,
    train_result,
)
from alexnet.bench.timing import BenchSettingsError, Schedule, paired_ratio, run_interleaved, wait_until_idle
from alexnet.bench.training import TrainContender, endless, sync
from alexnet.config import Config, config_to_dict
from alexnet.data import build_loader, build_splits, dali_problem
from alexnet.parallel.agree import SETUP_ERRORS, LoaderError, share_setup_failure
from alexnet.parallel.env import DistEnv
from alexnet.parallel.mesh import build_mesh
from alexnet.plan import build_plan
from pipelines.filecheck import stopped_by
from pipelines.index import DataError

REAL_PIPELINES = ("dali", "torchvision")


@dataclass(frozen=True)
class E2ESettings:
    pipelines: tuple[str, ...] = ()  # () = the config's data.pipeline
    synthetic: bool = True
    steps: int = 3
    schedule: Schedule = Schedule(1, 4)
    breakdown: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BenchSettingsError(f"--steps must be at least 1, got {self.steps}")
        for name in self.pipelines:
            if name not in REAL_PIPELINES:
                raise BenchSettingsError(
                    f"--pipelines: {name!r} is not a real-data pipeline (choose dali or torchvision)"
                )


def _pipelines(cfg: Config, s: E2ESettings) -> tuple[str, ...]:
    if s.pipelines:
        return s.pipelines
    if cfg.data.pipeline not in REAL_PIPELINES:
        raise BenchSettingsError(
            "the e2e benchmark reads real files: set data.pipeline=dali or torchvision, or --pipelines"
        )
    return (cfg.data.pipeline,)


def check_e2e_installed(pipelines: tuple[str, ...]) -> None:
    """The libraries of the loaders to be timed: without DALI, every rank of the README's e2e
    command (the demo recipe reads with DALI) died in an import traceback, after generating
    --dataset's images, and a sweep of it named only a line of torchrun's own traceback."""
    problem = dali_problem() if "dali" in pipelines else None
    if problem is not None:
        raise BenchSettingsError(
            f"the e2e benchmark would read with DALI (--pipelines, or the config's data.pipeline), and {problem}; "
            "use --pipelines torchvision"
        )


def lead_in_steps(cfg: Config, pipeline: str) -> int:
    """Batches a loader holds ready after the machine settled: they arrive for free, so they are
    consumed untimed (DALI: its queue depth; DataLoader: workers x prefetch_factor)."""
    return cfg.data.prefetch * (max(cfg.data.num_threads, 1) if pipeline == "torchvision" else 1)


def run_e2e_bench(cfg: Config, env: DistEnv, s: E2ESettings) -> Report | None:
    """Every rank runs it; rank 0 gets the report, the others None."""
    pipelines = _pipelines(cfg, s)
    mesh = build_mesh(env, cfg.parallel.mode, cfg.parallel.fc_group)
    plan = build_plan(cfg, env, mesh, None)
    splits, loaders, failure = None, {}, None
    try:  # each rank reads the data on its own, and can fail alone (a data folder its node lacks)
        # read for DALI where it is measured: its PCA lighting (data.lighting_std) comes with the splits
        read_as = dataclasses.replace(cfg.data, pipeline="dali") if "dali" in pipelines else cfg.data
        splits = build_splits(read_as, cfg.model.num_classes, warn_unread=env.is_main)
        for pipeline in pipelines:
            data_cfg = dataclasses.replace(cfg.data, pipeline=pipeline)
            loaders[pipeline] = build_loader(data_cfg, "train", splits, mesh, env.device, plan.decoder,
                                             plan.channels_last)  # fmt: skip
    except SETUP_ERRORS as exc:
        failure = exc
    share_setup_failure(failure)
    assert splits is not None  # else that raised
    num_classes = cfg.model.num_classes or len(splits.classes)
    model = build_full_model(cfg.model.variant, cfg, num_classes, plan, env.device)
    flops = count_train_flops(model, cfg.data.batch_size, cfg.data.crop)
    parts = build_train_parts(model, cfg, env, mesh, plan)
    images_per_step = cfg.data.batch_size * mesh.data_size
    breakdown = s.breakdown and env.world_size > 1
    contenders, infos = [], []
    for pipeline, loader in loaders.items():
        name = f"e2e/{pipeline}"
        contenders.append(
            TrainContender(name, parts, endless(loader), s.steps, images_per_step, env.device, breakdown,
                           lead_in=lead_in_steps(cfg, pipeline))
        )  # fmt: skip
        infos.append(ContenderInfo(name, cfg.parallel.mode, cfg.model.variant, mesh.data_size, flops))
    if s.synthetic:
        batches = synthetic_batches(cfg, num_classes, mesh, plan, env.device)
        contenders.append(TrainContender("synthetic", parts, batches, s.steps, images_per_step, env.device, breakdown))
        infos.append(ContenderInfo("synthetic", cfg.parallel.mode, cfg.model.variant, mesh.data_size, flops))

    def settle() -> None:
        # A loader's prefetching would otherwise run into the next contender's window.
        wait_until_idle(lambda: sync(env.device))
        if env.distributed:
            dist.barrier()

    try:
        timed = run_interleaved(contenders, s.schedule, between=settle, progress=progress_printer(env, s.schedule))
    except (DataError, LoaderError) as exc:  # a bad file met by training's loaders, or a rank's loader failed
        raise stopped_by(exc, "The e2e benchmark stopped.") from exc
    finally:
        for loader in loaders.values():  # their worker processes stop now, not killed at the exit
            loader.close()
    if not env.is_main:
        return None
    amp_name = parts.amp.name
    results = [train_result(info, timed[info.name], cfg, env, amp_name) for info in infos]
    for r in results:
        r["pipeline"] = r["name"].split("/", 1)[1] if r["name"].startswith("e2e/") else "synthetic"
        r["decoder"] = plan.decoder if r["pipeline"] == "dali" else None
    summary: dict[str, Any] = {}
    if s.synthetic:
        for pipeline in pipelines:
            ratio = paired_ratio(timed[f"e2e/{pipeline}"], timed["synthetic"]).as_dict()
            summary[f"e2e/{pipeline} / synthetic"] = ratio
    settings = {
        "pipelines": list(pipelines), "synthetic": s.synthetic, "steps_per_window": s.steps,
        "warmup": s.schedule.warmup, "windows": s.schedule.windows, "breakdown": breakdown,
        "decoder": plan.decoder, "num_classes": num_classes, "train_images": len(splits.train or []),
        "data_root": cfg.data.root, "learning_rate": 0.0, "config": config_to_dict(cfg),
    }  # fmt: skip
    notes = [
        "e2e / synthetic: paired ratio of images/s; near 1 means the input pipeline keeps up with training",
        *SPLIT_NOTES,
    ]
    return Report("e2e", results, collect_environment(env.world_size, cfg.parallel.mode), settings, summary, notes)
