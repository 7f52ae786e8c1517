"""Measure the PCA lighting statistics of a training set (Krizhevsky et al. 2012, section 4.1).

    python launch/lighting_stats.py --data /data/imagenet [--images 5000] [--out FILE]

Samples --images files of <data>/train (without replacement, fixed --seed), takes the covariance of
the RGB values of all their pixels (0-255 units) and its eigen-decomposition, and writes
<data>/pca_lighting.json, where training finds it (data.lighting_stats=""), unless --out says
otherwise. An existing file is replaced only where it is an earlier output of this command: --out
never replaces a checkpoint, metrics.jsonl or the like. With --data omitted it measures the
built-in demo dataset.
"""
# ruff: noqa: E402 - Ctrl-C is made quiet before the imports

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below take seconds, and a Ctrl-C during them is one line too
    from alexnet.interrupt import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import argparse
import math
import os
import sys

from tqdm import tqdm

from alexnet.config import DataConfig
from alexnet.data import resolve_data_root
from alexnet.process import print_error, print_result, run_command
from pipelines.index import DataError, build_file_index
from pipelines.lighting import SAVED_KEYS, STATS_FILE, compute_lighting_stats, describe, save_lighting_stats
from pipelines.outputs import OutputPathError, check_output_file, check_replaceable, output_path


def alpha_std(text: str) -> float:
    """An argparse type: the std of the lighting coefficients, 0 meaning no lighting (data.lighting_std=0)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):  # a negative one printed negative standard deviations
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: no lighting), got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: numpy's seeds are 0 to 2**32 - 1 (-1 raised numpy's traceback)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="dataset root with train/<class>/ (default: the demo dataset)")
    parser.add_argument("--images", type=int, default=5000, help="training images to sample (default 5000)")
    parser.add_argument("--seed", type=seed, default=0, help="the sample's seed, 0 to 2**32 - 1 (default 0)")
    parser.add_argument("--decode-size", type=int, default=256, help="JPEGs are decoded at no less than this")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--out", type=output_path, default=None, help=f"output JSON (default: <data>/{STATS_FILE})")
    parser.add_argument("--alpha-std", type=alpha_std, default=0.1, help="for the printed summary only (default 0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value in (("--images", args.images), ("--decode-size", args.decode_size), ("--workers", args.workers)):
        if value < 1:
            print_error(f"{flag} must be >= 1, got {value}")
            return 2
    root = resolve_data_root(DataConfig(root=args.data))
    try:  # first: a mistyped --data was reported as an --out (its default) that cannot be written
        files = build_file_index(root / "train").files
    except DataError as exc:
        print_error(str(exc))
        return 1
    out = args.out or root / STATS_FILE
    what = f"--out {out}" if args.out else f"the default output {out} (--out for another)"  # read-only data
    try:
        check_output_file(out, what)  # before the measurement, which a bad path would lose
        check_replaceable(out, SAVED_KEYS, "launch/lighting_stats.py", what)  # a checkpoint was replaced
    except OutputPathError as exc:
        print_error(str(exc))
        return 2
    try:
        count = min(args.images, len(files))
        with tqdm(total=count, desc="lighting statistics", unit="img", disable=None) as bar:
            stats = compute_lighting_stats(
                files, args.images, args.seed, args.decode_size, args.workers, bar.update, source=str(root / "train")
            )
    except DataError as exc:
        print_error(str(exc))
        return 1
    print_result(describe(stats, args.alpha_std))  # first: a failed write below still shows the statistics
    try:
        out = save_lighting_stats(stats, out)  # a failed write keeps an earlier file
    except OSError as exc:  # a full disk: a traceback, after minutes of decoding
        print_error(f"cannot write {out}: {exc.strerror or exc} (the statistics above are not saved)")
        return 1
    print_result(f"{stats.num_images} images, {stats.num_pixels:,} pixels -> {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
