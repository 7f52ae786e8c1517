"""torchrun --nproc_per_node=2 gloo_reduce_scatter.py OUT_DIR: alexnet.parallel.comm.reduce_scatter
where gloo lacks dist.reduce_scatter (torch before 2.8) gives what it gives where gloo has it.
Writes OUT_DIR/rank<r>.json: whether both results are equal. (tests/test_layouts.py runs `run` in
layout_check.py's launch of 2 ranks instead: CASE gloo_reduce_scatter.)"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from alexnet.parallel.comm import reduce_scatter


def results() -> tuple[torch.Tensor, torch.Tensor]:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    # chunks of a channels split (not contiguous), as _GatherCat's backward gives them
    grad = torch.randn(3, 2 * 5, 4, generator=gen)
    chunks = list(grad.split(5, dim=1))
    native = torch.empty(3, 5, 4)
    reduce_scatter(native, chunks, None)
    real = dist.reduce_scatter

    def unsupported(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    dist.reduce_scatter = unsupported
    try:
        fallback = torch.empty(3, 5, 4)
        reduce_scatter(fallback, chunks, None)
    finally:
        dist.reduce_scatter = real
    return native, fallback


def run(env, out_dir: Path) -> None:
    native, fallback = results()
    result = {"equal": torch.equal(native, fallback), "norm": native.norm().item()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run(None, Path(sys.argv[1]))
    dist.destroy_process_group()
