"""Training steps on synthetic on-device data: compute and communication, no input pipeline.

Run under torchrun (one process works too). Every contender is one (layout, model variant) built
as the trainer builds it (alexnet.parallel.apply.apply_parallelism, alexnet.optim.build_optimizer,
alexnet.engine.train_step); all of them live side by side and run interleaved. With
`compare_torchvision` a plain `torchvision.models.alexnet` at the same batch and input size joins
them (data-parallel, like any other model), the yardstick for the project's models.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from alexnet.bench.envinfo import collect_environment, device_name
from alexnet.bench.flops import count_train_flops, mfu, peak_flops, precision_of
from alexnet.bench.output import Column, Report
from alexnet.bench.profile import profile_steps
from alexnet.bench.timing import BenchSettingsError, Schedule, Window, paired_ratio, run_interleaved, summarize
from alexnet.bench.training import TrainContender, TrainParts, comm_bytes, endless, step_split
from alexnet.config import Config, config_to_dict
from alexnet.engine import build_amp
from alexnet.layers import step_sample_rows
from alexnet.model import FC_WIDTH, fc_width_fits, min_input_size
from alexnet.optim import build_optimizer
from alexnet.parallel.apply import apply_parallelism, example_batch
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import DistEnv
from alexnet.parallel.mesh import LayoutError, Mesh, build_mesh
from alexnet.plan import RunPlan, build_plan, build_run_model
from pipelines.base import ShardSpec
from pipelines.synthetic import SyntheticLoader

REFERENCE = "torchvision.models.alexnet"
MODES = ("dp", "towers", "hybrid")


@dataclass(frozen=True)
class StepSettings:
    modes: tuple[str, ...] = ()  # () = every layout the world size allows
    variants: tuple[str, ...] = ()  # () = the config's model.variant
    compare_torchvision: bool = False
    steps: int = 3  # steps per window
    schedule: Schedule = Schedule()
    breakdown: bool = True  # also run the no_sync windows that split compute from communication
    profile: int = 0  # steps per contender under torch.profiler after the timed windows (0: none)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BenchSettingsError(f"--steps must be at least 1, got {self.steps}")
        if self.profile < 0:
            raise BenchSettingsError(f"--profile must be 0 (off) or a number of steps, got {self.profile}")
        for mode in self.modes:
            if mode not in MODES:
                raise BenchSettingsError(f"--modes: unknown layout {mode!r} (choose from {', '.join(MODES)})")
        for variant in self.variants:
            if variant not in ("paper", "torchvision"):
                raise BenchSettingsError(f"--variants: unknown variant {variant!r} (choose paper or torchvision)")
        for flag, names in (("--modes", self.modes), ("--variants", self.variants)):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # each is one contender: a second one of the same name is refused by the timing
                raise BenchSettingsError(f"{flag}: {', '.join(twice)} given twice")


def default_modes(world: int) -> tuple[str, ...]:
    """dp always; towers on an even world; hybrid from two ranks (with one it is dp)."""
    modes = ["dp"]
    if world % 2 == 0:
        modes.append("towers")
    if world > 1:
        modes.append("hybrid")
    return tuple(modes)


def num_classes_of(cfg: Config, data_classes: int | None = None) -> int:
    return cfg.model.num_classes or data_classes or 1000


def build_train_parts(model: nn.Module, cfg: Config, env: DistEnv, mesh: Mesh, plan: RunPlan) -> TrainParts:
    """`model`: the full single-device model on the device; it becomes this rank's part."""
    counter = CommCounter()
    example = example_batch(cfg.data.crop, env.device, plan.channels_last)
    par = apply_parallelism(model, env, mesh, cfg.parallel, counter, example)
    # A benchmark times steps, not learning: at a learning rate of 0 the optimizer does all its
    # arithmetic but the weights stay as initialised, so every window of every contender computes
    # on the same numbers (a model that memorizes the one synthetic batch, or diverges, changes the
    # cost of a step through denormal floats or skipped steps).
    optimizer = build_optimizer(list(par.local.named_parameters()), cfg.optim, lr=0.0)
    batch = cfg.data.batch_size
    (sample_base,) = step_sample_rows(batch, mesh.data_rank, 1, env.device)
    return TrainParts(
        par.module, optimizer, build_amp(cfg.train.amp, env.device), counter, par.layout.after_backward(),
        sample_base, cfg.train.seed, cfg.train.grad_clip,
    )  # fmt: skip


def build_full_model(variant: str, cfg: Config, num_classes: int, plan: RunPlan, device: torch.device) -> nn.Module:
    """The single-device model every rank starts from (same seed: identical on every rank)."""
    if variant != REFERENCE:  # as the trainer builds it
        return build_run_model(cfg, num_classes, plan, device, variant)
    torch.manual_seed(cfg.train.seed)
    model = torchvision.models.alexnet(num_classes=num_classes, dropout=cfg.model.dropout)
    return model.to(device, memory_format=torch.channels_last if plan.channels_last else torch.contiguous_format)


def synthetic_batches(cfg: Config, num_classes: int, mesh: Mesh, plan: RunPlan, device: torch.device):
    shard = ShardSpec(mesh.data_rank, mesh.data_size, cfg.data.batch_size, cfg.data.seed)
    loader = SyntheticLoader("train", cfg.data.crop, num_classes, shard, 1_000_000, device, plan.channels_last)
    return endless(loader)


@dataclass(frozen=True)
class ContenderInfo:
    name: str
    mode: str
    variant: str
    data_size: int  # data-parallel replicas: images per step = batch x data_size
    flops_per_replica_batch: int


def train_result(
    info: ContenderInfo, windows: list[Window], cfg: Config, env: DistEnv, amp_name: str
) -> dict[str, Any]:
    """One results entry: throughput, the split of a step, bytes, FLOPs and MFU."""
    ips = summarize([w.images_per_sec for w in windows])
    split = step_split(windows, env.world_size)
    global_batch = cfg.data.batch_size * info.data_size
    # From the throughput's median, not a median of its own: with an even number of windows the
    # two medians average different middle windows, and step time, MFU and images/s disagreed.
    step_s = global_batch / ips.median
    flops_per_step = info.flops_per_replica_batch * info.data_size
    peak = peak_flops(device_name(env.device), precision_of(amp_name)) if env.device.type == "cuda" else None
    achieved = flops_per_step / step_s / env.world_size
    return {
        "name": info.name,
        "mode": info.mode,
        "variant": info.variant,
        "world_size": env.world_size,
        "batch_per_replica": cfg.data.batch_size,
        "global_batch": global_batch,
        "crop": cfg.data.crop,
        "amp": amp_name,
        "images_per_sec": ips.median,
        "images_per_sec_min": ips.min,
        "images_per_sec_max": ips.max,
        "images_per_sec_per_gpu": ips.median / env.world_size,
        "step_ms": 1000 * step_s,
        "mean_step_ms": 1000 * split["step_s"],  # what split_ms adds up to (step_ms is the slowest rank's)
        "split_ms": {k.removesuffix("_s"): None if v is None else 1000 * v for k, v in split.items() if k != "step_s"},
        "split_share": {k.removesuffix("_s"): None if v is None else v / split["step_s"]
                        for k, v in split.items() if k != "step_s"},
        "comm_mb_per_step": _megabytes(comm_bytes(windows)),
        "flops_per_step": flops_per_step,
        "achieved_tflops_per_device": achieved / 1e12,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": mfu(flops_per_step, step_s, env.world_size, peak),
        "windows": ips.n,
        "window_images_per_sec": [w.images_per_sec for w in windows],
    }  # fmt: skip


def _megabytes(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _megabytes(v) if isinstance(v, dict) else v / 1e6 for k, v in tree.items()}


TABLE = [
    Column("name", "contender"),
    Column("images_per_sec", "images/s", "{:.1f}"),
    Column("images_per_sec_per_gpu", "per rank", "{:.1f}"),
    Column("step_ms", "step ms", "{:.1f}"),
    Column("split_share.data_wait", "data", "{:.0%}"),
    Column("split_share.compute", "compute", "{:.0%}"),
    Column("split_share.grad_comm", "grad comm", "{:.0%}"),
    Column("split_share.exchange", "exchange", "{:.0%}"),
    Column("comm_mb_per_step.sent_total", "sent MB/step", "{:.1f}"),
    Column("achieved_tflops_per_device", "TFLOP/s", "{:.3f}"),
    Column("mfu", "MFU", "{:.1%}"),
]


def progress_printer(env: DistEnv, schedule: Schedule):
    def progress(rnd: int, name: str, w: Window) -> None:
        if env.is_main:
            tag = "warm-up" if rnd < schedule.warmup else f"window {rnd - schedule.warmup + 1}"
            print(f"  {tag:>9}  {name:<34} {w.images_per_sec:9.1f} images/s", file=sys.stderr, flush=True)

    return progress


def _plan_contenders(s: StepSettings, cfg: Config, world: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(mode, variant) pairs to build, and notes on the ones that cannot run."""
    modes = s.modes or default_modes(world)
    variants = s.variants or ((cfg.model.variant,) if not s.compare_torchvision else ("paper", "torchvision"))
    pairs, notes = [], []
    width = cfg.model.fc_width
    for variant in variants:
        for mode in modes:
            if not fc_width_fits(variant, width):
                notes.append(f"{mode}/paper skipped: model.fc_width={width} is odd, and its towers hold half each")
            elif cfg.data.crop < min_input_size(variant):  # type: ignore[arg-type]
                notes.append(f"{mode}/{variant} skipped: data.crop={cfg.data.crop} is below the smallest input its "
                             f"pooling allows ({min_input_size(variant)})")  # type: ignore[arg-type]  # fmt: skip
            elif mode == "towers" and variant != "paper":
                notes.append(f"towers/{variant} skipped: the tower split exists only for the paper variant")
            elif mode in ("towers", "hybrid") and world == 1:
                notes.append(f"{mode}/{variant} skipped: it needs at least 2 processes")
            elif mode == "towers" and world % 2:
                notes.append(f"towers/{variant} skipped: it needs an even number of processes")
            else:
                pairs.append((mode, variant))
    if s.compare_torchvision:
        pairs.append(("dp", REFERENCE))
        if width != FC_WIDTH:
            notes.append(f"model.fc_width={width}: fc6 and fc7 of {REFERENCE} stay {FC_WIDTH} wide")
    return pairs, notes


def run_step_bench(cfg: Config, env: DistEnv, s: StepSettings) -> Report | None:
    """Every rank runs it; rank 0 gets the report, the others None."""
    pairs, notes = _plan_contenders(s, cfg, env.world_size)
    if not pairs:
        raise LayoutError(f"nothing to measure on {env.world_size} process(es): {'; '.join(notes)}")
    if env.is_main:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    num_classes = num_classes_of(cfg)
    contenders, infos = [], []
    amp_name = build_amp(cfg.train.amp, env.device).name
    breakdown = s.breakdown and env.world_size > 1  # one process communicates nothing to split off
    for mode, variant in pairs:
        mesh = build_mesh(env, mode, cfg.parallel.fc_group)
        plan = build_plan(cfg, env, mesh, None)
        model = build_full_model(variant, cfg, num_classes, plan, env.device)
        flops = count_train_flops(model, cfg.data.batch_size, cfg.data.crop)
        parts = build_train_parts(model, cfg, env, mesh, plan)
        name = f"{mode}/{variant}"
        batches = synthetic_batches(cfg, num_classes, mesh, plan, env.device)
        images_per_step = cfg.data.batch_size * mesh.data_size
        contenders.append(TrainContender(name, parts, batches, s.steps, images_per_step, env.device, breakdown))
        infos.append(ContenderInfo(name, mode, variant, mesh.data_size, flops))
    barrier = (lambda: dist.barrier()) if env.distributed else None
    timed = run_interleaved(contenders, s.schedule, between=barrier, progress=progress_printer(env, s.schedule))
    profiles = {c.name: profile_steps(c.run_steps, s.profile, env.device) for c in contenders} if s.profile else {}
    if not env.is_main:
        return None
    results = [train_result(info, timed[info.name], cfg, env, amp_name) for info in infos]
    for result in results:
        if result["name"] in profiles:
            table, top = profiles[result["name"]]
            print(f"profile of {result['name']}, {s.profile} steps on rank 0:\n{table}")
            result["profile"] = top
    summary = compare_contenders(timed, infos)
    settings = {
        "modes": sorted({i.mode for i in infos}), "steps_per_window": s.steps, "warmup": s.schedule.warmup,
        "windows": s.schedule.windows, "breakdown": breakdown, "compare_torchvision": s.compare_torchvision,
        "profile_steps": s.profile,
        "num_classes": num_classes, "data": "synthetic, on the device", "learning_rate": 0.0,
        "config": config_to_dict(cfg),
    }  # fmt: skip
    notes = [*notes, *SPLIT_NOTES]
    environment = collect_environment(env.world_size, settings["modes"])
    return Report("step", results, environment, settings, summary, notes)


SPLIT_NOTES = [
    "images_per_sec: images of all ranks per second (median of windows; window time = slowest rank); "
    "per rank = total / world size",
    "step_ms: the slowest rank's step (the window's time); split_ms: the ranks' mean step in parts, adding up "
    "to mean_step_ms; split_share: each part over mean_step_ms",
    "split: data wait; compute = no_sync step minus timed exchanges; grad comm = full step minus no_sync "
    "step (exposed all-reduce) plus blocking FC-slice all-reduces; exchange = timed activation exchanges",
    "comm_mb_per_step: per rank; payload = handed to collectives, sent = on the wire under ring algorithms",
]


def compare_contenders(timed: dict[str, list[Window]], infos: list[ContenderInfo]) -> dict[str, Any]:
    """Paired ratios: each contender over the torchvision reference (when present) and each
    split layout over dp with the same variant."""
    summary: dict[str, Any] = {}
    ref = f"dp/{REFERENCE}"
    for info in infos:
        if info.name != ref and ref in timed:
            summary[f"{info.name} / {ref}"] = paired_ratio(timed[info.name], timed[ref]).as_dict()
        base = f"dp/{info.variant}"
        if info.mode != "dp" and base in timed:
            summary[f"{info.name} / {base}"] = paired_ratio(timed[info.name], timed[base]).as_dict()
    return summary
