"""Lay the ILSVRC-2012 validation set out in class folders: val/<wnid>/ILSVRC2012_val_*.JPEG.

    python launch/prepare_imagenet.py --val /data/ILSVRC2012_img_val_flat \\
        --ground-truth /data/ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet/val

--val is the flat folder of 50,000 JPEGs (or the ILSVRC2012_img_val.tar archive itself, which is
then extracted straight into the class folders). --ground-truth is the devkit (the .tar.gz or its
extracted folder: data/ILSVRC2012_validation_ground_truth.txt through data/meta.mat, which needs
scipy) or Kaggle's LOC_val_solution.csv. From a folder, files are symlinked by default (--mode
copy or move to change that; a tar is always extracted, so --mode with one is refused) and keep
their names where the folder's entries are themselves symlinks (a git-annex or datalad checkout:
a move moves the links, not the files they point to). Running it again is harmless, and after an
interrupted run it finishes the layout: the images already in place count as done, links of an
earlier run into a flat folder since moved are replaced, and what a killed run had half written
goes. Images that an earlier run with other labels left in another class folder, a --val folder
inside --out, or two files of one image stop it with one line, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alexnet.imagenet import (
    Conversion,
    ImageNetLayoutError,
    NotATarError,
    convert_val_folder,
    extract_val_archive,
    read_ground_truth,
)
from alexnet.interrupt import status_of
from pipelines.outputs import output_path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", required=True, type=Path, help="flat validation folder or ILSVRC2012_img_val.tar")
    parser.add_argument(
        "--ground-truth",
        required=True,
        type=Path,
        help="ILSVRC2012_devkit_t12.tar.gz (or its folder) or LOC_val_solution.csv",
    )
    parser.add_argument("--out", required=True, type=output_path, help="output folder, e.g. /data/imagenet/val")
    # default None, not "symlink": a --mode given with a tar (always extracted) can then be refused
    parser.add_argument("--mode", choices=("symlink", "copy", "move"), help="for a folder (default: symlink)")
    return parser.parse_args(argv)


def read_truth(source: Path) -> dict[str, str]:
    try:
        return read_ground_truth(source)
    except NotATarError as exc:  # e.g. the devkit's ground-truth .txt itself
        raise ImageNetLayoutError(
            f"--ground-truth {source} is not a tar archive, a folder or a .csv: it takes "
            "ILSVRC2012_devkit_t12.tar.gz, its extracted folder or LOC_val_solution.csv"
        ) from exc


def prepare(args: argparse.Namespace) -> Conversion:
    if args.mode is not None and args.val.is_file():  # checked first: before the devkit is read
        raise ImageNetLayoutError(
            f"--mode applies to a folder of images; --val {args.val} is a file, and a tar is extracted"
        )
    truth = read_truth(args.ground_truth)
    if args.val.is_dir():
        return convert_val_folder(args.val, truth, args.out, args.mode or "symlink")
    if not args.val.is_file():
        raise ImageNetLayoutError(f"--val {args.val} is neither a folder nor an archive")
    try:
        return extract_val_archive(args.val, truth, args.out)
    except NotATarError as exc:  # e.g. LOC_val_solution.csv given as --val
        raise ImageNetLayoutError(
            f"--val {args.val} is not a tar archive or a folder: it takes ILSVRC2012_img_val.tar "
            "or the folder of its 50,000 JPEGs"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        done = prepare(args)
    except ImageNetLayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    earlier = f" ({done.already_placed} already in place)" if done.already_placed else ""
    print(f"{done.images} validation images in {done.classes} class folders under {done.out_dir}{earlier}")
    return 0


if __name__ == "__main__":
    sys.exit(status_of(main))
