"""Draw a run's training curves from its metrics.jsonl: while it trains, or after a session that
ended without drawing them (killed, or a machine lost).

    python launch/plot_run.py runs/demo                     # runs/demo/training_curves.png
    python launch/plot_run.py runs/demo --out curves.png
    python launch/plot_run.py runs/demo --out plots/         # plots/training_curves.png

The trainer draws the same figure at the end of every session. An existing --out file is replaced
only where it is a PNG image (an earlier plot), never a checkpoint or metrics.jsonl.
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

from alexnet.process import print_error, run_command
from alexnet.report import PLOT_FILE, plot_training_curves
from pipelines.outputs import OutputPathError, check_output_file, output_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder (holds metrics.jsonl)")
    where = f"the PNG, or a folder for {PLOT_FILE} (existing, or ending in /) (default: RUN_DIR)"
    parser.add_argument("--out", type=output_text, default=None, help=where)
    return parser.parse_args(argv)


def resolve_png_out(out: str | None, run_dir: Path) -> Path:
    """Where the plot goes: --out, a folder (existing, or a path ending in /, as evaluate.py's and
    export.py's --out) getting PLOT_FILE inside it; else the run folder's. The name must end in
    .png: the file is a PNG whatever its name (curves.jpg held PNG data)."""
    if out is None:
        return run_dir / PLOT_FILE
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        return path / PLOT_FILE
    if path.suffix.lower() != ".png":
        raise OutputPathError(f"--out {out}: the plot is a PNG image; name a .png file or a folder")
    return path


def check_png_out(path: Path, given: bool = True) -> None:
    """`path` can be written, and an existing file there is a PNG image (or the start of one: an
    empty or cut plot of an interrupted write is replaced too). `given`: by --out, else the
    default place in the run folder (which may be read-only)."""
    what = f"--out {path}" if given else f"the default output {path} (--out for another)"
    check_output_file(path, what)
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(len(PNG_SIGNATURE))
        if not PNG_SIGNATURE.startswith(head):
            raise OutputPathError(f"{what}: exists and is no PNG image; name a new file (nothing written)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A torn last line is normal while the run writes it: said as a warning, not a traceback.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if args.run_dir.is_file():
        print_error(f"{args.run_dir} is a file: name the run folder, the one that holds metrics.jsonl")
        return 2
    metrics = args.run_dir / "metrics.jsonl"
    try:
        out = resolve_png_out(args.out, args.run_dir)
        check_png_out(out, given=args.out is not None)
    except OutputPathError as exc:
        print_error(str(exc))
        return 2
    if not metrics.is_file():
        print_error(f"{metrics}: no such file (is {args.run_dir} a run folder?)")
        return 1
    try:
        plot_training_curves(metrics, out)
    except ImportError as exc:
        print_error(f"matplotlib cannot be imported ({exc}; pip install matplotlib)")
        return 1
    except OSError as exc:
        print_error(f"cannot write {out}: {exc.strerror or exc}")
        return 1
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
