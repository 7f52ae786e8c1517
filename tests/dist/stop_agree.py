"""Run under torchrun (2 ranks): a stop asked of one rank only stops every rank.

Usage: torchrun --nproc_per_node=2 tests/dist/stop_agree.py OUT_DIR

First rank 0 brings a failure of its own (as when it cannot write the metrics file) to the
agreement. Then rank 1 sends itself SIGUSR1 (what a scheduler's signal to one worker does); rank 0
gets nothing. Writes OUT_DIR/rank<R>.json: `agreed` before and after each, the reason each
rank gives, and the requests all ranks gathered (what rank 0 writes into the .stopped marker).
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
    failed = stop.agreed(failed_here=env.rank == 0)
    failed_reason = stop.reason()
    failed_requests = stop.requests()  # a failure is no request
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled before kill() returns to Python code
    after = stop.agreed()
    record = {"before": before, "failed": failed, "failed_reason": failed_reason, "after": after,
              "here": stop.requested_here(), "reason": stop.reason(), "failed_requests": failed_requests,
              "requests": stop.requests()}  # fmt: skip
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
