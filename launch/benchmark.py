"""Throughput benchmarks: where the time goes.

  python launch/benchmark.py pipeline [--data DIR | --dataset imagenet-like]
      the input pipeline alone: DALI (GPU decoding where a GPU exists), DALI CPU and torchvision's
      DataLoader, interleaved, against a decode-only ceiling of each library
  torchrun --nproc_per_node=N launch/benchmark.py step [--compare-torchvision] [key=value ...]
      training steps on synthetic on-device data for each parallel layout
  torchrun --nproc_per_node=N launch/benchmark.py e2e [--dataset imagenet-like] [key=value ...]
      training steps on real files, next to the same steps on synthetic data
  python launch/benchmark.py sweep --nproc 1,2,4,8 --mode step [-- step options]
      one torchrun per process count; scaling efficiency against the smallest
  python launch/benchmark.py merge A.json B.json ... --out DIR
      one report holding the results of several

Every measuring command prints a table and writes <out>/<command>.json and .csv (and .png with
--plot); merge writes <out>/<name>.json.
key=value arguments override the training config (as for launch/train.py), e.g. data.batch_size=32.
"""
# ruff: noqa: E402 - Ctrl-C is made quiet before the imports

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below take seconds, and a Ctrl-C during them is one line too
    from alexnet.interrupt import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alexnet.bench.output import (
    Report,
    ReportError,
    format_ratios,
    format_table,
    report_folder,
    write_outputs,
)
from alexnet.bench.timing import BenchSettingsError, Schedule
from alexnet.config import ConfigError, config_to_dict, load_config
from alexnet.model import ModelSizeError
from alexnet.parallel.agree import MAY_DIFFER, LoaderError, check_same_settings, flat_settings, option_settings
from alexnet.parallel.env import LaunchError, accept_legacy_local_rank, env_int, log_rank
from alexnet.parallel.mesh import LayoutError
from alexnet.process import StoreOnce, positive_seconds, print_error, print_result, run_command
from pipelines.index import DataError
from pipelines.outputs import OutputPathError, check_replaceable, output_path

HERE = Path(__file__).resolve()
DEFAULT_CONFIG = HERE.parent / "configs" / "demo.yaml"
DEFAULT_OUT = Path("runs") / "benchmark"


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _ints(text: str) -> list[int]:
    try:
        return [int(n) for n in _names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _common(p: argparse.ArgumentParser, windows: int = 5, warmup: int = 1) -> None:
    p.add_argument("--windows", type=int, default=windows, help=f"timed windows per contender (default {windows})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed windows per contender first (default {warmup})")
    p.add_argument(
        "--out", type=output_path, default=DEFAULT_OUT, help=f"folder for JSON/CSV/PNG (default {DEFAULT_OUT})"
    )
    p.add_argument("--plot", action="store_true", help="also write a PNG")


def _dataset(p: argparse.ArgumentParser, data_help: str) -> None:
    named = p.add_mutually_exclusive_group()  # together, --data won and --dataset was dropped silently
    named.add_argument("--data", type=Path, help=data_help)
    named.add_argument(
        "--dataset", choices=("demo", "imagenet-like"), default=None,
        help="built-in data instead of --data: the demo set (the default where nothing else names data), or "
        "ImageNet-like ~500x375 JPEGs of ~110 KB (generated once into ~/.cache/alexnet-dist)",
    )  # fmt: skip
    p.add_argument("--like-images", type=_like_images, default=None,
                   help=f"training images of --dataset imagenet-like (default {LIKE_IMAGES})")  # fmt: skip


LIKE_IMAGES = 1000


def _like_images(text: str) -> int:
    """Whole images per class: 5 became 10 and 15 became 10 without a word."""
    from pipelines.imagenet_like import ImageNetLikeSpec

    classes = ImageNetLikeSpec.classes
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images, got {text!r}") from None
    if value < classes or value % classes:
        raise argparse.ArgumentTypeError(f"must be a multiple of {classes} (the same images per class), got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accept_legacy_local_rank(parser)  # where the legacy launcher puts it: before step or e2e
    sub = parser.add_subparsers(dest="command", required=True)

    pipe = sub.add_parser("pipeline", help="input pipelines alone, against a decode-only ceiling")
    _dataset(pipe, "ImageFolder data: a root with train/ (train/ is read), or a split folder of class folders")
    pipe.add_argument("--batch-size", type=int, default=32)
    pipe.add_argument("--threads", type=int, default=None, help="DALI threads = DataLoader workers (default: cores)")
    pipe.add_argument("--prefetch", type=int, default=2, help="DALI queue depth = DataLoader prefetch_factor")
    pipe.add_argument("--resize", type=int, default=256)
    pipe.add_argument("--crop", type=int, default=227)
    pipe.add_argument("--batches", type=int, default=8, help="timed batches per window, at least (default 8)")
    pipe.add_argument("--min-window", type=float, default=0.5, help="seconds per window, at least (default 0.5)")
    pipe.add_argument(
        "--pipelines", type=_names, default=(),
        help="loaders to time, e.g. dali-cpu,torchvision (each with its ceiling and the diagnostics asked for), "
        "or diagnostic rows by name, e.g. graph-only/dali-cpu (default: every loader this machine runs)",
    )  # fmt: skip
    pipe.add_argument("--no-ceiling", action="store_true", help="skip the decode-only ceilings")
    pipe.add_argument(
        "--graph-only", action="store_true",
        help="also time the DALI loaders' own graphs run by themselves (no hand-over to torch)",
    )  # fmt: skip
    pipe.add_argument(
        "--stages", action="store_true",
        help="also time the DALI training graph cut after the crop window's decode and after its resize "
        "(and, on the CPU decoder, the window resized by torch instead)",
    )  # fmt: skip
    pipe.add_argument("--cpu", action="store_true", help="deliver batches to the CPU even where CUDA exists")
    pipe.add_argument("--nchw", action="store_true", help="NCHW batches instead of the trainer's channels_last")
    _common(pipe)

    step = sub.add_parser("step", help="training steps on synthetic on-device data (under torchrun)")
    step.add_argument(
        "--config", action=StoreOnce, default=str(DEFAULT_CONFIG), help="training recipe (default: the demo)"
    )
    step.add_argument("--modes", type=_names, default=(), help="layouts (default: all the world size allows)")
    step.add_argument("--variants", type=_names, default=(), help="model variants (default: the config's)")
    step.add_argument(
        "--compare-torchvision", action="store_true",
        help="add torchvision.models.alexnet at the same batch/input size (and both project variants)",
    )  # fmt: skip
    step.add_argument("--steps", type=int, default=3, help="training steps per window (default 3)")
    step.add_argument("--no-breakdown", action="store_true", help="skip the no_sync windows (no comm split)")
    step.add_argument(
        "--profile", type=int, default=0, metavar="STEPS",
        help="after timing, run STEPS steps of each contender under torch.profiler: its top operations",
    )  # fmt: skip
    step.add_argument("overrides", nargs="*", metavar="key=value")
    accept_legacy_local_rank(step)  # also where a hand-written command puts it: after the command
    _common(step)

    e2e = sub.add_parser("e2e", help="training steps on real files, next to synthetic data (under torchrun)")
    e2e.add_argument(
        "--config", action=StoreOnce, default=str(DEFAULT_CONFIG), help="training recipe (default: the demo)"
    )
    # the trainer's loaders read <root>/train: a split folder alone is not a root
    _dataset(e2e, "ImageFolder data root with train/<class>/ folders, as data.root (not a split folder)")
    e2e.add_argument("--pipelines", type=_names, default=(), help="dali and/or torchvision (default: the config's)")
    e2e.add_argument("--no-synthetic", action="store_true", help="skip the synthetic-data contender")
    e2e.add_argument("--steps", type=int, default=3, help="training steps per window (default 3)")
    e2e.add_argument("--no-breakdown", action="store_true", help="skip the no_sync windows (no comm split)")
    e2e.add_argument("overrides", nargs="*", metavar="key=value")
    accept_legacy_local_rank(e2e)
    _common(e2e, windows=4)

    sweep = sub.add_parser("sweep", help="torchrun per process count, scaling efficiency")
    sweep.add_argument("--nproc", type=_ints, default=[1, 2], help="process counts (default 1,2)")
    sweep.add_argument("--mode", choices=("step", "e2e"), default="step")
    sweep.add_argument("--timeout", type=positive_seconds, default=900.0, help="seconds per point (default 900)")
    sweep.add_argument("args", nargs=argparse.REMAINDER, help="after --: options of the step/e2e command")
    _common(sweep, windows=3)

    merge = sub.add_parser("merge", help="one report from several JSON reports")
    merge.add_argument("reports", nargs="+", type=Path)
    merge.add_argument(
        "--name", default="merged", help="file name in --out of the merged report, without .json (default merged)"
    )
    merge.add_argument("--check", action="append", default=[], metavar="NAME=STATUS", help="add a check's status")
    merge.add_argument("--out", type=output_path, default=DEFAULT_OUT,
                       help=f"folder of the merged report (default {DEFAULT_OUT})")  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    return apply_late_overrides(parser, args, extra)


def apply_late_overrides(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> argparse.Namespace:
    """Overrides on both sides of step's and e2e's options, as launch/train.py takes them: argparse
    gives the positional overrides only their first run (its intermixed parsing refuses subparsers),
    so the key=value words after an option come back unparsed and join them here, in order."""
    late = [item for item in extra if hasattr(args, "overrides") and "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _check_like_images(args: argparse.Namespace) -> None:
    if args.like_images is not None and args.dataset != "imagenet-like":
        raise BenchSettingsError("--like-images sizes --dataset imagenet-like, which is not given")


def _data_root(args: argparse.Namespace) -> Path:
    if args.data is not None:
        return args.data
    if args.dataset == "imagenet-like":
        from pipelines.imagenet_like import ImageNetLikeSpec, ensure_imagenet_like

        per_class = (args.like_images or LIKE_IMAGES) // ImageNetLikeSpec.classes
        return ensure_imagenet_like(spec=ImageNetLikeSpec(train_per_class=per_class))
    from pipelines.demo import ensure_demo_dataset

    return ensure_demo_dataset()


def _threads(args: argparse.Namespace) -> int:
    if args.threads is not None:
        return args.threads
    from alexnet.bench.envinfo import usable_cores

    return usable_cores()


def cmd_pipeline(args: argparse.Namespace) -> Report:
    import torch

    from alexnet.bench.pipeline_bench import TABLE, PipelineSettings, checked_pipelines, run_pipeline_bench

    _check_like_images(args)
    # Before --dataset imagenet-like generates its images (a DALI row without DALI, say).
    checked_pipelines(args.pipelines, torch.cuda.is_available() and not args.cpu, not args.no_ceiling,
                      args.graph_only, args.stages)  # fmt: skip
    settings = PipelineSettings(
        data=_data_root(args), batch_size=args.batch_size, threads=_threads(args), prefetch=args.prefetch,
        resize=args.resize, crop=args.crop, batches=args.batches, min_window_s=args.min_window,
        schedule=Schedule(args.warmup, args.windows), pipelines=args.pipelines, ceilings=not args.no_ceiling,
        graph_only=args.graph_only, stages=args.stages, channels_last=not args.nchw,
    )  # fmt: skip
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    report = run_pipeline_bench(settings, device)
    print_result(format_table(report.results, TABLE))
    return report


def _config(args: argparse.Namespace, extra: list[str]):
    cfg = load_config(args.config, [*extra, *args.overrides])
    if cfg.train.accum_steps != 1:
        # The step and e2e figures are of steps of one batch; an accumulated step computes A
        # batches and all-reduces once, which none of their figures would show.
        raise ConfigError(
            f"config key 'train.accum_steps' is {cfg.train.accum_steps}: the benchmarks time steps of one batch "
            "per replica; leave it at 1 (data.batch_size sets the batch)"
        )
    return cfg


# Not compared across ranks: the overrides (compared as the config they make) and the legacy
# launcher's --local-rank (each rank's own).
NOT_COMPARED = ("overrides", "local_rank")
# What may differ between ranks: the config's paths and a node's own tuning, and the options that
# name paths, which each node may spell its own way.
BENCH_MAY_DIFFER = MAY_DIFFER | {"--config", "--data", "--out"}


def _run_distributed(cfg, args: argparse.Namespace, run: Callable[[Any], Report | None]) -> Report | None:
    """`run(env)` inside the process group torchrun (or one process) describes; rank 0 prints.
    The ranks first check that they were started alike, as the trainer's do: other --windows or
    overrides on one agent made the ranks time different steps until a collective failed."""
    from alexnet.bench.step_bench import TABLE
    from alexnet.parallel.env import init_distributed, shutdown_distributed
    from alexnet.process import apply_process_settings

    apply_process_settings(cfg.train)  # as the trainer does: the figures are the trainer's
    env = init_distributed(cfg.parallel.timeout_s)
    try:
        options = option_settings({k: v for k, v in vars(args).items() if k not in NOT_COMPARED})
        check_same_settings({**flat_settings(config_to_dict(cfg)), **options}, "settings", BENCH_MAY_DIFFER)
        report = run(env)
    finally:
        shutdown_distributed(env)
    if report is not None:
        print_result(format_table(report.results, TABLE))
    return report


# Overrides the step benchmark cannot honour: it times synthetic on-device data in each layout of
# --modes. Taken, they measured something else than the report's recorded config said.
STEP_FIXED = {
    "data.pipeline": "the step benchmark times synthetic on-device data; e2e times a pipeline on real files",
    "parallel.mode": "the step benchmark times each layout of --modes; give --modes",
}


def _step_parts(args: argparse.Namespace):
    """The config and settings of a step run, every check made: also the sweep's, before its points."""
    from alexnet.bench.step_bench import StepSettings

    for item in args.overrides:
        key, value = (part.strip() for part in item.partition("=")[::2])
        if key in STEP_FIXED and (key, value) != ("data.pipeline", "synthetic"):
            raise BenchSettingsError(f"{item}: {STEP_FIXED[key]}")
    cfg = _config(args, ["data.pipeline=synthetic"])
    settings = StepSettings(
        modes=args.modes, variants=args.variants, compare_torchvision=args.compare_torchvision, steps=args.steps,
        schedule=Schedule(args.warmup, args.windows), breakdown=not args.no_breakdown, profile=args.profile,
    )  # fmt: skip
    return cfg, settings


def cmd_step(args: argparse.Namespace) -> Report | None:
    from alexnet.bench.step_bench import run_step_bench

    cfg, settings = _step_parts(args)
    return _run_distributed(cfg, args, lambda env: run_step_bench(cfg, env, settings))


def _data_flag(args: argparse.Namespace) -> str:
    return f"--data {args.data}" if args.data is not None else f"--dataset {args.dataset}"


def check_root_override(flag: str, root: Path, overrides: list[str]) -> None:
    """A data.root=... override next to --data/--dataset would silently win over the flag (overrides
    come last); the same folder twice is no conflict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "data.root" and not _same_path(value.strip(), root):
            raise BenchSettingsError(f"{flag} and data.root={value.strip()} name different data: give one of them")


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _e2e_parts(args: argparse.Namespace):
    """The config and settings of an e2e run, every check made: also the sweep's, before its points."""
    from alexnet.bench.e2e_bench import E2ESettings, check_e2e_installed

    _check_like_images(args)
    check_e2e_installed(args.pipelines or (_config(args, []).data.pipeline,))  # before --dataset generates
    # --data/--dataset name the data; otherwise the config's data.root does (the demo when empty).
    named = args.data is not None or args.dataset is not None
    root = _data_root(args) if named else None
    if root is not None:
        check_root_override(_data_flag(args), root, args.overrides)
    cfg = _config(args, [f"data.root={root}"] if root is not None else [])
    settings = E2ESettings(
        pipelines=args.pipelines, synthetic=not args.no_synthetic, steps=args.steps,
        schedule=Schedule(args.warmup, args.windows), breakdown=not args.no_breakdown,
    )  # fmt: skip
    return cfg, settings


def cmd_e2e(args: argparse.Namespace) -> Report | None:
    from alexnet.bench.e2e_bench import run_e2e_bench

    cfg, settings = _e2e_parts(args)
    return _run_distributed(cfg, args, lambda env: run_e2e_bench(cfg, env, settings))


def cmd_sweep(args: argparse.Namespace) -> Report:
    from alexnet.bench.sweep import TABLE, SweepSettings, run_sweep

    passthrough = args.args[1:] if args.args[:1] == ["--"] else args.args
    passthrough = ["--windows", str(args.windows), "--warmup", str(args.warmup), *passthrough]
    _check_point_options(args.mode, passthrough)
    settings = SweepSettings(
        nprocs=tuple(args.nproc), mode=args.mode, args=tuple(passthrough), entry=HERE,
        out=args.out / "sweep-points", timeout_s=args.timeout,
    )  # fmt: skip
    report = run_sweep(settings)
    print_result(format_table(report.results, TABLE))
    return report


def _check_point_options(mode: str, options: list[str]) -> None:
    """A point's options, checked as the point would check them, before any torchrun starts: each
    point failed on its own (one torchrun start per point, minutes on a GPU node) and the sweep
    then wrote an empty report."""
    try:
        point = parse_args([mode, *options])
    except SystemExit as exc:  # argparse has printed its usage line and the error (or the help)
        if not exc.code:
            raise
        raise BenchSettingsError(f"sweep: the options for {mode} are refused (the line above)") from exc
    (_step_parts if mode == "step" else _e2e_parts)(point)


# The commands that are not torchrun's (step and e2e are), and the keys every report has.
ONE_PROCESS = ("pipeline", "sweep", "merge")
REPORT_KEYS = frozenset({"schema", "results"})


def merge_output(name: str, out: Path, inputs: list[Path]) -> Path:
    """<out>/<name>.json, the merged report; refused when it would land outside --out or replace one
    of the reports it is merged from (read first, lost with the merge's own figures). `--name
    merged.json` means merged.json, not merged.json.json."""
    name = name.removesuffix(".json")
    if name in ("", ".", "..") or "/" in name or (os.altsep and os.altsep in name):
        raise BenchSettingsError(f"--name {name!r}: expected a plain file name (no path separator, not '..' or empty)")
    target = out / f"{name}.json"
    if any(_same_path(target, report) for report in inputs):
        raise BenchSettingsError(f"merge: {target} is one of the reports to merge; choose another --name or --out")
    try:  # an earlier report only: `--name summary --out runs/demo` replaced the run's summary.json
        check_replaceable(target, REPORT_KEYS, "launch/benchmark.py", f"--name {name}", "choose another --name")
    except OutputPathError as exc:
        raise BenchSettingsError(str(exc)) from exc
    return target


def cmd_merge(args: argparse.Namespace) -> Report:
    from alexnet.bench.output import MERGE_TABLE, format_ratios, merge_reports

    checks = {}
    for item in args.check:
        name, sep, status = item.partition("=")
        if not sep:
            raise BenchSettingsError(f"--check {item!r}: expected NAME=STATUS")
        checks[name] = status
    report = merge_reports(args.reports, checks)
    print_result(format_table(report.results, MERGE_TABLE))
    print_result(format_ratios({k: v for k, v in report.summary.items() if k != "checks"}))
    if checks:
        print_result("checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if log_rank() == 0 else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    commands = {"pipeline": cmd_pipeline, "step": cmd_step, "e2e": cmd_e2e, "sweep": cmd_sweep, "merge": cmd_merge}
    merged: Path | None = None
    try:
        if args.command in ONE_PROCESS and env_int("WORLD_SIZE", 1) > 1:
            # Under torchrun each worker ran the whole command: competing benchmarks writing one report.
            raise BenchSettingsError(
                f"benchmark {args.command} runs in one process: python launch/benchmark.py {args.command} ..."
            )
        if args.command == "merge":  # before --out is created: a refused merge writes nothing
            merged = merge_output(args.name, args.out, args.reports)
        with report_folder(args.out):
            report = commands[args.command](args)
    # The command must change (as train.py's 2). Only the project's own errors: a bare ValueError
    # is a bug, whose traceback says where.
    except (ConfigError, LayoutError, LaunchError, ModelSizeError, ReportError, BenchSettingsError) as exc:
        print_error(str(exc))
        return 2
    except (OSError, DataError, LoaderError) as exc:  # what a file holds (as for train.py), a rank's loader failing
        print_error(str(exc))
        return 1
    if report is None:  # ranks other than 0
        return 0
    try:
        if merged is not None:
            from alexnet.bench.output import write_json

            print_result(f"wrote {write_json(report, merged)}")
            return 0
        ratios = format_ratios(report.summary)
        if ratios:
            print_result(ratios)
        for path in write_outputs(report, args.out, plot=getattr(args, "plot", False)):
            print_result(f"wrote {path}")
    except OSError as exc:  # a full disk after the measurement: the table above keeps the figures
        where = exc.filename2 or exc.filename or f"the report into {args.out}"  # a full disk names no file
        print_error(f"cannot write {where}: {exc.strerror or exc} (the table above holds the figures)")
        return 1
    return 1 if report.summary.get("failed") else 0


if __name__ == "__main__":
    run_command(main)
