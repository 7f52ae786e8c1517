"""Run under torchrun (2 ranks): loaders that fail on some ranks stop every rank alike.

Usage: torchrun --nproc_per_node=2 tests/dist/fetch_agree.py OUT_DIR

Three cases, each over `agreed_batches` of a loader of four batches whose third fails on some
ranks (the second of the same torchrun run, so the ranks stay in step after each case):
  unforeseen: rank 1's loader raises a RuntimeError (a DALI internal error, memory run out);
  two_files:  both ranks' loaders raise a DataError, each naming a file of its own;
  mixed:      rank 0's a DataError, rank 1's a RuntimeError.
Writes OUT_DIR/rank<R>.json: for each case, the batches each rank got and the error it raised
(type and message).
"""

import json
import sys
from pathlib import Path

import torch

from alexnet.parallel.agree import agreed_batches
from alexnet.parallel.env import init_distributed, shutdown_distributed
from pipelines.index import DataError

# What each rank's loader raises at its third batch, per case (None: that rank's loader works).
CASES = {
    "unforeseen": [None, RuntimeError("Critical error in pipeline:\nError in thread 0: injected\nStacktrace")],
    "two_files": [DataError("cannot decode /data/a.jpg"), DataError("cannot decode /data/b.jpg")],
    "mixed": [DataError("cannot decode /data/a.jpg"), MemoryError("std::bad_alloc")],
}


def loader(failure: Exception | None):
    for i in range(4):
        if i == 2 and failure is not None:
            raise failure
        yield i


def main(out_dir: str) -> None:
    env = init_distributed(timeout_s=60)
    record = {}
    for name, failures in CASES.items():
        got = []
        try:
            for batch in agreed_batches(loader(failures[env.rank]), torch.device("cpu")):
                got.append(batch)
            raised = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            raised = [type(exc).__name__, str(exc)]
        record[name] = {"got": got, "raised": raised}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
