"""Run under torchrun (4 ranks): hybrid's FC-slice gradient all-reduce under parallel.comm_hook.

Usage: torchrun --nproc_per_node=4 tests/dist/hybrid_hook.py OUT_DIR
(tests/test_layouts.py runs `run` in layout_check.py's launch of 4 ranks instead: CASE hybrid_hook.)

Two FC groups of 2 (so each FC slice is all-reduced between the groups). For each hook (none,
bf16, fp16, powersgd) one step from the same model and batch; writes OUT_DIR/rank<R>.json with
the bytes each kind of gradient traffic handed to the collectives, the largest difference of the
FC slices' gradients from those under `none` and their scale, and the warnings logged.
"""

import json
import logging
import sys
from pathlib import Path

import torch
from layout_check import PER_REPLICA, SEED, batch, fresh_model
from torch.nn import functional as F

from alexnet.config import ParallelConfig
from alexnet.layers import DropoutContext, apply_dropout_context
from alexnet.parallel.apply import apply_parallelism
from alexnet.parallel.comm import CommCounter
from alexnet.parallel.env import init_distributed, shutdown_distributed
from alexnet.parallel.mesh import build_mesh

HOOKS = ("none", "bf16", "fp16", "powersgd")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def one_step(env, mesh, hook: str) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    counter = CommCounter()
    par = apply_parallelism(fresh_model(), env, mesh, ParallelConfig(mode="hybrid", fc_group=2, comm_hook=hook),
                            counter)  # fmt: skip
    rows = slice(mesh.data_rank * PER_REPLICA, (mesh.data_rank + 1) * PER_REPLICA)
    images, labels = batch(0, mesh.data_size)
    apply_dropout_context(par.local, DropoutContext(SEED, 0, torch.arange(rows.start, rows.stop)))
    F.cross_entropy(par.module(images[rows]), labels[rows]).backward()
    par.layout.after_backward()()
    payload, _ = counter.take()
    return payload, {n: p.grad.clone() for n, p in par.local.named_parameters() if n.startswith("head.")}


def run(env, out_dir: Path) -> None:
    warnings = Warnings()
    logging.getLogger("alexnet").addHandler(warnings)
    try:
        mesh = build_mesh(env, "hybrid", 2)
        result = {}
        reference = None
        for hook in HOOKS:
            before = len(warnings.messages)
            payload, grads = one_step(env, mesh, hook)
            reference = reference or grads
            result[hook] = {
                "payload": payload,
                "fc_grad_diff": max((grads[n] - reference[n]).abs().max().item() for n in grads),
                "fc_grad_scale": max(g.abs().max().item() for g in reference.values()),
                "warnings": warnings.messages[before:],
            }
    finally:
        logging.getLogger("alexnet").removeHandler(warnings)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))


def main(out_dir: str) -> None:
    env = init_distributed(timeout_s=120)
    run(env, Path(out_dir))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
