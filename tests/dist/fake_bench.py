"""Stands in for launch/benchmark.py in the sweep's tests: run by torchrun like the real entry, it
writes a valid report in which images/s follow a known law, so the sweep's collection and its
efficiency arithmetic can be checked in seconds.

dp/paper: 100 images/s per process x 0.9 (P > 1); towers/paper (P even): 80 per process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alexnet.bench.output import Report, write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail-at", type=int, default=0, help="exit 3 at this world size")
    parser.add_argument("--no-report-at", type=int, default=0, help="exit 0 without a report at this world size")
    args, _ = parser.parse_known_args()
    world = int(os.environ["WORLD_SIZE"])
    if world == args.fail_at:
        print(f"error: fake failure at {world} processes", file=sys.stderr)
        print("torchrun's long report of the failed child\n" * 100, file=sys.stderr)  # fills the tail
        return 3
    if world == args.no_report_at:
        return 0
    if int(os.environ["RANK"]) != 0:
        return 0
    # Imported by the reporting rank alone, after the early exits: 2-3 s per process, and the
    # sweep's 6 points start 12 workers, of which only 4 write a report.
    import torch

    results = [
        {
            "name": "dp/paper",
            "mode": "dp",
            "variant": "paper",
            "images_per_sec": 100.0 * world * (0.9 if world > 1 else 1.0),
        }
    ]
    if world % 2 == 0:
        results.append({"name": "towers/paper", "mode": "towers", "variant": "paper", "images_per_sec": 80.0 * world})
    environment = {k: None for k in ("torch", "torchvision", "dali", "cuda", "cudnn", "nccl", "commit")}
    # The threads this process really has: the sweep's per-point OMP_NUM_THREADS, as torch read it.
    environment.update({"devices": [], "world_size": world, "layout": ["dp"], "torch_threads": torch.get_num_threads()})
    write_json(Report(args.mode, results, environment, {"argv": sys.argv[1:]}), args.out / f"{args.mode}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
