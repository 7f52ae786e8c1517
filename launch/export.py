"""Export a checkpoint to TorchScript, ONNX and (torchvision variant) a torchvision state dict.

    python launch/export.py runs/imagenet/checkpoints/last.pt --out exports/ [--format torchscript onnx torchvision]

Writes <out>/<name>.torchscript.pt, <out>/<name>.onnx and <out>/<name>.torchvision.pth, where
<name> is the run folder's name. Each carries the class names in output order, the preprocessing
and the source checkpoint: the ONNX and TorchScript files inside, the bare state dict in
<out>/<name>.torchvision.json beside it (alexnet.export.read_export_metadata reads any of them). Each
export is run on a fresh batch (of another size than the one it was traced with) and compared
with PyTorch's output before the command reports success. The input is a float32
[N, 3, crop, crop] batch preprocessed as validation does (README, "Export"); the output is
N x num_classes logits. Under torchrun only rank 0 exports; the other ranks say so and exit 0.

Exit status: 0 exported; 2 the command must change (a bad option, an --out or --name whose file
is no earlier export, a --format the checkpoint cannot hold); 1 anything else (a checkpoint
missing, damaged or of another kind, an export that fails its check, a write that fails).
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
from pathlib import Path

from alexnet.checkpoint import CheckpointError
from alexnet.config import is_folder_name
from alexnet.export import FORMATS, ExportCheckError, ExportFormatError, ExportSetupError, export_checkpoint
from alexnet.model import ModelSizeError
from alexnet.parallel.env import LAUNCHER_ENV, LaunchError, env_int
from alexnet.process import print_error, run_command
from pipelines.outputs import OutputPathError, check_output_folder, output_path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=output_path, default=Path("exports"), help="output folder (default: exports/)")
    parser.add_argument("--name", default="", help="file name stem (default: the run folder's name)")
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS, default=None,
        help="default: all that can hold the model (torchvision: the torchvision variant at fc_width 4096)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.name and not is_folder_name(args.name):  # "../x" wrote outside --out; "" means the default
        parser.error(f"--name {args.name!r}: expected a plain file name stem (no path separator, not '.' or '..')")
    if args.format:
        args.format = list(dict.fromkeys(args.format))  # each format once: "torchscript torchscript" exported twice
    return args


def default_name(checkpoint: Path) -> str:
    folder = checkpoint.resolve().parent
    return (folder.parent.name if folder.name == "checkpoints" else folder.name) or "alexnet"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # INFO would let onnxscript narrate its passes
    try:
        rank = env_int("RANK", 0)  # empty (`export RANK=$SLURM_PROCID` outside Slurm) counts as unset
    except LaunchError as exc:
        print_error(str(exc))
        return 2
    if rank != 0 and LAUNCHER_ENV in os.environ:
        # An export is one process's work: under torchrun every rank would trace, check and write
        # the same files (harmless with the per-process temporary names, but N times the time and
        # memory for one result), so rank 0 does it and the others are done. Only under torchrun
        # (which sets TORCHELASTIC_RUN_ID): a RANK left in a shell or a cluster pod's environment
        # must not turn an export into nothing.
        print(f"rank {rank}: nothing to do, rank 0 exports into {args.out}", file=sys.stderr)
        return 0
    try:
        check_output_folder(args.out, f"--out {args.out}")
    except OutputPathError as exc:
        print_error(str(exc))
        return 2
    try:
        name = args.name or default_name(args.checkpoint)
        for result in export_checkpoint(args.checkpoint, args.out, name, args.format):
            print(f"{result.path}: max |difference| from PyTorch {result.max_abs_diff:.3g} on {result.batch} images")
    except (OutputPathError, ExportFormatError) as exc:
        # A file of that name that is no earlier export, or a format the checkpoint cannot hold:
        # the same command would fail again, so it must change.
        print_error(str(exc))
        return 2
    except (CheckpointError, ExportCheckError, ExportSetupError, ModelSizeError) as exc:
        print_error(str(exc))
        return 1
    except OSError as exc:  # the folder turned unwritable, or the disk filled up: no file was kept
        print_error(f"cannot write into {args.out}: {exc.strerror or exc}")
        return 1
    return 0


if __name__ == "__main__":
    run_command(main)
