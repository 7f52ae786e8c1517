"""Run under torchrun (2 ranks): a towers pair's process group keeps parallel.timeout_s.

Usage: torchrun --nproc_per_node=2 tests/dist/group_timeout.py OUT_DIR TIMEOUT_S SLEEP_S

Rank 1 sleeps SLEEP_S seconds while rank 0 all-reduces over the pair's group (mesh.model_group);
rank 0 writes OUT_DIR/rank0.json with the seconds until the collective failed and its error. The
groups used to get torch's default (30 minutes under gloo), not the world's timeout.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from alexnet.parallel.env import init_distributed
from alexnet.parallel.mesh import build_mesh


def main() -> None:
    out, timeout_s, sleep_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    env = init_distributed(timeout_s)
    mesh = build_mesh(env, "towers")
    if env.rank == 1:
        time.sleep(sleep_s)
        return  # exits without the collective: rank 0's waits end by the timeout, or by this exit
    start, error = time.perf_counter(), ""
    try:
        dist.all_reduce(torch.ones(1), group=mesh.model_group)
    except RuntimeError as exc:
        error = str(exc)
    (out / "rank0.json").write_text(json.dumps({"seconds": time.perf_counter() - start, "error": error}))


if __name__ == "__main__":
    main()
