"""Evaluate a checkpoint: top-1/top-5 and per-class accuracy, centre crop or ten crops.

    python launch/evaluate.py runs/imagenet/checkpoints/last.pt --data /data/imagenet [--ten-crop]
    torchrun --nproc_per_node=8 launch/evaluate.py CHECKPOINT --data /data/imagenet --ten-crop

The model, input size, resize and normalization come from the checkpoint's stored config. --data
is a dataset root holding val/<class>/ or a folder of class folders, with some or all of the
trained classes (labelled by the class names the checkpoint stores; an older checkpoint's by the
root's train/ folder, or the folders' sorted order); without it, the run's own data.root.
--files evaluates the files of a list written by launch/scan.py (the run's own data.val_files
by default, when the run's own val split is evaluated; data.train_files for its train split).
--ten-crop averages the softmax over the four corners, the centre and their mirrors (Krizhevsky
et al. 2012, section 4.1). --pipeline reads the images with DALI or torchvision (default: the
run's data.pipeline, whose figures its validation logged). --amp sets the autocast precision
(default: the run's train.amp). Rank 0 prints the result and writes it as JSON (default: beside
the checkpoint, <checkpoint>.eval-centre.json or .eval-tencrop.json, with the split's name for
another split than val: .eval-train-centre.json; a folder given to --out gets that name inside
it; replacing a result on other images says so). An existing file is replaced only where it is
an earlier result of this command: --out never replaces the checkpoint, metrics.jsonl or the like.
"""
# ruff: noqa: E402 - Ctrl-C is made quiet before the imports

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below take seconds, and a Ctrl-C during them is one line too
    from alexnet.interrupt import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from alexnet.checkpoint import CheckpointError
from alexnet.config import MAX_BATCH, MAX_THREADS, ConfigError
from alexnet.evaluate import EvalOptions, format_result, run_evaluation
from alexnet.model import ModelSizeError
from alexnet.parallel.agree import LoaderError, share_setup_failure
from alexnet.parallel.env import (
    DistEnv,
    LaunchError,
    accept_legacy_local_rank,
    init_distributed,
    log_rank,
    shutdown_distributed,
)
from alexnet.process import collective_seconds, print_error, print_result, run_command
from pipelines.index import DataError
from pipelines.outputs import OutputPathError, check_output_file, check_replaceable, output_text, write_text_atomic


def run_or_count(high: int):
    """An argparse type: a count up to `high` (the trainer's own upper end for the setting: past
    it DALI aborted without a message), 0 meaning "the run's"."""

    def parse(text: str) -> int:
        value = int(text)
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [0, {high}] (0: the run's own), got {value}")
        return value

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    accept_legacy_local_rank(parser)
    parser.add_argument("--data", default="", help="dataset root or folder of class folders (default: the run's)")
    parser.add_argument("--split", default="val", help="subfolder of --data to evaluate (default: val)")
    parser.add_argument(
        "--ten-crop", action="store_true",
        help="average the softmax over 10 crops (section 4.1); without it the centre crop, also for a run that "
        "validated with ten crops (data.val_ten_crop)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=run_or_count(MAX_BATCH), default=0, help="images per rank and batch (default: the run's)"
    )
    parser.add_argument(
        "--num-threads",
        type=run_or_count(MAX_THREADS),
        default=0,
        help="DALI threads, or torchvision DataLoader workers, per rank (default: the run's)",
    )
    parser.add_argument(
        "--files",
        default="",
        help="file list of the split from launch/scan.py (default: the run's data.val_files or train_files)",
    )
    parser.add_argument(
        "--pipeline",
        choices=("run", "dali", "torchvision"),
        default="run",
        help="what reads the images (default: the run's data.pipeline, so that the figures are its validation's; "
        "--ten-crop reads with DALI)",
    )
    parser.add_argument(
        "--decoder", choices=("auto", "mixed", "cpu"), default="auto",
        help="DALI's decoder (default auto: mixed on a GPU, cpu otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--amp", choices=("run", "auto", "off", "bf16", "fp16"), default="run", help="autocast (default: the run's)"
    )
    parser.add_argument(
        "--out",
        type=output_text,
        default=None,
        help="JSON file, or folder (existing, or ending in /) (default: beside the checkpoint)",
    )
    parser.add_argument("--timeout", type=collective_seconds, default=600.0,
                        help="collective timeout in seconds, 10 to 10**7 (default 600)")  # fmt: skip
    args = parser.parse_args(argv)
    # Options that contradict each other are a usage error (exit 2, as argparse's own), known
    # before a checkpoint is read.
    if args.pipeline == "torchvision" and args.ten_crop:
        parser.error("--ten-crop reads the images with DALI; use --pipeline dali (or run)")
    if args.pipeline == "torchvision" and args.decoder != "auto":
        parser.error("--decoder sets DALI's decoder; --pipeline torchvision decodes with PIL")
    return args


def default_out(checkpoint: Path, ten_crop: bool, split: str = "val") -> Path:
    """<checkpoint>.eval-centre.json (or -tencrop) for the validation split, and with another
    split's name in it (.eval-train-centre.json): --split train replaced the validation's result."""
    checkpoint = checkpoint.absolute()  # "." has no name to build on; the checkpoint check names it
    crops = "tencrop" if ten_crop else "centre"
    split_part = "" if split == "val" else f"{split.strip('/').replace('/', '_')}-"
    return checkpoint.with_name(f"{checkpoint.name}.eval-{split_part}{crops}.json")


def resolve_out(out: str | None, checkpoint: Path, ten_crop: bool, split: str = "val") -> Path:
    """Where the JSON goes, checked before the evaluation runs, so that an evaluation is not lost
    to an output path that cannot be written (a folder, existing or written with a trailing
    slash, gets the default name inside it). Nothing is created yet: the checkpoint may still
    turn out not to exist."""
    path = default_out(checkpoint, ten_crop, split) if out is None else Path(out)
    if path.is_dir() or (out is not None and out.endswith(("/", os.sep))):
        path = path / default_out(checkpoint, ten_crop, split).name
    # the default place beside the checkpoint may be read-only (a shared model store), or hold another file
    what = f"--out {path}" if out is not None else f"the default output {path} (--out for another)"
    check_not_overwriting(path, checkpoint, what)
    check_output_file(path, what)
    return path


# What every result this command writes holds; a file without them is not one. per_class comes
# last: the keys before it fit in the bounded prefix that is read, whatever the number of classes.
RESULT_KEYS = frozenset({"checkpoint", "crops", "images", "top1", "top5"})


def check_not_overwriting(path: Path, checkpoint: Path, what: str) -> None:
    """--out replaces an earlier result, but nothing else: a mistyped --out (the checkpoint itself,
    metrics.jsonl, /dev/null) was replaced by a few KB of JSON. `what` names the output in errors."""
    if not path.exists():
        return
    try:
        if checkpoint.exists() and os.path.samefile(path, checkpoint):  # also through a link or another path
            raise OutputPathError(
                f"{what}: that is the checkpoint being evaluated; name a JSON file or a folder "
                "(nothing was overwritten)"
            )
    except OSError as exc:  # a file this user may not read
        raise OutputPathError(f"{what}: {exc.strerror or exc}") from exc
    check_replaceable(path, RESULT_KEYS, "launch/evaluate.py", what, "name a new file or a folder")


def other_images(path: Path, result: dict) -> str | None:
    """The images an earlier result at `path` was of ("<data> (files <list>)"), where they are
    not this result's: a second dataset given with --data replaced the first one's result."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none, or not readable: nothing to say
    if not isinstance(earlier, dict):
        return None
    said = (earlier.get("data"), earlier.get("files"))
    if said == (result["data"], result["files"]):
        return None
    return str(said[0]) + (f" (files {said[1]})" if said[1] else "")


def checked_out(args: argparse.Namespace, env: DistEnv) -> Path | None:
    """Rank 0's output path, checked by rank 0 (which writes it; another node may not see its
    folder), and the outcome shared: a rank 0 that failed alone before the process group formed
    left the others waiting for it until the timeout, without torchrun's agent to stop them."""
    out, failure = None, None
    if env.is_main:
        try:
            out = resolve_out(args.out, args.checkpoint, args.ten_crop, args.split)
        except OutputPathError as exc:
            failure = exc
    share_setup_failure(failure, (OutputPathError,))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if log_rank() == 0 else logging.WARNING, format="%(message)s")
    opts = EvalOptions(
        checkpoint=args.checkpoint,
        data=args.data,
        split=args.split,
        ten_crop=args.ten_crop,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
        decoder=args.decoder,
        files=args.files,
        amp=args.amp,
        pipeline=args.pipeline,
    )
    try:
        env = init_distributed(args.timeout, timeout_setting="--timeout")
    except LaunchError as exc:
        print_error(str(exc))
        return 2
    try:
        out = checked_out(args, env)
        result = run_evaluation(opts, env)
        if out is not None:
            print_result(format_result(result))  # first: a failed write below still shows the result
            replaced = other_images(out, result)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, json.dumps(result, indent=2) + "\n")  # a failed write keeps the last
            except OSError as exc:
                print_error(f"cannot write {out}: {exc.strerror}")
                return 1
            print_result(f"written to {out}")
            if replaced:
                logging.getLogger("alexnet").warning(
                    "it replaces the result on %s that %s held (--out for a file of its own)", replaced, out.name
                )
    # The command must change (as train.py's 2): an --out that cannot be written, options this
    # machine cannot run (--amp fp16 or --decoder mixed without CUDA, DALI not installed), ranks
    # started with different options. A ConfigError of some nodes only arrives as a DataError.
    except (OutputPathError, ConfigError) as exc:
        print_error(str(exc))
        return 2
    # OSError: a folder a rank lacks; ModelSizeError: a checkpoint's model too large for this machine
    except (CheckpointError, DataError, LoaderError, ModelSizeError, OSError) as exc:
        print_error(str(exc))
        return 1
    finally:
        shutdown_distributed(env)
    return 0


if __name__ == "__main__":
    run_command(main)
