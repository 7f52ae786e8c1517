"""Run under torchrun (2 ranks): a stop asked of one rank only stops every rank.

Usage: torchrun --nproc_per_node=2 tests/dist/stop_agree.py OUT_DIR

Rank 1 sends itself SIGUSR1 (what a scheduler's signal to one worker does) after the first
agreement; rank 0 gets nothing. Writes OUT_DIR/rank<R>.json: `agreed` before and after the
signal, and the reason each rank gives.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.stop import StopRequest


def main(out_dir: str) -> None:
    env = init_distributed(timeout_s=60)
    stop = StopRequest(torch.device("cpu"))  # no stop file: the signal is the only request
    stop.install()
    before = stop.agreed()
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled before kill() returns to Python code
    after = stop.agreed()
    record = {"before": before, "after": after, "here": stop.requested_here(), "reason": stop.reason()}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
